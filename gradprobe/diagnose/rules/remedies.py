"""Remedies that fit the method a run shows, with the numbers the run gives: the fixed weight
that balances the recorded gradient norms, the cure of a codebook or of a clustering head, the
remedies of a harmful conflict between tasks (docs/findings.md, "Remedies"). A rule passes the
text as ``make_finding(..., remedy=...)``; without one the id's generic ``REMEDY`` stands."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from gradprobe.record import role_declaration

from .._series import g
from ..findings import REMEDY

ADAPTIVE_WEIGHTS = (
    "weights that follow the gradients as they change: gradprobe.remedies.GradNormBalancer "
    "(updated from probe.last_grad_norms) or learned uncertainty weights (Kendall, Gal & "
    "Cipolla 2018: sum_i exp(-s_i) L_i + s_i, each s_i trained beside the network)")

TASK_CONFLICT = (
    "Let the weights follow the tasks: " + ADAPTIVE_WEIGHTS + "; or remove the conflicting "
    "components of the gradients on the shared parameters: PCGrad's projection onto each "
    "other's normal plane (Yu et al. 2020) or CAGrad's common descent direction (Liu et al. "
    "2021), e.g. torchjd.aggregation.PCGrad or CAGrad (the torchjd package; gradprobe has "
    "none); tasks that cannot share an output need heads of their own.")

ROUNDING_RESIDUE = (
    "Take the loss's target from a network of its own, not from the live model: a frozen copy "
    "taken before the new training starts (copy.deepcopy(model) with requires_grad_(False)), "
    "or a teacher or moving-average model with parameters of its own; a target computed from the "
    "model being trained matches its output up to float rounding, and its loss moves nothing.")

CODEBOOK_CURE = (
    "reset the codes that no input chooses to recent encoder outputs (dead-code reset), or "
    "start the codebook from data (a sample of encoder outputs, or their k-means centres)")

CODEBOOK = ("for a codebook (VQ-VAE-like: vectors trained by a loss of their own or by an EMA "
            "of their assigned inputs): " + CODEBOOK_CURE)

CLUSTERING = (
    "for a clustering head of self-supervision (SwAV/DINO-like: soft assignments to "
    "prototypes the loss trains): spread the assignments over the prototypes with "
    "Sinkhorn-Knopp equipartition (SwAV), or centre and sharpen the teacher's outputs (DINO)")


def conflict_remedy(roles: Iterable[str]) -> str:
    """A harmful conflict's remedy; with a decoupling constraint, also how to relax it."""
    if set(roles) & {"orthogonality", "decorrelation"}:
        return TASK_CONFLICT + (" A constraint that cannot hold together with the task "
                                "(strict orthogonality, for one) can be relaxed "
                                "(gradprobe.remedies.correlation_loss).")
    return TASK_CONFLICT


def balancing_weight(weight: float | None, weighted_norm: float,
                     dominant_weighted_norm: float) -> float:
    """The fixed weight that brings a loss's median weighted gradient norm to the dominant
    loss's: the weighted norm is the weight times the raw norm, so the weight scales by their
    ratio (a weight not recorded counts as 1). NaN where a norm is not positive."""
    if not (weighted_norm > 0 and dominant_weighted_norm > 0) or \
            not math.isfinite(weighted_norm / dominant_weighted_norm):
        return math.nan
    return (1.0 if weight is None else float(weight)) * dominant_weighted_norm / weighted_norm


def balancing_weight_text(evidence: Mapping[str, Any]) -> str | None:
    """``weight 'cls' 1 -> 37 (or the weight of 'reg' x0.027)`` from a swamping finding's
    evidence; None where its numbers give none. Where the finding was judged on the layers the
    losses share, the balance is that of the ratio it judged there (its median over the judged
    steps), so that the remedy and the finding read the same numbers. None too for a task
    swamped only over its first steps by a loss that then sat at its floor, where the two
    gradients cancel and their ratio gives no balance (``brief_swamping_remedy``)."""
    if "by" in (evidence.get("never_learned") or {}):
        return None
    name, dominant = evidence["loss"], evidence["dominant"]
    own = evidence["median_weighted_grad_norm"]
    other = evidence["median_dominant_weighted_grad_norm"]
    if evidence.get("judged_on") == "layers it shares":
        own, other = evidence["median_ratio_judged"], 1.0
    weight = evidence.get("median_weight")
    balanced = balancing_weight(weight, own, other)
    if not math.isfinite(balanced):
        return None
    before = g(1.0 if weight is None else weight)
    return (f"weight '{name}' {before} -> {g(balanced)} "
            f"(or the weight of '{dominant}' x{g(own / other)})")


def _where(evidence: Mapping[str, Any]) -> str:
    return "on the layers they share" if evidence.get("judged_on") == "layers it shares" \
        else "on the shared parameters"


def swamping_remedy(evidence: Mapping[str, Any]) -> str | None:
    """The fixed weight that balances the recorded norms, then the adaptive cure."""
    numbers = balancing_weight_text(evidence)
    if numbers is None:
        return None
    return (f"Fixed weights that balance the median weighted gradient norms recorded "
            f"{_where(evidence)}: {numbers}. They hold while the norms keep their ratio; for "
            f"norms that change during training use {ADAPTIVE_WEIGHTS}; or normalise each "
            "loss's gradient on the shared parameters.")


def brief_swamping_remedy(task: str, rival: str) -> str:
    """The remedy of a task swamped from its first steps by a loss that then fell to its own
    floor: a balancing weight read from the ratio does not help, as the two gradients cancel
    once the rival sits at its floor."""
    return (f"Let '{task}' learn before '{rival}' takes hold: ramp the weight of '{rival}' in "
            "after a warm-up (gradprobe.remedies.linear_ramp), or lower it until the task's "
            f"loss falls. '{rival}' drove the network to its own floor within the first steps, "
            "where the two gradients cancel, so a weight balanced on their ratio would not "
            "move it off.")


def neglected_objective_remedy(name: str) -> str:
    """The remedy of a swamped loss with inputs of its own (a boundary condition) left unmet."""
    return (f"Raise the weight of '{name}' until its weighted gradient is a fair share of the "
            "task's (gradient-swamping gives the balancing weight), or let the weights follow "
            f"the gradients ({ADAPTIVE_WEIGHTS}; for a physics-informed network, the "
            "learning-rate annealing of Wang, Teng & Perdikaris 2021); or impose the "
            "condition exactly, with a trial function that meets it by construction.")


def static_weights_remedy(swamping_evidence: Iterable[Mapping[str, Any]],
                          conflict: bool) -> str | None:
    """The balancing weights of the swamped losses and, after a harmful conflict, the task
    conflict's remedies; None where neither applies."""
    swamping_evidence = list(swamping_evidence)
    numbers = [t for t in map(balancing_weight_text, swamping_evidence) if t]
    parts = []
    if numbers:
        parts.append("Fixed weights that balance the median weighted gradient norms recorded "
                     f"{_where(swamping_evidence[0])}: " + "; ".join(numbers) + ". They hold while "
                     f"the norms keep their ratio; otherwise use {ADAPTIVE_WEIGHTS}.")
    if conflict:
        parts.append(TASK_CONFLICT)
    return " ".join(parts) or None


def prototype_collapse_remedy(usage_collapsed: bool, own_losses: list[str]) -> str | None:
    """A collapse of usage (one prototype takes the assignments) is cured by the method's own
    means: a codebook's where a loss trains only parameters of its own (VQ-VAE's codebook
    loss); else centres averaged per group, a codebook or a clustering head, which the graph
    does not tell apart, all named. Prototypes that close in on each other keep the generic
    remedy (None)."""
    if not usage_collapsed:
        return None
    if own_losses:
        names = " and ".join(f"'{n}'" for n in own_losses)
        verb = "trains" if len(own_losses) == 1 else "train"
        return (f"{names} {verb} only parameters of {'its' if len(own_losses) == 1 else 'their'} "
                f"own, as a codebook's loss does: {CODEBOOK_CURE}.")
    generic = REMEDY["prototype-collapse"]
    return ("The graph does not tell which method the prototypes serve: for centres updated "
            "as averages of their groups (center loss): " + generic[0].lower() + generic[1:-1]
            + "; " + CODEBOOK + "; " + CLUSTERING + ".")


def serving_remedy(name: str) -> str:
    """The remedy of a swamped term computed on another loss's forward pass whose intent is
    unknown: the two declarations that settle it."""
    return (f"Declare what '{name}' is for. A regulariser trades its level against the task by "
            f"design, and nothing is to be fixed: {role_declaration(name, 'regularization')}. "
            f"An objective that must be met is held back: declare it "
            f"({role_declaration(name, 'task')}), and raise its weight until its weighted "
            "gradient is a fair share of the dominant loss's.")


def intent_remedy(keep: str, cut: str) -> str:
    """The remedy of a loss on its own parameters whose intent is unknown: declare it, or wire
    it (``keep``/``cut``: the declarations that settle it)."""
    return (f"A codebook or prototype loss trains its own parameters by design: declare it "
            f"({keep}) and nothing is to be fixed. A loss meant to train the shared layers "
            f"(declare it: {cut}) must be computed from tensors that depend on them: a "
            "detach() or torch.no_grad() on its input is the usual cause.")
