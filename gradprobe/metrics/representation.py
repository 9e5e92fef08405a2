"""Representation metrics of one latent: rank, collapse and geometry.

All functions take ``n x d`` matrices (rows = samples), upcast to float64 and
work from the smaller Gram matrix. See docs/metrics.md for the null levels and
the edge-case policy. Dependence between two latents: :mod:`.dependence`; the probe's
device-side summaries of a latent: :mod:`.latents`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ._common import (
    as_matrix,
    centre,
    check_positive_float,
    check_positive_int,
    entropy_rank_of,
    l2_normalize_rows,
    small_gram,
    squared_singular_values,
)

__all__ = [
    "effective_rank",
    "effective_rank_centred",
    "participation_ratio",
    "isotropic_effective_rank",
    "isotropic_participation_ratio",
    "normalized_std",
    "total_variance",
    "active_units",
    "singular_spectrum",
    "alignment",
    "uniformity",
    "latent_norm",
]


# The formulas, on float64 tensors: each is written once, here, and serves both the float
# metrics below and the device-side summaries of :mod:`.latents` (no host reads).


def rankme_of(squared: Tensor) -> Tensor:
    """RankMe from squared singular values (the eigenvalues of the Gram matrix)."""
    return entropy_rank_of(torch.sqrt(squared))


def participation_ratio_of(centred_gram: Tensor) -> Tensor:
    tr = torch.diagonal(centred_gram, dim1=-2, dim2=-1).sum(dim=-1)
    tr2 = (centred_gram * centred_gram).sum(dim=(-2, -1))
    defined = (tr > 0) & (tr2 > 0)
    return torch.where(defined, tr * tr / torch.where(defined, tr2, torch.ones_like(tr2)),
                       torch.zeros_like(tr))


def normalized_std_of(x: Tensor) -> Tensor:
    if x.shape[0] < 2:  # a single sample has no spread
        return x.new_zeros(())
    return l2_normalize_rows(x).std(dim=0, unbiased=True).mean()


def latent_norm_of(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1).mean()


def spectrum_of(squared: Tensor, k: int) -> Tensor:
    """Top-k singular values (from descending squared ones) over their sum, zero-padded to k."""
    s = torch.sqrt(squared[..., :k])
    if s.shape[-1] < k:
        s = torch.nn.functional.pad(s, (0, k - s.shape[-1]))
    total = s.sum(dim=-1, keepdim=True)
    positive = total > 0
    return torch.where(positive, s / torch.where(positive, total, torch.ones_like(total)),
                       torch.zeros_like(s))


def total_variance_of(centred_gram: Tensor, n: int) -> Tensor:
    """The sum of the columns' unbiased variances: tr(Xc^T Xc) / (n - 1), 0 for one row."""
    if n < 2:
        return centred_gram.new_zeros(())
    return torch.diagonal(centred_gram, dim1=-2, dim2=-1).sum(dim=-1) / (n - 1)


ACTIVE_UNIT_VARIANCE = 0.01  # Burda et al. (2016)


def active_units_of(x: Tensor, threshold: float = ACTIVE_UNIT_VARIANCE) -> Tensor:
    """Columns whose (unbiased) variance over the rows exceeds ``threshold`` (a float64 count)."""
    if x.shape[0] < 2:
        return x.new_zeros(())
    return (x.var(dim=0, unbiased=True) > threshold).sum().to(x.dtype)


# --------------------------------------------------------------------------- rank


@torch.no_grad()
def effective_rank(z: Tensor, method: str = "gram", centred: bool = False) -> float:
    r"""RankMe (Garrido et al., "RankMe: Assessing the downstream performance of
    pretrained self-supervised representations by their rank", ICML 2023), uncentred
    by default.

    With the singular values ``s_1..s_m`` (m = min(n, d)) of the n x d matrix ``z``:
    ``p_k = s_k / sum(s) + 1e-7``, ``RankMe = exp(-sum_k p_k log p_k)``.
    ``centred=True``: of ``z - mean(z)`` (column means), so that a common offset, which
    carries no information about the inputs, is not counted as a direction (a mean that
    drifts lowers the uncentred RankMe of an unchanged spread).

    Range ~[1, min(n, d)]; a rank-r matrix with equal singular values gives r.
    Singular values come from the eigenvalues of the smaller Gram matrix
    (``method="gram"``, default) or ``torch.linalg.svdvals`` (``method="svd"``,
    falling back to the Gram eigenvalues if it does not converge).
    Edge cases: zero matrix -> 0.0; a single non-zero row or rows collapsed onto one
    vector -> ~1.0. Depends on n when n is not >> d: compare with
    :func:`isotropic_effective_rank`.
    """
    x = as_matrix(z, "z", check=False)  # finiteness is checked on the Gram matrix
    if centred:
        x = centre(x)
    return float(rankme_of(squared_singular_values(x, "z", method)))


@torch.no_grad()
def effective_rank_centred(z: Tensor) -> float:
    r"""RankMe over the eigenvalues of the covariance matrix (the reptrix variant).

    ``lambda_1..lambda_m`` (m = min(n, d)) are the eigenvalues of
    ``C = (z - mean)^T (z - mean) / (n - 1)``; ``p_k = lambda_k / sum(lambda) + 1e-7``;
    result ``exp(-sum p_k log p_k)``. Note it uses eigenvalues (squared singular
    values), so it is smaller than :func:`effective_rank` for non-flat spectra.
    Edge cases: constant columns / constant or zero matrix / n = 1 -> 0.0
    (no variance at all).
    """
    x = as_matrix(z, "z")
    lam = squared_singular_values(centre(x), "z")  # eigenvalues of the centred Gram
    return float(entropy_rank_of(lam))


@torch.no_grad()
def participation_ratio(z: Tensor) -> float:
    r"""Participation ratio ``(tr C)^2 / tr(C^2) = (sum lambda)^2 / sum lambda^2`` of
    the covariance C (Gao et al. 2017; Recanatesi et al. 2019).

    Computed without an eigendecomposition: ``tr C ∝ tr G`` and
    ``tr C^2 ∝ ||G||_F^2`` for the smaller Gram matrix G of the centred data.
    Range [1, min(n - 1, d)]; constant / zero input or n = 1 -> 0.0.
    """
    x = as_matrix(z, "z")
    return float(participation_ratio_of(small_gram(centre(x))))


@functools.lru_cache(maxsize=256)
def _isotropic_rank_cached(n: int, d: int, seed: int, centred: bool) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return effective_rank_centred(x) if centred else effective_rank(x)


def isotropic_effective_rank(n: int, d: int, seed: int = 0, centred: bool = False) -> float:
    """RankMe of one seeded ``n x d`` standard Gaussian sample (cached).

    The reference level for :func:`effective_rank` (or, with ``centred=True``,
    :func:`effective_rank_centred`) at the same shape: RankMe of an isotropic sample
    is below min(n, d) when n is not >> d (Marchenko-Pastur spread of singular
    values). The probe records ``rank / isotropic_effective_rank(n, d)``.
    Deterministic for given arguments (``torch.Generator().manual_seed(seed)``).
    """
    n = check_positive_int(n, "n")
    d = check_positive_int(d, "d")
    seed = check_positive_int(seed, "seed", minimum=0)
    return _isotropic_rank_cached(n, d, seed, bool(centred))


def isotropic_participation_ratio(n: int, d: int) -> float:
    r"""Expected participation ratio of an isotropic Gaussian ``n x d`` sample.

    The sample covariance is Wishart with ``m = n - 1`` degrees of freedom, for which
    ``E[(tr W)^2] = m d (m d + 2)`` and ``E[tr W^2] = m d (m + d + 1)``; the ratio of
    expectations gives ``(m d + 2) / (m + d + 1)`` (~ n d / (n + d)). It is exact
    for m = 1 or d = 1 (value 1) and within ~1% of Monte Carlo for n, d >= 8
    (tested). n = 1 -> 0.0 (no variance).
    """
    n = check_positive_int(n, "n")
    d = check_positive_int(d, "d")
    m = n - 1
    if m == 0:
        return 0.0
    return (m * d + 2.0) / (m + d + 1.0)


# ------------------------------------------------------------------ collapse / geometry


@torch.no_grad()
def normalized_std(z: Tensor) -> float:
    r"""Std of l2-normalised rows (SimSiam collapse indicator; Chen & He, "Exploring
    Simple Siamese Representation Learning", CVPR 2021), as lightly's
    ``std_of_l2_normalized``: ``mean_j std_i(z_ij / |z_i|)`` with the unbiased std.

    Healthy (isotropic) ~ 1/sqrt(d); complete collapse -> 0. Zero rows stay zero
    after normalisation. n = 1 -> 0.0 (a single sample has no spread).
    """
    return float(normalized_std_of(as_matrix(z, "z")))


@torch.no_grad()
def total_variance(z: Tensor) -> float:
    r"""Total variance ``tr C = sum_j var_i(z_ij)`` of the covariance (unbiased).

    Unlike the rank and :func:`normalized_std` it keeps the latent's scale and ignores its
    mean: a latent whose spread shrinks towards one point loses it, a latent that only
    drifts (a common offset) keeps it. Null: d for standard-Gaussian rows. n = 1 -> 0.0.
    """
    x = as_matrix(z, "z")
    if x.shape[0] < 2:
        return 0.0
    return float(x.var(dim=0, unbiased=True).sum())


@torch.no_grad()
def active_units(z: Tensor, threshold: float = ACTIVE_UNIT_VARIANCE) -> float:
    r"""Number of active units: dimensions whose variance over the inputs exceeds
    ``threshold``, ``#{j : var_i(z_ij) > threshold}`` (unbiased variance).

    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016: for a
    VAE's posterior mean ``z = E_q[u | x]`` a unit is active when ``Cov_x(E_q[u_j]) > 0.01``;
    with a standard-normal prior that scale is meaningful. A unit the KL term has pushed to
    the prior carries the same mean for every input (variance -> 0): posterior collapse
    leaves 0 active units. For latents whose scale is not anchored to a prior the count
    depends on the scale. Null: d for standard-Gaussian rows. n = 1 -> 0.0.
    """
    threshold = check_positive_float(threshold, "threshold")
    return float(active_units_of(as_matrix(z, "z"), threshold))


@torch.no_grad()
def singular_spectrum(z: Tensor, k: int = 32, centred: bool = False) -> Tensor:
    """Top-k singular values of ``z`` normalised to sum 1 (Jing et al.,
    "Understanding Dimensional Collapse in Contrastive Self-Supervised Learning",
    ICLR 2022, who plot the spectrum of the embedding covariance; use
    ``centred=True`` for that view).

    Returns a float64 CPU Tensor[k], descending, padded with zeros when
    min(n, d) < k. Zero matrix -> all zeros.
    """
    k = check_positive_int(k, "k")
    x = as_matrix(z, "z")
    if centred:
        x = centre(x)
    return spectrum_of(squared_singular_values(x, "z"), k).cpu()


@torch.no_grad()
def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    r"""Alignment ``E_i ||x_i - y_i||^alpha`` of l2-normalised positive pairs
    (Wang & Isola, "Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere", ICML 2020).

    Range [0, 2^alpha]; 0 = perfectly aligned pairs. Null (independent isotropic
    rows): ~2 for alpha = 2. Zero rows are left at zero.
    """
    alpha = check_positive_float(alpha, "alpha")
    x = as_matrix(z1, "z1")
    y = as_matrix(z2, "z2")
    if x.shape != y.shape:
        raise ValueError(f"z1 and z2 must have the same shape (n, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.to(x.device)
    diff = l2_normalize_rows(x) - l2_normalize_rows(y)
    return float(torch.linalg.vector_norm(diff, dim=1).pow(alpha).mean())


@torch.no_grad()
def uniformity(z: Tensor, t: float = 2.0) -> float:
    r"""Uniformity ``log E_{i<j} exp(-t ||x_i - x_j||^2)`` of l2-normalised rows
    (Wang & Isola, ICML 2020).

    Range [-4t, 0]: 0 = all rows identical (collapse), more negative = more uniform.
    Null for isotropic rows in high d: ~ -2t (pairs nearly orthogonal: distance^2 ~ 2).
    Cost O(n^2 d) time and O(n^2) memory. n = 1 -> 0.0 (the collapsed value).
    """
    t = check_positive_float(t, "t")
    x = as_matrix(z, "z")
    n = x.shape[0]
    if n < 2:
        return 0.0
    xn = l2_normalize_rows(x)
    sq = (xn * xn).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (xn @ xn.T)).clamp_min(0.0)
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    vals = -t * d2[iu[0], iu[1]]
    return float(torch.logsumexp(vals, dim=0) - math.log(vals.numel()))


@torch.no_grad()
def latent_norm(z: Tensor) -> float:
    """Mean l2 norm of the rows of ``z`` (``mean_i |z_i|``); 0.0 for a zero matrix."""
    return float(latent_norm_of(as_matrix(z, "z")))
