"""Representation (latent) metrics: rank, collapse, geometry and dependence.

All functions take ``n x d`` matrices (rows = samples), upcast to float64 and
work from the smaller Gram matrix. See docs/metrics.md for the null levels and
the edge-case policy.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from scipy import special
from torch import Tensor

from ._common import (
    as_matrix,
    check_positive_float,
    check_positive_int,
    clean_eigenvalues,
    entropy_rank_of,
    l2_normalize_rows,
    psd_eigenvalues,
    small_gram,
    squared_singular_values,
)

__all__ = [
    "latent_summary",
    "latent_spectrum",
    "latent_statistics",
    "latent_pair_summary",
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
    "linear_cka",
    "max_abs_correlation",
    "max_abs_correlation_null",
    "latent_norm",
]


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


# The formulas, on float64 tensors: each is written once, here, and serves both the float
# metrics below and the device-side summaries at the end of this module (no host reads).


def _rankme(squared: Tensor) -> Tensor:
    """RankMe from squared singular values (the eigenvalues of the Gram matrix)."""
    return entropy_rank_of(torch.sqrt(squared))


def _participation_ratio(centred_gram: Tensor) -> Tensor:
    tr = torch.diagonal(centred_gram, dim1=-2, dim2=-1).sum(dim=-1)
    tr2 = (centred_gram * centred_gram).sum(dim=(-2, -1))
    defined = (tr > 0) & (tr2 > 0)
    return torch.where(defined, tr * tr / torch.where(defined, tr2, torch.ones_like(tr2)),
                       torch.zeros_like(tr))


def _normalized_std(x: Tensor) -> Tensor:
    if x.shape[0] < 2:  # a single sample has no spread
        return x.new_zeros(())
    return l2_normalize_rows(x).std(dim=0, unbiased=True).mean()


def _latent_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1).mean()


def _spectrum(squared: Tensor, k: int) -> Tensor:
    """Top-k singular values (from descending squared ones) over their sum, zero-padded to k."""
    s = torch.sqrt(squared[..., :k])
    if s.shape[-1] < k:
        s = torch.nn.functional.pad(s, (0, k - s.shape[-1]))
    total = s.sum(dim=-1, keepdim=True)
    positive = total > 0
    return torch.where(positive, s / torch.where(positive, total, torch.ones_like(total)),
                       torch.zeros_like(s))


def _total_variance(centred_gram: Tensor, n: int) -> Tensor:
    """The sum of the columns' unbiased variances: tr(Xc^T Xc) / (n - 1), 0 for one row."""
    if n < 2:
        return centred_gram.new_zeros(())
    return torch.diagonal(centred_gram, dim1=-2, dim2=-1).sum(dim=-1) / (n - 1)


ACTIVE_UNIT_VARIANCE = 0.01  # Burda et al. (2016)


def _active_units(x: Tensor, threshold: float = ACTIVE_UNIT_VARIANCE) -> Tensor:
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
        x = _centre(x)
    return float(_rankme(squared_singular_values(x, "z", method)))


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
    lam = squared_singular_values(_centre(x), "z")  # eigenvalues of the centred Gram
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
    return float(_participation_ratio(small_gram(_centre(x))))


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
    return float(_normalized_std(as_matrix(z, "z")))


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
    return float(_active_units(as_matrix(z, "z"), threshold))


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
        x = _centre(x)
    return _spectrum(squared_singular_values(x, "z"), k).cpu()


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
    return float(_latent_norm(as_matrix(z, "z")))


# --------------------------------------------------------------------------- dependence


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
    return float(_linear_cka(_centre(a), _centre(b), debiased))


def _row_pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    a = as_matrix(x, "x")
    b = as_matrix(y, "y").to(a.device)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"x and y must have the same number of rows: x is (n, dx) = {tuple(a.shape)}, y is {tuple(b.shape)}")
    return a, b


def _linear_cka(a: Tensor, b: Tensor, debiased: bool) -> Tensor:
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
    xc = _centre(x)
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
    return float(_max_abs_correlation(a, b))


def _max_abs_correlation(a: Tensor, b: Tensor) -> Tensor:
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



# ------------------------------------------------------- the probe path: device-side summaries


def _rows(z: Tensor, name: str = "z") -> Tensor:
    """A float64 [n, d] view of a latent; only its shape is checked (nothing read on the host)."""
    if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{name} must be a non-empty 2-D tensor of shape (n, d), got {shape}")
    if z.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {z.dtype}")
    return z.detach().to(torch.float64)


@torch.no_grad()
def latent_summary(z: Tensor) -> dict[str, Tensor]:
    r"""Everything the probe records of a latent ``z`` (n x d) except its eigenvalues, as
    tensors on ``z``'s device, computed without reading a value on the host.

    * ``grams`` (float64 [2, m, m], m = min(n, d)): the smaller Gram matrix of ``z``
      (``z^T z`` if n >= d, else ``z z^T``) and of its column-centred copy, from one batched
      matmul; :func:`latent_spectrum` turns them into the spectral metrics;
    * ``finite`` (bool): ``z`` and its Gram matrix are finite (a non-finite entry always
      makes a diagonal entry of the Gram non-finite); the other entries are meaningless
      where it is False;
    * ``participation_ratio``, ``normalized_std``, ``latent_norm``: as the functions of the
      same names (participation ratio from the centred Gram: tr G^2 and ||G||_F^2);
    * ``total_variance``: as :func:`total_variance` (the trace of the centred Gram over n - 1);
    * ``active_units``: the number of columns whose unbiased variance over the rows exceeds
      0.01 (Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016: a
      VAE's latent unit u is active if Cov_x(E_q[u | x]) > 10^-2; pass the posterior means).

    Float64, like every metric. ``ValueError`` only for a shape that is not (n, d).
    """
    x = _rows(z)
    pair = torch.stack([x, _centre(x)])
    grams = pair.mT @ pair if x.shape[0] >= x.shape[1] else pair @ pair.mT
    return {
        "grams": grams,
        "finite": torch.isfinite(torch.diagonal(grams[0])).all(),
        "participation_ratio": _participation_ratio(grams[1]),
        "normalized_std": _normalized_std(x),
        "latent_norm": _latent_norm(x),
        "total_variance": _total_variance(grams[1], x.shape[0]),
        "active_units": _active_units(x),
    }


@torch.no_grad()
def latent_spectrum(grams: Tensor, k: int = 32) -> dict[str, Tensor]:
    r"""The spectral metrics of a latent from the ``grams`` of :func:`latent_summary`: one
    eigen-decomposition (``eigvalsh`` of the stacked pair, cleaned as in every metric) serves

    * ``effective_rank`` (RankMe of the uncentred Gram's eigenvalues, :func:`effective_rank`),
    * ``effective_rank_centred`` (:func:`effective_rank_centred`),
    * ``rankme_centred`` (RankMe of the centred Gram's eigenvalues, :func:`effective_rank` with
      ``centred=True``),
    * ``singular_spectrum`` (float64 [k], :func:`singular_spectrum` with ``centred=False``).

    Tensors on the device of ``grams``; NaN when the Gram matrices are not finite. Meant to
    run on the host, off the training thread: on a CUDA device ``eigvalsh`` waits for the
    device (PyTorch reads LAPACK's error code on the host), see docs/performance.md.
    """
    k = check_positive_int(k, "k")
    finite = torch.isfinite(grams).all()
    ev = clean_eigenvalues(psd_eigenvalues(torch.where(finite, grams, torch.zeros_like(grams))))
    nan = torch.full_like(ev[0, 0], float("nan"))
    return {
        "effective_rank": torch.where(finite, _rankme(ev[0]), nan),
        "effective_rank_centred": torch.where(finite, entropy_rank_of(ev[1]), nan),
        "rankme_centred": torch.where(finite, _rankme(ev[1]), nan),
        "singular_spectrum": torch.where(finite, _spectrum(ev[0], k), nan),
    }


def latent_statistics(z: Tensor, k: int = 32) -> dict[str, Tensor]:
    """:func:`latent_summary` and :func:`latent_spectrum` of ``z`` in one dict, where ``z`` is
    (the eigen-decomposition included)."""
    summary = latent_summary(z)
    return {**summary, **latent_spectrum(summary["grams"], k)}


@torch.no_grad()
def latent_pair_summary(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    r"""Dependence between two latents of the same n rows, as 0-dim float64 tensors on the
    device of ``x``, computed without reading a value on the host: ``cka`` (debiased
    :func:`linear_cka`) and ``max_abs_correlation`` (:func:`max_abs_correlation`).

    ``ValueError`` for mismatched rows or n < 4 (shapes only).
    """
    a, b = _rows(x, "x"), _rows(y, "y").to(x.device)
    if a.shape[0] != b.shape[0] or a.shape[0] < 4:
        raise ValueError(f"x and y need the same number of rows, at least 4; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return {"cka": _linear_cka(_centre(a), _centre(b), debiased=True),
            "max_abs_correlation": _max_abs_correlation(a, b)}
