"""Per-loss gradient geometry from the Gram matrix ``G = J J^T``.

Following TorchJD (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024), the K x K Gram matrix of the per-loss gradients
``g_1..g_K`` (rows of the Jacobian ``J``) is the central object: norms, cosines,
magnitude similarities and the norm of any weighted combination follow from it
without touching the (huge) gradients again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import check_finite, to_tensor

__all__ = ["gram_statistics", "gram_from_gradients", "gram_summary"]


@torch.no_grad()
def gram_from_gradients(grads: Tensor | Sequence[Tensor]) -> Tensor:
    """Return ``G = J J^T`` (float64, K x K) from per-loss gradients.

    ``grads`` is either a K x P matrix whose rows are the flattened gradients
    ``g_k`` or a sequence of K tensors of any (equal total) size, each flattened.
    Raises ``ValueError`` for non-finite or mismatched input.
    """
    if isinstance(grads, Tensor):
        j = to_tensor(grads, "grads")
        if j.ndim != 2 or j.shape[0] == 0:
            raise ValueError(f"grads must be a 2-D tensor of shape (K, P), got shape {tuple(j.shape)}")
    else:
        rows = [to_tensor(g, f"grads[{i}]").reshape(-1) for i, g in enumerate(grads)]
        if not rows:
            raise ValueError("grads must contain at least one gradient")
        sizes = {r.numel() for r in rows}
        if len(sizes) != 1:
            raise ValueError(f"all gradients must have the same number of elements, got sizes {sorted(sizes)}")
        j = torch.stack([r.to(rows[0].device) for r in rows])
    check_finite(j, "grads")
    j = j.to(torch.float64)
    return j @ j.T


@torch.no_grad()
def gram_statistics(gram: Tensor, weights: Tensor | Sequence[float]) -> dict[str, Any]:
    r"""Gradient-interaction statistics from the Gram matrix of per-loss gradients.

    With ``G_ij = <g_i, g_j>`` and loss weights ``w``:

    * ``norm``: ``|g_k| = sqrt(G_kk)`` (Tensor[K]);
    * ``weighted_norm``: ``|w_k| |g_k|`` (Tensor[K]) - the gradient each weighted
      loss actually contributes (gradient swamping: Chen et al., GradNorm, ICML 2018);
    * ``cosine``: ``G_ij / (|g_i| |g_j|)``, 0 where a norm is 0 (Tensor[K, K]);
      conflicting gradients have cos < 0 (Yu et al., PCGrad, NeurIPS 2020);
    * ``magnitude_similarity``: ``2|g_i||g_j| / (|g_i|^2 + |g_j|^2)``, 0 where both
      norms are 0 (Yu et al. 2020) (Tensor[K, K]);
    * ``combined_norm``: ``|sum_k w_k g_k| = sqrt(w^T G w)`` (float);
    * ``conflict``: ``cosine < 0`` (bool Tensor[K, K]);
    * ``contribution`` (extra): ``w_k (G w)_k / (w^T G w)``, the share of the squared
      norm of the combined gradient owed to loss k (sums to 1; zeros if the combined
      gradient is 0) (Tensor[K]).

    Tensors are float64 on the CPU. ``gram`` is symmetrised and negative diagonal
    round-off is clamped to 0. Raises ``ValueError`` for a non-square or non-finite
    ``gram`` or for weights of the wrong length / non-finite weights.
    """
    g = to_tensor(gram, "gram")
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"gram must be a square 2-D tensor of shape (K, K), got shape {tuple(g.shape)}")
    check_finite(g, "gram")
    g = g.to(torch.float64).cpu()
    g = 0.5 * (g + g.T)
    k = g.shape[0]
    w = to_tensor(weights, "weights").reshape(-1)
    if w.numel() != k:
        raise ValueError(f"weights must have shape ({k},) to match gram of shape ({k}, {k}), got {w.numel()} values")
    check_finite(w, "weights")
    w = w.to(torch.float64).cpu()

    stats = _gram_statistics(g, w)
    stats["combined_norm"] = float(stats["combined_norm"])
    return stats


def _gram_statistics(g: Tensor, w: Tensor) -> dict[str, Tensor]:
    """The statistics of :func:`gram_statistics` from a symmetric float64 ``g`` and weights ``w``
    on one device, as tensors (``combined_norm`` 0-dim), computed without host reads."""
    sq = torch.diagonal(g).clamp_min(0.0)
    norm = torch.sqrt(sq)
    outer = norm[:, None] * norm[None, :]
    cosine = torch.where(outer > 0, g / torch.where(outer > 0, outer, torch.ones_like(outer)), torch.zeros_like(g))
    cosine = cosine.clamp(-1.0, 1.0)
    denom = sq[:, None] + sq[None, :]
    mag = torch.where(denom > 0, 2 * outer / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    gw = g @ w
    combined_sq = (w @ gw).clamp_min(0.0)
    positive = combined_sq > 0
    contribution = torch.where(positive, w * gw / torch.where(positive, combined_sq, 1.0),
                               torch.zeros_like(gw))
    return {
        "norm": norm,
        "weighted_norm": w.abs() * norm,
        "cosine": cosine,
        "magnitude_similarity": mag,
        "combined_norm": torch.sqrt(combined_sq),
        "conflict": cosine < 0,
        "contribution": contribution,
    }


@torch.no_grad()
def gram_summary(gram: Tensor, weights: Tensor) -> dict[str, Tensor]:
    r"""The statistics of :func:`gram_statistics` as tensors on the device of ``gram``,
    computed without reading a value on the host (the probe path).

    ``gram``: K x K (any float dtype, symmetrised here), ``weights``: K values (pass a tensor
    on ``gram``'s device: a copy from the host would wait for the device). Adds ``finite`` (bool): the Gram matrix and the weights are finite.
    Where they are not, ``norm`` and ``weighted_norm`` are what the diagonal gives (NaN/Inf)
    and every other entry is NaN (``conflict`` False), so a non-finite step is recorded as
    such rather than as numbers. ``ValueError`` only for shapes that do not fit.
    """
    if not isinstance(gram, Tensor) or gram.ndim != 2 or gram.shape[0] != gram.shape[1] \
            or gram.shape[0] == 0:
        raise ValueError(f"gram must be a square 2-D tensor of shape (K, K), got "
                         f"{tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__}")
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    w = torch.as_tensor(weights).detach().reshape(-1).to(g.device, torch.float64)
    if w.numel() != g.shape[0]:
        raise ValueError(f"weights must have shape ({g.shape[0]},) to match gram, got {w.numel()} values")
    finite = torch.isfinite(g).all() & torch.isfinite(w).all()
    stats = _gram_statistics(g, w)
    diagonal = torch.diagonal(g)
    stats["norm"] = torch.where(finite, stats["norm"], torch.sqrt(diagonal))
    stats["weighted_norm"] = w.abs() * stats["norm"]
    for key in ("cosine", "magnitude_similarity", "combined_norm", "contribution"):
        stats[key] = torch.where(finite, stats[key], torch.full_like(stats[key], float("nan")))
    stats["conflict"] = stats["cosine"] < 0
    stats["finite"] = finite
    return stats
