"""Pure metric functions of gradprobe.

Every function takes tensors (or array-likes), computes under ``torch.no_grad()`` in
float64 and returns a Python float, a small tensor or a small dict. Non-finite input
raises ``ValueError("... contains NaN/Inf ...")``; see docs/metrics.md for formulas,
references, null levels and the edge-case policy.

The ``*_summary`` functions (and ``latent_spectrum``, ``latent_statistics``) are the probe's
path: dicts of tensors on the input's device, computed without reading a value on the host;
a non-finite input is a ``finite`` flag there, not an exception.

The names are imported on first use (PEP 562), so the report reads the torch-free
:data:`SATURATION_THRESHOLD` and the histogram's bin edges (:mod:`.saturation_grid`) without
importing torch.
"""

from __future__ import annotations

from gradprobe._lazy import lazy_names

__all__, __getattr__, __dir__ = lazy_names(__name__, {
    ".batch": ("batch_summary", "group_diversity"),
    ".chance": ("closest_pair_by_chance",),
    ".contrastive": ("contrastive_signal",),
    ".dependence": ("linear_cka", "max_abs_correlation", "max_abs_correlation_null"),
    ".gradients": ("gram_from_gradients", "gram_statistics", "gram_summary"),
    ".latents": ("latent_pair_summary", "latent_spectrum", "latent_statistics", "latent_summary"),
    ".prototypes": ("prototype_assignments", "prototype_drift", "prototype_lag", "prototype_spread",
                    "prototype_usage"),
    ".usage": ("usage_entropy",),
    ".representation": ("active_units", "alignment", "effective_rank", "effective_rank_centred",
                        "isotropic_effective_rank", "isotropic_participation_ratio",
                        "latent_norm", "normalized_std", "participation_ratio",
                        "singular_spectrum", "total_variance", "uniformity"),
    ".saturation": ("energy_scale_ratio", "mean_sigmoid_grad", "saturated_fraction",
                    "saturated_wrong_fraction", "saturated_wrong_class_fraction",
                    "saturated_wrong_shares", "saturation_histogram",
                    "saturation_histogram_edges", "saturation_summary"),
    ".saturation_grid": ("SATURATION_THRESHOLD",),
})
