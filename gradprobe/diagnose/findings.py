"""The finding record and the catalogue of finding ids (each traces to record-22)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

# In catalogue order (docs/findings.md); every id traces to a numbered point of record-22.
FINDING_IDS: tuple[str, ...] = (
    "gradient-swamping",
    "constraint-neglect",
    "gradient-conflict",
    "representation-collapse",
    "weak-contrastive-signal",
    "prototype-stale",
    "prototype-collapse",
    "orthogonality-vanishing",
    "latent-dependence",
    "sigmoid-saturation",
    "static-loss-weights",
    "batch-composition-mismatch",
    "overfitting",
    "inert-loss",
    "non-finite",
    "probe-incomplete",
)

# Most severe first: the order findings are sorted in and ``--fail-on`` compares by.
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
SEVERITY_ORDER: dict[str, int] = {severity: rank for rank, severity in enumerate(SEVERITIES)}

# A non-finite value poisons every update after it, so whatever else the run shows from then on
# (a swamped loss, a collapsed latent) is its consequence: within their severity (always
# error) these findings come first, the earliest first, before the findings they explain.
CAUSES_FIRST: tuple[str, ...] = ("non-finite",)


def finding_order(finding: "Finding") -> tuple:
    """The sort key of findings: severity, then causes first (earliest first), then id and
    subject."""
    cause = finding.id in CAUSES_FIRST
    first = finding.steps[0] if cause and finding.steps is not None else 0
    return (SEVERITY_ORDER[finding.severity], not cause, first, finding.id, finding.subject)


def json_clean(value: Any) -> Any:
    """Evidence as plain JSON: numpy scalars/arrays to Python, NaN/Inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_clean(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


@dataclass(frozen=True)
class PlotHint:
    """How a report marks a finding: the recorded ``quantity`` (a name from
    :data:`gradprobe.record.QUANTITIES`) of the series ``names`` to draw, a ``threshold`` line
    on its axis, and ``ratio_to``: a name the series are drawn relative to (each divided by
    it), when the finding is about a ratio."""

    quantity: str
    names: tuple[str, ...] = ()
    threshold: float | None = None
    ratio_to: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))

    @classmethod
    def from_mapping(cls, hint: Mapping[str, Any]) -> "PlotHint":
        return cls(quantity=hint["quantity"], names=tuple(hint.get("names") or ()),
                   threshold=hint.get("threshold"), ratio_to=hint.get("ratio_to"))

    def to_dict(self) -> dict[str, Any]:
        return {"quantity": self.quantity, "names": list(self.names),
                "threshold": self.threshold, "ratio_to": self.ratio_to}


@dataclass
class Finding:
    """One failure mode seen in a run, with the numbers that show it and what to do."""

    id: str
    severity: str
    title: str
    subject: str
    key_number: str
    evidence: dict
    why: str
    remedy: str
    steps: tuple[int, int] | None = None
    plot: PlotHint | None = None  # a mapping with PlotHint's keys is converted

    def __post_init__(self) -> None:
        if self.id not in FINDING_IDS:
            raise ValueError(f"unknown finding id {self.id!r}")
        if self.severity not in SEVERITY_ORDER:
            raise ValueError(f"unknown severity {self.severity!r}")
        self.evidence = json_clean(self.evidence)
        if self.steps is not None:
            self.steps = (int(self.steps[0]), int(self.steps[1]))
        if isinstance(self.plot, Mapping):
            self.plot = PlotHint.from_mapping(self.plot)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "severity": self.severity,
            "title": self.title,
            "subject": self.subject,
            "key_number": self.key_number,
            "evidence": self.evidence,
            "why": self.why,
            "remedy": self.remedy,
            "steps": None if self.steps is None else [self.steps[0], self.steps[1]],
        }


# The mechanism behind each id (the "why" of a finding), for any multi-loss model; the
# record-22 decoupling network (docs/record-22.md) is cited as one example, not as the model.
WHY: dict[str, str] = {
    "gradient-swamping": (
        "When one loss's weighted gradient dominates the shared parameters, the other losses "
        "barely move them, so what those losses were meant to teach the shared layers is "
        "ignored (GradNorm, Chen et al. 2018). Record 22's decoupling network failed this way "
        "(its mathematical point 1)."),
    "constraint-neglect": (
        "With its constraints unheard, the optimiser converges to a point where the task loss "
        "is near zero while a constraint loss stays high: the model fits its data without the "
        "structure the constraint was designed to impose (record 22's failure theorem)."),
    "gradient-conflict": (
        "Two losses whose gradients on the shared parameters point against each other cancel "
        "there; when one of them stalls or rises while the other falls, the shared layers "
        "serve one loss at the other's expense, and when each undoes most of the other's "
        "descent while both stop falling, both are held on a compromise plateau above what "
        "each reaches alone (PCGrad, Yu et al. 2020). A conflict that holds no loss back is "
        "common (terms of one objective at their equilibrium, a term that rose from zero to "
        "its equilibrium, an adversary) and only noted."),
    "representation-collapse": (
        "A latent whose variation concentrates in a few directions, or that maps every input "
        "to nearly one point, carries little information about its inputs. Losses that only "
        "pull things together (positive pairs without negatives, prototype pulls, a strong "
        "KL term to a prior) reach their minimum there unless something prevents it."),
    "weak-contrastive-signal": (
        "InfoNCE learns only as much as its negatives differ from the positive: negatives that "
        "are too similar (all from the anchor's own group, a single-group batch) or a loss "
        "stuck at chance give a gradient that cannot separate what it should (van den Oord et "
        "al. 2018; record 22's mathematical point 2)."),
    "prototype-stale": (
        "Prototypes whose update is not synchronised with the training loop summarise a "
        "latent that has since moved, so a prototype loss pulls features towards outdated "
        "targets (record 22, algorithmic point 1)."),
    "prototype-collapse": (
        "Prototypes updated as averages of features that a prototype loss also contracts "
        "converge towards each other and stop telling the groups apart (the momentum-average "
        "trap of record 22, mathematical point 3)."),
    "orthogonality-vanishing": (
        "The gradient of an unnormalised orthogonality loss such as ||z_a^T z_b||^2 vanishes "
        "as a latent's norm goes to zero, so the loss is satisfied by shrinking a latent "
        "instead of decoupling it (record 22, mathematical point 4)."),
    "latent-dependence": (
        "Latents a decoupling loss (orthogonality, decorrelation, an adversary) was meant to "
        "make independent still share information; the designed decoupling is not achieved, "
        "or strict independence may be the wrong target for the data."),
    "sigmoid-saturation": (
        "Where a sigmoid's input is large its derivative is nearly zero. Saturated outputs "
        "that match their targets are where training should end. Saturated outputs on the "
        "wrong side of their targets are harm: a loss that reads the probability (MSE, L1) "
        "gets almost no gradient to correct them, and under cross-entropy they show inputs "
        "on too large a scale (a fixed temperature, energy terms of different scale)."),
    "static-loss-weights": (
        "Loss weights fixed for the whole run cannot follow gradient scales that change "
        "during training, so the swamping or harmful conflict they cause persists unchecked."),
    "batch-composition-mismatch": (
        "The batches do not look as the sampler was declared to make them, so the losses that "
        "depend on batch composition (in-batch negatives, per-group statistics) see other "
        "data than designed."),
    "overfitting": (
        "The model keeps fitting its training data (the training loss falls) while the "
        "validation loss rises: it memorises instead of learning what generalises."),
    "inert-loss": (
        "A loss that moves no parameter, or none of the parameters it shares with the task, "
        "constrains nothing the task uses: it is not wired into the model as designed "
        "(computed from detached tensors, say)."),
    "non-finite": (
        "A NaN or Inf in a loss, gradient or latent poisons every later update; nothing "
        "recorded after it describes a working model."),
    "probe-incomplete": (
        "The findings are only as complete as the record: a probe that disabled itself "
        "records nothing after that step, a dropped watch nothing of its quantity, and a run "
        "without a probe step nothing at all, so the absence of other findings says nothing "
        "about that part of the run."),
}

# What to do about each id, naming the gradprobe piece that implements a fix where there is one.
REMEDY: dict[str, str] = {
    "gradient-swamping": (
        "Adapt the weights from the gradient norms: gradprobe.remedies.GradNormBalancer "
        "(updated from probe.last_grad_norms), or normalise each loss's gradient on the shared "
        "parameters; raising a swamped loss's fixed weight by the recorded ratio is the "
        "one-line check."),
    "constraint-neglect": (
        "Balance the gradients so the constraint is heard while the task still learns "
        "(gradprobe.remedies.GradNormBalancer), stage the losses with a curriculum "
        "(gradprobe.remedies.linear_ramp), and regularise the memorising part of the model "
        "(gradprobe.remedies.l1_penalty, weight decay, early stopping)."),
    "gradient-conflict": (
        "Project the conflicting gradients onto each other's normal plane (PCGrad, Yu et al. "
        "2020) or seek a common descent direction (MGDA, CAGrad); give tasks that cannot share "
        "an output heads of their own; rebalance the weights "
        "(gradprobe.remedies.GradNormBalancer); if a constraint cannot hold together with the "
        "task (strict orthogonality, for one), relax it (gradprobe.remedies.correlation_loss)."),
    "representation-collapse": (
        "Add pressure against collapse suited to the losses present: informative negatives for "
        "a contrastive loss (gradprobe.remedies.info_nce, gradprobe.remedies.MemoryBank), the "
        "stop-gradient and predictor of a non-contrastive one, KL annealing or free bits for a "
        "KL term; balance the losses (gradprobe.remedies.GradNormBalancer)."),
    "weak-contrastive-signal": (
        "Give InfoNCE informative negatives: mixed batches, or a cross-batch memory bank "
        "(gradprobe.remedies.MemoryBank with gradprobe.remedies.info_nce(..., memory=bank, "
        "groups=...)); check that positives are really paired with their anchors."),
    "prototype-stale": (
        "Update the prototypes inside the training loop, every step, from the current features "
        "(momentum p <- mu p + (1 - mu) mean(z of the group)), and check with an ablation that "
        "the update runs."),
    "prototype-collapse": (
        "Update each prototype from its own group only, add a contrastive prototype loss with "
        "other-group negatives (gradprobe.remedies.info_nce, gradprobe.remedies.MemoryBank), "
        "and lower the prototype pull."),
    "orthogonality-vanishing": (
        "Use a scale-invariant decoupling loss (squared correlation: "
        "gradprobe.remedies.correlation_loss), or normalise the latents before the "
        "orthogonality loss."),
    "latent-dependence": (
        "Decouple by correlation (gradprobe.remedies.correlation_loss) with a weight balanced "
        "against the task (gradprobe.remedies.GradNormBalancer); if the dependence is real in "
        "the data, model it (an interaction term: gradprobe.remedies.interaction_energy)."),
    "sigmoid-saturation": (
        "Train the output with cross-entropy on the logits (binary_cross_entropy_with_logits), "
        "which keeps a gradient sigmoid(x) - y where an output is wrong; scale the logits down "
        "or learn a temperature (gradprobe.remedies.LearnableTemperature); bring energy terms "
        "to one scale (gradprobe.remedies.interaction_energy)."),
    "static-loss-weights": (
        "Schedule or adapt the weights of the losses that suffer: "
        "gradprobe.remedies.GradNormBalancer for gradient-norm balancing, "
        "gradprobe.remedies.linear_ramp for a curriculum."),
    "batch-composition-mismatch": (
        "Check that the batch sampler is the one the DataLoader actually uses (batch_sampler=), "
        "or declare the intended composition; for cross-group negatives without mixed batches "
        "use gradprobe.remedies.MemoryBank."),
    "overfitting": (
        "Stop early at the validation minimum, regularise (gradprobe.remedies.l1_penalty, "
        "weight decay, more data or augmentation), and give the model the structure the data "
        "needs instead of capacity to memorise (e.g. gradprobe.remedies.interaction_energy)."),
    "inert-loss": (
        "Wire the loss to the model: compute it from non-detached tensors that depend on the "
        "shared parameters (a detach() or torch.no_grad() on its input is the usual cause), and "
        "check each designed loss with an ablation."),
    "non-finite": (
        "Start from the first non-finite value (the finding names the loss or quantity and "
        "the step): guard logs and divisions with an epsilon, lower the learning rate or clip "
        "gradients; a saturating sigmoid or an unnormalised loss is a common source "
        "(gradprobe.remedies.LearnableTemperature, gradprobe.remedies.correlation_loss)."),
    "probe-incomplete": (
        "Fix what the message names and record again: a module that returns a tuple, dict or "
        "dataclass needs watch_latent(name, module, select=...); a run without probe steps "
        "needs probe.backward (or before_backward/after_backward) called in the loop, and the "
        "run_file= path analysed must be the one written; docs/errors.md lists every message."),
}
