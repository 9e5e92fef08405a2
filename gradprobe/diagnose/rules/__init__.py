"""One small rule per finding id, one module per family of what they read.

A rule is ``rule(run, thresholds, earlier) -> list[Finding]``: it reads only the quantities it
needs from the Run (nothing when they were not recorded) and receives ``earlier``, the findings
of the rules before it in :data:`RULES`, so that a rule about a cause (fixed loss weights) reads
the findings of the harm it explains instead of judging them again. docs/findings.md states
every rule precisely; docs/architecture.md says where a new one goes.
"""

from __future__ import annotations

from .batches import batch_composition_mismatch, weak_contrastive_signal
from .common import Earlier, Rule
from .gradients import gradient_conflict, gradient_swamping
from .inert import inert_loss
from .losses import constraint_neglect, non_finite, overfitting, static_loss_weights
from .prototypes import prototype_collapse, prototype_stale
from .recording import probe_incomplete
from .representations import latent_dependence, orthogonality_vanishing, representation_collapse
from .saturation import sigmoid_saturation

__all__ = ["Earlier", "RULES", "Rule"]

# In catalogue order; a rule that reads ``earlier`` comes after the rules it reads.
RULES: dict[str, Rule] = {
    "gradient-swamping": gradient_swamping,
    "constraint-neglect": constraint_neglect,
    "gradient-conflict": gradient_conflict,
    "representation-collapse": representation_collapse,
    "weak-contrastive-signal": weak_contrastive_signal,
    "prototype-stale": prototype_stale,
    "prototype-collapse": prototype_collapse,
    "orthogonality-vanishing": orthogonality_vanishing,
    "latent-dependence": latent_dependence,
    "sigmoid-saturation": sigmoid_saturation,
    "static-loss-weights": static_loss_weights,
    "batch-composition-mismatch": batch_composition_mismatch,
    "overfitting": overfitting,
    "inert-loss": inert_loss,
    "non-finite": non_finite,
    "probe-incomplete": probe_incomplete,
}
