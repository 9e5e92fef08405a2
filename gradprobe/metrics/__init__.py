"""Pure metric functions of gradprobe.

Every function takes tensors (or array-likes), computes under ``torch.no_grad()`` in
float64 and returns a Python float, a small tensor or a small dict. Non-finite input
raises ``ValueError("... contains NaN/Inf ...")``; see docs/metrics.md for formulas,
references, null levels and the edge-case policy.

The ``*_summary`` functions (and ``latent_spectrum``, ``latent_statistics``) are the probe's
path: dicts of tensors on the input's device, computed without reading a value on the host;
a non-finite input is a ``finite`` flag there, not an exception.
"""

from .batch import batch_summary, group_diversity
from .contrastive import contrastive_signal
from .dependence import linear_cka, max_abs_correlation, max_abs_correlation_null
from .gradients import gram_from_gradients, gram_statistics, gram_summary
from .latents import latent_pair_summary, latent_spectrum, latent_statistics, latent_summary
from .prototypes import prototype_drift, prototype_lag, prototype_spread, prototype_usage
from .representation import (
    active_units,
    alignment,
    effective_rank,
    effective_rank_centred,
    isotropic_effective_rank,
    isotropic_participation_ratio,
    latent_norm,
    normalized_std,
    participation_ratio,
    singular_spectrum,
    total_variance,
    uniformity,
)
from .saturation import (
    SATURATION_THRESHOLD,
    energy_scale_ratio,
    mean_sigmoid_grad,
    saturated_fraction,
    saturated_wrong_fraction,
    saturation_histogram,
    saturation_histogram_edges,
    saturation_summary,
)

__all__ = [
    "SATURATION_THRESHOLD",
    "active_units",
    "alignment",
    "batch_summary",
    "contrastive_signal",
    "effective_rank",
    "effective_rank_centred",
    "energy_scale_ratio",
    "gram_from_gradients",
    "gram_statistics",
    "gram_summary",
    "group_diversity",
    "isotropic_effective_rank",
    "isotropic_participation_ratio",
    "latent_norm",
    "latent_pair_summary",
    "latent_spectrum",
    "latent_statistics",
    "latent_summary",
    "linear_cka",
    "max_abs_correlation",
    "max_abs_correlation_null",
    "mean_sigmoid_grad",
    "normalized_std",
    "participation_ratio",
    "prototype_drift",
    "prototype_lag",
    "prototype_spread",
    "prototype_usage",
    "saturated_fraction",
    "saturated_wrong_fraction",
    "saturation_histogram",
    "saturation_histogram_edges",
    "saturation_summary",
    "singular_spectrum",
    "total_variance",
    "uniformity",
]
