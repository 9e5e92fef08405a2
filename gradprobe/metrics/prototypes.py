"""Prototype-table metrics: drift (staleness), lag behind the data, spread, usage.

Prototypes are a P x d matrix, one row per group (cell line); group ids are
integers indexing its rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._common import as_labels, as_matrix
from .representation import effective_rank
from .usage import usage_entropy

__all__ = ["prototype_assignments", "prototype_drift", "prototype_lag", "prototype_spread",
           "prototype_usage"]


@torch.no_grad()
def prototype_drift(p_prev: Tensor, p_now: Tensor, tol: float = 1e-6) -> dict[str, Any]:
    r"""How much the prototypes moved between two snapshots (stale-prototype check).

    * ``relative``: ``||p_now - p_prev||_F / ||p_prev||_F`` (float);
    * ``per_prototype``: ``||Δ_k|| / ||p_prev,k||`` per row (float64 CPU Tensor[P]);
    * ``moved``: ``||Δ_k|| > tol * max(||p_prev,k||, ||p_now,k||)`` (bool Tensor[P]);
    * ``moved_fraction`` (extra): mean of ``moved``.

    When a denominator is 0 (previous table / row all zero) it is replaced by the
    norm of the new value, so a change from 0 gives 1.0, and no change of a zero
    row gives 0.0. Shapes must match (P, d). An EMA prototype p <- mu p + (1-mu) m
    moves by (1 - mu)|m - p| per step; 0 means the update never ran.
    """
    a = as_matrix(p_prev, "p_prev", "(P, d)")
    b = as_matrix(p_now, "p_now", "(P, d)").to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"p_prev and p_now must have the same shape (P, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    delta = b - a
    dn = torch.linalg.vector_norm(delta, dim=1)
    an = torch.linalg.vector_norm(a, dim=1)
    bn = torch.linalg.vector_norm(b, dim=1)

    def rel(num: Tensor, den_prev: Tensor, den_now: Tensor) -> Tensor:
        den = torch.where(den_prev > 0, den_prev, den_now)
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    total = rel(
        torch.linalg.vector_norm(delta).reshape(1),
        torch.linalg.vector_norm(a).reshape(1),
        torch.linalg.vector_norm(b).reshape(1),
    )
    moved = dn > tol * torch.maximum(an, bn)
    return {
        "relative": float(total[0]),
        "per_prototype": rel(dn, an, bn).cpu(),
        "moved": moved.cpu(),
        "moved_fraction": float(moved.double().mean()),
    }


@torch.no_grad()
def prototype_lag(p: Tensor, e: Tensor, groups: Tensor) -> float:
    r"""How far each prototype lags behind its group's current batch mean, in units
    of the group's spread (momentum-average trap; Snell et al. 2017 prototypes).

    For every group g present in the batch:
    ``lag_g = ||p_g - mean(e[groups == g])|| / s_g`` with
    ``s_g = sqrt(mean_j var_j(e[groups == g]))`` (unbiased per-dim variance); the
    result is the mean of ``lag_g`` over present groups. ~0: prototype at the group
    mean; >> 1: the prototype sits outside its group (stale).

    Spread fallbacks (documented edge cases): a single-sample or constant group uses
    the spread of the whole batch; if the whole batch is constant, the rms row norm
    of ``e``; if that is 0 too, 1.0 (absolute distance). ``groups`` must be n integer
    ids in [0, P), else ``ValueError``.
    """
    pt = as_matrix(p, "p", "(P, d)")
    x = as_matrix(e, "e", "(n, d)").to(pt.device)
    if x.shape[1] != pt.shape[1]:
        raise ValueError(f"p (P, d) and e (n, d) must have the same d, got {tuple(pt.shape)} and {tuple(x.shape)}")
    g = as_labels(groups, "groups", x.shape[0])
    P = pt.shape[0]
    if int(g.min()) < 0 or int(g.max()) >= P:
        raise ValueError(f"groups must be integer ids in [0, {P}) indexing the rows of p, got range [{int(g.min())}, {int(g.max())}]")
    g = g.to(x.device)

    def spread(rows: Tensor) -> float:
        if rows.shape[0] < 2:
            return 0.0
        return math.sqrt(float(rows.var(dim=0, unbiased=True).mean()))

    batch_s = spread(x)
    if batch_s <= 0.0:
        batch_s = math.sqrt(float((x * x).sum(dim=1).mean()))
    if batch_s <= 0.0:
        batch_s = 1.0
    lags = []
    for gid in torch.unique(g).tolist():
        rows = x[g == gid]
        s = spread(rows)
        if s <= 0.0:
            s = batch_s
        lags.append(float(torch.linalg.vector_norm(pt[gid] - rows.mean(dim=0))) / s)
    return float(sum(lags) / len(lags))


@torch.no_grad()
def prototype_spread(p: Tensor) -> dict[str, float]:
    """Spread of the prototype table: ``min_distance`` and ``mean_distance`` over the
    P(P-1)/2 pairwise Euclidean distances, and ``effective_rank`` (RankMe of p).

    Collapsed prototypes: distances ~0, effective rank ~1. P = 1 -> both distances
    0.0 (the collapsed value: no pair exists).
    """
    x = as_matrix(p, "p", "(P, d)")
    P = x.shape[0]
    if P < 2:
        dmin = dmean = 0.0
    else:
        sq = (x * x).sum(dim=1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
        iu = torch.triu_indices(P, P, offset=1, device=x.device)
        dist = torch.sqrt(d2[iu[0], iu[1]])
        dmin, dmean = float(dist.min()), float(dist.mean())
    return {"min_distance": dmin, "mean_distance": dmean, "effective_rank": effective_rank(x)}


@torch.no_grad()
def prototype_assignments(e: Tensor, p: Tensor) -> Tensor:
    r"""How many rows of ``e`` have each prototype as their nearest (Euclidean; ties -> lowest
    index): an int64 CPU Tensor[P] that sums to n.

    Summed over many batches it is the usage of the prototype set itself, which one batch
    cannot show: a batch drawn from one group maps to one prototype by design, a collapsed set
    maps every batch to the same one.
    """
    x = as_matrix(e, "e", "(n, d)")
    pt = as_matrix(p, "p", "(P, d)").to(x.device)
    if x.shape[1] != pt.shape[1]:
        raise ValueError(f"e (n, d) and p (P, d) must have the same d, got {tuple(x.shape)} and {tuple(pt.shape)}")
    d2 = (pt * pt).sum(dim=1)[None, :] - 2.0 * (x @ pt.T)  # + |e|^2 does not change argmin
    return torch.bincount(torch.argmin(d2, dim=1).cpu(), minlength=pt.shape[0])


@torch.no_grad()
def prototype_usage(e: Tensor, p: Tensor) -> float:
    r"""Normalised entropy of the nearest-prototype assignment:
    ``H(c) / log P`` with ``c_k`` the share of rows of ``e`` whose nearest prototype
    (Euclidean; ties -> lowest index) is k (:func:`prototype_assignments`).

    1.0: all prototypes used equally; 0.0: every sample maps to one prototype
    (prototype collapse, or a single-group batch). P = 1 -> 0.0. Range [0, 1].
    """
    return usage_entropy(prototype_assignments(e, p).numpy())
