"""Dependence between two latents of the same n rows: linear CKA and the largest absolute
correlation between their columns, with its null level for independent data.

Inputs are ``n x d`` matrices (rows = samples), upcast to float64; see docs/metrics.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from scipy import special
from torch import Tensor

from ._common import as_matrix, centre, check_positive_int, small_gram

__all__ = [
    "linear_cka",
    "max_abs_correlation",
    "max_abs_correlation_null",
]


@torch.no_grad()
def linear_cka(x: Tensor, y: Tensor, debiased: bool = True) -> float:
    r"""Linear centred kernel alignment (Kornblith et al., "Similarity of Neural
    Network Representations Revisited", ICML 2019).

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = X X^T``, ``L = Y Y^T``
    of the column-centred features. Biased: ``HSIC ∝ ||X^T Y||_F^2``. Debiased
    (default): the unbiased HSIC estimator of Song et al. (JMLR 2012), as used by
    Nguyen, Raghu & Kornblith (ICLR 2021):
    ``[tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))``
    with ``K~`` = K with zeroed diagonal, evaluated in O(n d) from the features.

    CKA(x, x) = 1; invariant to orthogonal transforms and isotropic scaling of either
    input. Null (independent data): biased CKA has a positive floor that grows with
    d/n (~0.2 for two independent 64-d Gaussians at n = 256); debiased ~0 (can be
    slightly negative). Requires n >= 4 (debiased) or n >= 2 (biased), else
    ``ValueError``. If either input has no variance (or its unbiased self-HSIC is
    <= 0) the result is 0.0.
    """
    a, b = _row_pair(x, y)
    need = 4 if debiased else 2
    if a.shape[0] < need:
        raise ValueError(f"linear_cka(debiased={debiased}) needs at least {need} rows, got n = {a.shape[0]}")
    return float(linear_cka_of(centre(a), centre(b), debiased))


def _row_pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    a = as_matrix(x, "x")
    b = as_matrix(y, "y").to(a.device)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"x and y must have the same number of rows: x is (n, dx) = {tuple(a.shape)}, y is {tuple(b.shape)}")
    return a, b


def linear_cka_of(a: Tensor, b: Tensor, debiased: bool) -> Tensor:
    """Linear CKA of column-centred ``a`` and ``b`` (see :func:`linear_cka`), a 0-dim tensor."""
    n = a.shape[0]

    def cross_sq(p: Tensor, q: Tensor) -> Tensor:  # ||P^T Q||_F^2 == tr(P P^T Q Q^T)
        if p.shape[1] * q.shape[1] <= n * n:
            m = p.T @ q
            return (m * m).sum()
        return ((p @ p.T) * (q @ q.T)).sum()

    def self_sq(p: Tensor) -> Tensor:
        g = small_gram(p)
        return (g * g).sum()

    # HSIC(K, L), HSIC(K, K), HSIC(L, L) side by side: one op serves all three.
    traces = torch.stack([cross_sq(a, b), self_sq(a), self_sq(b)])
    if not debiased:
        hxy, hxx, hyy = traces
    else:
        ka = (a * a).sum(dim=1)  # diag(K)
        kb = (b * b).sum(dim=1)
        dk, dl = torch.stack([ka, ka, kb]), torch.stack([kb, ka, kb])
        cross = (dk * dl).sum(dim=1)  # 1^T K~ L~ 1 = (K~1).(L~1) = diag(K).diag(L)
        tr_t = traces - cross
        sum_k = -dk.sum(dim=1)  # 1^T K~ 1 for centred features
        sum_l = -dl.sum(dim=1)
        hxy, hxx, hyy = (tr_t + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) \
            / (n * (n - 3))
    defined = (hxx > 0) & (hyy > 0)
    denominator = torch.sqrt(torch.where(defined, hxx * hyy, torch.ones_like(hxx)))
    return torch.where(defined, hxy / denominator, torch.zeros_like(hxy))


def _standardised_columns(x: Tensor) -> Tensor:
    """Centred columns scaled to unit norm; (numerically) constant columns -> 0."""
    xc = centre(x)
    norms = torch.linalg.vector_norm(xc, dim=0)
    scale = x.abs().amax(dim=0) * math.sqrt(x.shape[0])
    const = (x.amax(dim=0) == x.amin(dim=0)) | (norms <= 1e-12 * scale)
    safe = torch.where(const, torch.ones_like(norms), norms)
    return torch.where(const[None, :], torch.zeros_like(xc), xc / safe)


@torch.no_grad()
def max_abs_correlation(x: Tensor, y: Tensor) -> float:
    r"""``max_{j,k} |r(x_:j, y_:k)|``: the largest absolute Pearson correlation between
    any column of ``x`` (n x dx) and any column of ``y`` (n x dy).

    Constant columns contribute 0 (0.0 if all are constant). Cost O(n dx dy).
    Null: :func:`max_abs_correlation_null`. Requires n >= 2 (n = 2 gives 1.0 for
    any non-constant columns), else ``ValueError``.
    """
    a, b = _row_pair(x, y)
    if a.shape[0] < 2:
        raise ValueError(f"max_abs_correlation needs at least 2 rows, got n = {a.shape[0]}")
    return float(max_abs_correlation_of(a, b))


def max_abs_correlation_of(a: Tensor, b: Tensor) -> Tensor:
    r = _standardised_columns(a).T @ _standardised_columns(b)
    return r.abs().max().clamp_max(1.0)


@functools.lru_cache(maxsize=256)
def _max_corr_null_analytic(n: int, m: int) -> float:
    if n == 2:
        return 1.0
    b = (n - 2) / 2.0
    # E[max of m i.i.d. |r|] = int_0^1 (1 - F(x)^m) dx with r^2 ~ Beta(1/2, (n-2)/2)
    xs = np.linspace(0.0, 1.0, 200_001)
    sf = special.betaincc(0.5, b, xs * xs)
    with np.errstate(divide="ignore"):
        cdf_m = np.exp(m * np.log1p(-np.minimum(sf, 1.0)))
    return float(np.trapezoid(1.0 - cdf_m, xs))


@functools.lru_cache(maxsize=64)
def _max_corr_null_mc(n: int, dx: int, dy: int, seed: int, reps: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(reps):
        a = torch.randn(n, dx, generator=gen, dtype=torch.float64)
        b = torch.randn(n, dy, generator=gen, dtype=torch.float64)
        vals.append(max_abs_correlation(a, b))
    return float(np.mean(vals))


def max_abs_correlation_null(
    n: int, dx: int, dy: int, seed: int = 0, method: str = "analytic", reps: int = 32
) -> float:
    r"""Expected :func:`max_abs_correlation` for independent Gaussian data of shape
    (n, dx) and (n, dy).

    ``method="analytic"`` (default): under independence ``r^2 ~ Beta(1/2, (n-2)/2)``
    exactly; treating the ``m = dx dy`` correlations as independent,
    ``E[max |r|] = int_0^1 (1 - F(x)^m) dx`` (numerical quadrature, cached; the seed
    is unused). ``method="montecarlo"``: mean over ``reps`` seeded samples (cached).
    The two agree to a few percent (tested). Requires n >= 2; n = 2 -> 1.0.
    """
    n = check_positive_int(n, "n", minimum=2)
    dx = check_positive_int(dx, "dx")
    dy = check_positive_int(dy, "dy")
    seed = check_positive_int(seed, "seed", minimum=0)
    if method == "analytic":
        return _max_corr_null_analytic(n, dx * dy)
    if method == "montecarlo":
        return _max_corr_null_mc(n, dx, dy, seed, check_positive_int(reps, "reps"))
    raise ValueError(f"method must be 'analytic' or 'montecarlo', got {method!r}")
