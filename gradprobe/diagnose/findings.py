"""The finding record and the catalogue of finding ids (each traces to record-22)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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

SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}


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
    plot: dict | None = field(default=None)

    def __post_init__(self) -> None:
        if self.id not in FINDING_IDS:
            raise ValueError(f"unknown finding id {self.id!r}")
        if self.severity not in SEVERITY_ORDER:
            raise ValueError(f"unknown severity {self.severity!r}")
        self.evidence = json_clean(self.evidence)
        if self.steps is not None:
            self.steps = (int(self.steps[0]), int(self.steps[1]))

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


# The record-22 mechanism behind each id (the "why" of a finding), one or two sentences.
WHY: dict[str, str] = {
    "gradient-swamping": (
        "record-22, mathematical point 1: when one loss's weighted gradient dominates the shared "
        "parameters, the smaller losses barely move them, so the structure they encode is "
        "ignored (the root mechanism of the decoupling failure)."),
    "constraint-neglect": (
        "record-22, failure theorem: with swamped constraints the optimiser converges to a point "
        "where the task loss is ~0 while the constraint losses stay large: an overfitted solution "
        "that satisfies none of the designed geometry."),
    "gradient-conflict": (
        "record-22, mathematical point 4: losses whose gradients point against each other cancel "
        "on the shared parameters, which gives oscillation or stalls (PCGrad, Yu et al. 2020)."),
    "representation-collapse": (
        "record-22, mathematical point 3: a latent whose variance concentrates in a few "
        "directions carries little information; contracting losses (prototype pulls) drive it "
        "there."),
    "weak-contrastive-signal": (
        "record-22, mathematical point 2: InfoNCE learns only as much as its negatives differ "
        "from the positive; negatives from the anchor's own group (single-group batches) give a "
        "weak signal that cannot separate groups."),
    "prototype-stale": (
        "record-22, algorithmic point 1: prototypes whose update is not synchronised with the "
        "training loop summarise a latent that has since moved, so the prototype loss pulls "
        "features towards stale targets."),
    "prototype-collapse": (
        "record-22, mathematical point 3: momentum-averaged prototypes converge to feature means "
        "and, with the prototype loss contracting every feature, towards each other: the "
        "prototypes stop telling groups apart."),
    "orthogonality-vanishing": (
        "record-22, mathematical point 4 and algorithmic point 1: the gradient of ||z_I^T z_E||^2 "
        "vanishes as a latent's norm goes to 0, so an unnormalised orthogonality loss is "
        "satisfied by shrinking a latent instead of decoupling it."),
    "latent-dependence": (
        "record-22, biological point 1 and insight 4: the latents meant to be decoupled still "
        "share information; forcing strict orthogonality may be the wrong target, but the "
        "designed decoupling is not achieved."),
    "sigmoid-saturation": (
        "record-22, algorithmic point 4: with a fixed temperature and energy terms of different "
        "scale, (U_I - R_E) / T lands in the flat part of the sigmoid and the gradient vanishes."),
    "static-loss-weights": (
        "record-22, algorithmic point 2: auxiliary weights fixed for the whole run cannot follow "
        "the changing gradient scales, so swamping or conflict persists unchecked."),
    "batch-composition-mismatch": (
        "record-22, algorithmic point 3: the batches do not look as the sampler was meant to make "
        "them, so training and inference see differently organised data."),
    "overfitting": (
        "record-22, biological point 3: the model fits its training data (the task loss keeps "
        "falling) while the validation loss rises: it compensates a too-simple energy with "
        "memorised biases."),
    "inert-loss": (
        "record-22, algorithmic point 1 (implementation drift): a designed loss that moves no "
        "parameter, or none of the shared ones, is not wired into the model and constrains "
        "nothing."),
    "non-finite": (
        "A NaN or Inf in a loss, gradient or latent poisons every later update; the record's "
        "failure analysis presupposes finite training."),
    "probe-incomplete": (
        "The findings are only as complete as the record: a probe that disabled itself "
        "records nothing after that step, a dropped watch nothing of its quantity, and a run "
        "without a probe step nothing at all, so the absence of other findings says nothing "
        "about that part of the run."),
}

# The record's next steps (record point 24), naming the gradprobe piece that implements each.
REMEDY: dict[str, str] = {
    "gradient-swamping": (
        "Adapt the weights from gradient norms (next step 1): gradprobe.remedies.GradNormBalancer "
        "(update it from probe.last_grad_norms), or clip/normalise the dominant loss's gradient."),
    "constraint-neglect": (
        "Balance the gradients so the constraints are heard while the task still learns "
        "(gradprobe.remedies.GradNormBalancer) and stage the losses with a curriculum "
        "(gradprobe.remedies.linear_ramp); add L1 sparsity (gradprobe.remedies.l1_penalty) "
        "against memorisation."),
    "gradient-conflict": (
        "Replace strict orthogonality by correlation decoupling (next step 3: "
        "gradprobe.remedies.correlation_loss), balance the weights "
        "(gradprobe.remedies.GradNormBalancer), or project conflicting gradients (PCGrad)."),
    "representation-collapse": (
        "Add anti-collapse pressure: a contrastive term with cross-group negatives "
        "(gradprobe.remedies.info_nce with gradprobe.remedies.MemoryBank), lower the prototype "
        "weight, and balance the losses (gradprobe.remedies.GradNormBalancer)."),
    "weak-contrastive-signal": (
        "Give InfoNCE cross-group negatives (next step 2): a cross-batch memory bank "
        "(gradprobe.remedies.MemoryBank with gradprobe.remedies.info_nce(..., memory=bank, "
        "groups=...)) or mixed batches."),
    "prototype-stale": (
        "Update the prototypes inside the training loop, every step, from the current features "
        "(momentum p <- mu p + (1 - mu) mean(e_group)), and verify it with an ablation (next "
        "step 8)."),
    "prototype-collapse": (
        "Add anti-collapse measures (insight 3): a contrastive prototype loss with cross-group "
        "negatives (gradprobe.remedies.info_nce, gradprobe.remedies.MemoryBank), update each "
        "prototype from its own group only, and lower the prototype pull."),
    "orthogonality-vanishing": (
        "Replace ||z_I^T z_E||^2 by the scale-invariant squared correlation (next step 3: "
        "gradprobe.remedies.correlation_loss), or normalise the latents before the "
        "orthogonality loss."),
    "latent-dependence": (
        "Decouple by correlation (gradprobe.remedies.correlation_loss) with a weight balanced "
        "against the task (gradprobe.remedies.GradNormBalancer); if the dependence is "
        "biological, model it with an interaction energy (gradprobe.remedies.interaction_energy)."),
    "sigmoid-saturation": (
        "Make the temperature learnable (next step 5: gradprobe.remedies.LearnableTemperature, "
        "T = softplus(t)) and bring the energy terms to one scale; consider the interaction "
        "energy (gradprobe.remedies.interaction_energy)."),
    "static-loss-weights": (
        "Schedule or adapt the weights (next step 1): gradprobe.remedies.GradNormBalancer for "
        "gradient-norm balancing, gradprobe.remedies.linear_ramp for a curriculum that trains "
        "the task basis first."),
    "batch-composition-mismatch": (
        "Check that the batch sampler is the one the DataLoader actually uses (batch_sampler=), "
        "or declare the intended composition; for cross-group negatives without mixed batches "
        "use gradprobe.remedies.MemoryBank."),
    "overfitting": (
        "Add sparsity (next step 6: gradprobe.remedies.l1_penalty), an interaction term in the "
        "energy (next step 4: gradprobe.remedies.interaction_energy), early stopping at the "
        "validation minimum, and balanced constraints (gradprobe.remedies.GradNormBalancer)."),
    "inert-loss": (
        "Wire the loss to the model: compute it from non-detached tensors that depend on the "
        "shared parameters, and verify every designed component with an ablation (next step 8)."),
    "non-finite": (
        "Find the first non-finite value (the step below), guard logs/divisions with eps, lower "
        "the learning rate or clip gradients; a saturating sigmoid or an unnormalised loss is a "
        "common source (gradprobe.remedies.LearnableTemperature, "
        "gradprobe.remedies.correlation_loss)."),
    "probe-incomplete": (
        "Fix what the message names and record again: a module that returns a tuple, dict or "
        "dataclass needs watch_latent(name, module, select=...); a run without probe steps "
        "needs probe.backward (or before_backward/after_backward) called in the loop, and the "
        "log= path analysed must be the one written; docs/errors.md lists every message."),
}
