"""Reusable fixes named by gradprobe's diagnosis (record-22, record point 24).

Each piece is small, documented with what it does, why (the record-22 cause it answers) and a
reference, and maps to finding ids (see docs/remedies.md):

- :class:`GradNormBalancer`, :func:`grad_norms` -- adaptive loss weights from gradient norms
  (gradient-swamping, constraint-neglect, static-loss-weights).
- :class:`MemoryBank`, :func:`info_nce` -- cross-batch negatives from other groups
  (weak-contrastive-signal, batch-composition-mismatch).
- :func:`correlation_loss` -- scale-invariant decorrelation instead of strict orthogonality
  (orthogonality-vanishing, gradient-conflict, latent-dependence).
- :class:`LearnableTemperature` -- ``T = softplus(t)`` (sigmoid-saturation).
- :func:`interaction_energy` -- ``U - R + lam U R`` (overfitting from the linear energy).
- :func:`l1_penalty` -- sparsity on latents (overfitting).
- :func:`linear_ramp` -- curriculum factor for the decoupling losses (static-loss-weights).
"""

from .balancing import GradNormBalancer, grad_norms
from .contrastive import MemoryBank, info_nce
from .decoupling import correlation_loss, l1_penalty
from .energy import LearnableTemperature, interaction_energy
from .schedule import linear_ramp

__all__ = ["GradNormBalancer", "LearnableTemperature", "MemoryBank", "correlation_loss", "grad_norms",
           "info_nce", "interaction_energy", "l1_penalty", "linear_ramp"]
