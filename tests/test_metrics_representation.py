"""Representation metrics against independent numpy/scipy computations."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import ortho_group, pearsonr

import gradprobe.metrics as M


def rankme_np(x, centred=False):
    x = np.asarray(x, dtype=np.float64)
    m = min(x.shape)
    if centred:
        lam = np.sort(np.linalg.eigvalsh(np.cov(x.T).reshape(x.shape[1], x.shape[1])))[::-1][:m]
        v = np.clip(lam, 0, None)
    else:
        v = np.linalg.svd(x, compute_uv=False)
    p = v / v.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def equal_sv_matrix(n, d, k, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return scale * u @ v.T


@pytest.mark.parametrize("shape", [(200, 30), (20, 60), (64, 64), (1, 8), (9, 1)])
def test_effective_rank_matches_numpy_svd(shape):
    x = np.random.default_rng(1).standard_normal(shape) * np.linspace(0.1, 3, shape[1])
    assert M.effective_rank(torch.tensor(x)) == pytest.approx(rankme_np(x), rel=1e-9)
    assert M.effective_rank(torch.tensor(x), method="svd") == pytest.approx(rankme_np(x), rel=1e-9)


@pytest.mark.parametrize("n,d,k", [(100, 40, 1), (100, 40, 7), (30, 90, 12), (50, 50, 50)])
def test_effective_rank_equal_singular_values_gives_k(n, d, k):
    x = torch.tensor(equal_sv_matrix(n, d, k))
    # eps term: p = 1/k + 1e-7 on k values, 1e-7 on the others -> tiny excess over k
    assert M.effective_rank(x) == pytest.approx(k, rel=1e-4)


def test_effective_rank_collapse_to_one_vector_is_one():
    v = torch.randn(1, 32)
    x = v.repeat(500, 1)
    assert M.effective_rank(x) == pytest.approx(1.0, abs=1e-3)
    assert M.effective_rank_centred(x) == 0.0
    assert M.participation_ratio(x) == 0.0


def test_effective_rank_centred_matches_covariance_eigs():
    x = np.random.default_rng(2).standard_normal((150, 20)) @ np.diag(np.linspace(0.2, 2.0, 20)) + 5.0
    assert M.effective_rank_centred(torch.tensor(x)) == pytest.approx(rankme_np(x, centred=True), rel=1e-9)
    # the uncentred rank is pulled down by the common offset; centring removes it
    assert M.effective_rank(torch.tensor(x)) < M.effective_rank(torch.tensor(x - x.mean(0))) - 5


def test_effective_rank_centred_n_less_than_d():
    x = np.random.default_rng(3).standard_normal((10, 40))
    lam = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2  # 10 values, last ~0
    p = lam / lam.sum() + 1e-7
    assert M.effective_rank_centred(torch.tensor(x)) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)


def test_participation_ratio_matches_eigs():
    x = np.random.default_rng(4).standard_normal((300, 25)) * np.linspace(0.5, 4.0, 25)
    lam = np.linalg.eigvalsh(np.cov(x.T))
    assert M.participation_ratio(torch.tensor(x)) == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-10)


def test_isotropic_effective_rank_is_reference_level():
    rng = np.random.default_rng(123)  # an independent generator
    for n, d in [(192, 48), (48, 192), (96, 96)]:
        ref = np.mean([rankme_np(rng.standard_normal((n, d))) for _ in range(2)])
        assert M.isotropic_effective_rank(n, d) == pytest.approx(ref, rel=0.01)
    # n >> d: close to d; n == d: clearly below d (Marchenko-Pastur)
    assert M.isotropic_effective_rank(4000, 16) > 15.8
    assert M.isotropic_effective_rank(128, 128) < 0.9 * 128
    assert M.isotropic_effective_rank(128, 128) == M.isotropic_effective_rank(128, 128)
    c = M.isotropic_effective_rank(192, 48, centred=True)
    ref_c = np.mean([rankme_np(rng.standard_normal((192, 48)), centred=True) for _ in range(2)])
    assert c == pytest.approx(ref_c, rel=0.01)


@pytest.mark.parametrize("n,d", [(2, 10), (20, 1), (50, 8), (64, 256), (400, 100), (33, 33)])
def test_isotropic_participation_ratio_closed_form_vs_monte_carlo(n, d):
    rng = np.random.default_rng(5)
    prs = []
    for _ in range(300 if n * d < 5000 else 40):
        xc = rng.standard_normal((n, d))
        xc -= xc.mean(0)
        g = xc @ xc.T if n < d else xc.T @ xc  # same non-zero eigenvalues as the covariance
        prs.append(np.trace(g) ** 2 / (g**2).sum())
    assert M.isotropic_participation_ratio(n, d) == pytest.approx(np.mean(prs), rel=0.015)
    assert M.isotropic_participation_ratio(1, 5) == 0.0


def test_normalized_std_simsiam_levels():
    d = 128
    x = torch.randn(4000, d)
    assert M.normalized_std(x) == pytest.approx(1 / math.sqrt(d), rel=0.02)
    xn = x.numpy().astype(np.float64)
    xn = xn / np.linalg.norm(xn, axis=1, keepdims=True)
    assert M.normalized_std(x) == pytest.approx(xn.std(axis=0, ddof=1).mean(), rel=1e-6)
    collapsed = torch.randn(1, d).repeat(100, 1) + 1e-4 * torch.randn(100, d)
    assert M.normalized_std(collapsed) < 1e-3
    assert M.normalized_std(torch.randn(1, d)) == 0.0


def test_singular_spectrum_matches_numpy_and_pads():
    x = np.random.default_rng(6).standard_normal((50, 10)) * np.arange(1, 11)
    s = np.linalg.svd(x, compute_uv=False)
    out = M.singular_spectrum(torch.tensor(x), k=32)
    assert out.shape == (32,) and out.dtype == torch.float64
    np.testing.assert_allclose(out[:10].numpy(), s / s.sum(), rtol=1e-9)
    assert (out[10:] == 0).all() and float(out.sum()) == pytest.approx(1.0)
    top = M.singular_spectrum(torch.tensor(x), k=3)
    np.testing.assert_allclose(top.numpy(), s[:3] / s[:3].sum(), rtol=1e-9)
    sc = np.linalg.svd(x - x.mean(0), compute_uv=False)
    np.testing.assert_allclose(M.singular_spectrum(torch.tensor(x), k=10, centred=True).numpy(), sc / sc.sum(), rtol=1e-9)
    assert (M.singular_spectrum(torch.zeros(5, 4), k=6) == 0).all()


def test_alignment_uniformity_match_wang_isola_formulas():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((60, 16)), rng.standard_normal((60, 16))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    assert M.alignment(torch.tensor(a), torch.tensor(b)) == pytest.approx((np.linalg.norm(an - bn, axis=1) ** 2).mean(), rel=1e-10)
    assert M.alignment(torch.tensor(a), torch.tensor(b), alpha=1) == pytest.approx(np.linalg.norm(an - bn, axis=1).mean(), rel=1e-10)
    for t in (1.0, 2.0):
        ref = np.log(np.exp(-t * pdist(an, "sqeuclidean")).mean())
        assert M.uniformity(torch.tensor(a), t=t) == pytest.approx(ref, rel=1e-10)
    assert M.alignment(torch.tensor(a), torch.tensor(3 * a)) == pytest.approx(0.0, abs=1e-12)
    assert M.uniformity(torch.ones(10, 4)) == pytest.approx(0.0, abs=1e-12)
    # isotropic high-d: distance^2 ~ 2 -> ~ -2t
    assert M.uniformity(torch.randn(500, 512)) == pytest.approx(-4.0, abs=0.1)


def test_latent_norm():
    x = np.random.default_rng(8).standard_normal((40, 9))
    assert M.latent_norm(torch.tensor(x)) == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-12)
    assert M.latent_norm(torch.zeros(3, 2)) == 0.0


# ------------------------------------------------------------------------------- CKA


def hsic_unbiased_explicit(k, l):
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def cka_explicit(x, y, debiased):
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    if debiased:
        h = hsic_unbiased_explicit
    else:
        hm = np.eye(n) - np.ones((n, n)) / n

        def h(a, b):
            return np.trace(a @ hm @ b @ hm)

    return h(k, l) / np.sqrt(h(k, k) * h(l, l))


@pytest.mark.parametrize("debiased", [True, False])
@pytest.mark.parametrize("dims", [(6, 5), (40, 70), (3, 2)])
def test_linear_cka_matches_explicit_kernel_formula(debiased, dims):
    rng = np.random.default_rng(9)
    n = 30
    x = rng.standard_normal((n, dims[0])) + 2.0
    y = x[:, :1] * rng.standard_normal((1, dims[1])) + rng.standard_normal((n, dims[1]))
    assert M.linear_cka(torch.tensor(x), torch.tensor(y), debiased=debiased) == pytest.approx(
        cka_explicit(x, y, debiased), rel=1e-8, abs=1e-12
    )


def test_linear_cka_documented_claims():
    rng = np.random.default_rng(10)
    b, u = [], []
    for _ in range(5):
        x, y = torch.tensor(rng.standard_normal((256, 64))), torch.tensor(rng.standard_normal((256, 64)))
        b.append(M.linear_cka(x, y, debiased=False))
        u.append(M.linear_cka(x, y))
    assert 0.17 < np.mean(b) < 0.23  # the biased floor ~0.2
    assert abs(np.mean(u)) < 0.01
    x = torch.tensor(rng.standard_normal((100, 20)))
    y = torch.tensor(rng.standard_normal((100, 15))) + x[:, :15]
    for deb in (True, False):
        assert M.linear_cka(x, x, debiased=deb) == pytest.approx(1.0, abs=1e-12)
        q = torch.tensor(ortho_group.rvs(20, random_state=1))
        base = M.linear_cka(x, y, debiased=deb)
        assert 0.3 < base < 1
        assert M.linear_cka(x @ q, y, debiased=deb) == pytest.approx(base, rel=1e-10)
        assert M.linear_cka(7.5 * x, 0.01 * y, debiased=deb) == pytest.approx(base, rel=1e-10)
        assert M.linear_cka(y, x, debiased=deb) == pytest.approx(base, rel=1e-12)
    assert M.linear_cka(torch.ones(10, 3), x[:10]) == 0.0
    with pytest.raises(ValueError, match="at least 4 rows"):
        M.linear_cka(x[:3], y[:3])
    with pytest.raises(ValueError, match="same number of rows"):
        M.linear_cka(x, y[:50])


# ------------------------------------------------------------------------ correlation


def test_max_abs_correlation_matches_pearsonr():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((50, 4))
    y = rng.standard_normal((50, 3))
    y[:, 1] = 0.6 * x[:, 2] + rng.standard_normal(50) * 0.5
    y[:, 2] = 4.0  # constant -> contributes 0
    ref = max(abs(pearsonr(x[:, i], y[:, j])[0]) for i in range(4) for j in range(2))
    assert M.max_abs_correlation(torch.tensor(x), torch.tensor(y)) == pytest.approx(ref, rel=1e-10)
    assert M.max_abs_correlation(torch.tensor(x), torch.tensor(-2 * x[:, :1] + 1)) == pytest.approx(1.0)
    assert M.max_abs_correlation(torch.full((20, 3), 0.1), torch.tensor(x[:20])) == 0.0


def numpy_null(n, dx, dy, reps, rng):
    x = rng.standard_normal((reps, n, dx))
    y = rng.standard_normal((reps, n, dy))
    x = (x - x.mean(1, keepdims=True)) / np.linalg.norm(x - x.mean(1, keepdims=True), axis=1, keepdims=True)
    y = (y - y.mean(1, keepdims=True)) / np.linalg.norm(y - y.mean(1, keepdims=True), axis=1, keepdims=True)
    v = np.abs(np.einsum("rni,rnj->rij", x, y)).reshape(reps, -1).max(axis=1)
    return v.mean(), v.std() / np.sqrt(reps)


@pytest.mark.parametrize("n,dx,dy", [(20, 5, 3), (60, 6, 4), (100, 8, 8), (128, 16, 12)])
def test_max_abs_correlation_null_analytic_vs_numpy_monte_carlo(n, dx, dy):
    mean, se = numpy_null(n, dx, dy, 1500, np.random.default_rng(12))
    # the analytic value treats the dx*dy correlations as independent: accurate to < 1%
    assert abs(M.max_abs_correlation_null(n, dx, dy) - mean) < max(4 * se, 0.005 * mean)


def test_max_abs_correlation_null_montecarlo_and_special_cases():
    mean, se = numpy_null(60, 6, 4, 1500, np.random.default_rng(13))
    mc = M.max_abs_correlation_null(60, 6, 4, method="montecarlo", reps=128)
    assert abs(mc - mean) < 0.04 * mean  # 128 reps: SE ~1.5%
    assert mc == M.max_abs_correlation_null(60, 6, 4, method="montecarlo", reps=128)  # seeded
    assert M.max_abs_correlation_null(2, 3, 3) == 1.0
    # a single pair at n = 3: r^2 ~ Beta(1/2, 1/2), so E|r| = 2/pi
    assert M.max_abs_correlation_null(3, 1, 1) == pytest.approx(2 / math.pi, rel=1e-4)
    with pytest.raises(ValueError, match="method"):
        M.max_abs_correlation_null(10, 2, 2, method="exact")


def test_centred_rankme_ignores_a_drifting_mean():
    # Isotropic noise plus a common offset growing to 20x the noise's spread: the uncentred
    # RankMe falls, the centred one is that of the noise alone (numpy SVD of the centred data).
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 64, generator=gen, dtype=torch.float64)
    direction = torch.randn(64, generator=gen, dtype=torch.float64)
    direction /= direction.norm()
    for scale in (0.0, 20.0):
        z = noise + scale * math.sqrt(64) * direction
        s = np.linalg.svd((z - z.mean(0)).numpy(), compute_uv=False)
        p = s / s.sum() + 1e-7
        assert M.effective_rank(z, centred=True) == pytest.approx(
            float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    shifted = noise + 20.0 * math.sqrt(64) * direction
    assert M.effective_rank(shifted) < 0.3 * M.effective_rank(noise)
    assert M.effective_rank(shifted, centred=True) == pytest.approx(
        M.effective_rank(noise, centred=True), rel=1e-9)


def test_total_variance_and_active_units_match_numpy():
    gen = torch.Generator().manual_seed(1)
    # Eight units, three of which vary less than the 0.01 of Burda et al. (2016).
    scales = torch.tensor([1.0, 0.5, 0.2, 0.15, 0.11, 0.09, 0.05, 0.0], dtype=torch.float64)
    z = torch.randn(500, 8, generator=gen, dtype=torch.float64) * scales + 3.0
    var = np.var(z.numpy(), axis=0, ddof=1)
    assert M.total_variance(z) == pytest.approx(float(var.sum()), rel=1e-12)
    assert M.active_units(z) == float((var > 0.01).sum())
    assert M.active_units(z, threshold=0.1) == float((var > 0.1).sum())
    assert M.total_variance(z[:1]) == M.active_units(z[:1]) == 0.0
    with pytest.raises(ValueError):
        M.active_units(z, threshold=0.0)
