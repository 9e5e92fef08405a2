"""The device-side summaries of the probe path: equal to the float metrics and to independent
numpy formulas, and free of host synchronisations (counted with a TorchDispatchMode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradprobe.metrics as M
from gradprobe.opcount import count_ops

from test_metrics_representation import hsic_unbiased_explicit

def rankme_np(values):
    p = values / values.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def latent_reference(x):
    """Every latent statistic from numpy's SVD and moments, no Gram matrix."""
    n, d = x.shape
    s = np.linalg.svd(x, compute_uv=False)
    lam = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    rows = x / np.where(np.linalg.norm(x, axis=1, keepdims=True) > 0,
                        np.linalg.norm(x, axis=1, keepdims=True), 1)
    k = min(32, d)
    top = np.zeros(k)
    top[:min(k, len(s))] = s[:k] / s[:k].sum()
    return {
        "effective_rank": rankme_np(s),
        "effective_rank_centred": rankme_np(lam),
        "participation_ratio": lam.sum() ** 2 / (lam ** 2).sum(),
        "normalized_std": rows.std(axis=0, ddof=1).mean(),
        "latent_norm": np.linalg.norm(x, axis=1).mean(),
        "active_units": float((x.var(axis=0, ddof=1) > 0.01).sum()),
        "singular_spectrum": top,
    }


LATENTS = {
    "tall": lambda rng: rng.standard_normal((300, 24)) * np.linspace(0.05, 3.0, 24) + 2.0,
    "wide": lambda rng: rng.standard_normal((20, 70)),
    "square": lambda rng: rng.standard_normal((48, 48)) @ np.diag(np.geomspace(1e-3, 1, 48)),
    "low rank": lambda rng: rng.standard_normal((200, 3)) @ rng.standard_normal((3, 40)),
}


@pytest.mark.parametrize("kind", sorted(LATENTS))
def test_latent_statistics_equal_the_float_metrics_and_numpy(kind):
    x = LATENTS[kind](np.random.default_rng(0))
    z = torch.tensor(x, dtype=torch.float64)
    stats = M.latent_statistics(z, k=min(32, x.shape[1]))
    ref = latent_reference(x)
    assert bool(stats["finite"])
    for key in ("effective_rank", "effective_rank_centred", "participation_ratio",
                "normalized_std", "latent_norm", "active_units"):
        assert float(stats[key]) == pytest.approx(ref[key], rel=1e-9), key
    np.testing.assert_allclose(stats["singular_spectrum"].numpy(), ref["singular_spectrum"],
                               rtol=1e-9, atol=1e-15)
    # The float metrics, which the diagnosis and users call, are the same numbers.
    assert float(stats["effective_rank"]) == pytest.approx(M.effective_rank(z), rel=1e-12)
    assert float(stats["effective_rank_centred"]) == pytest.approx(
        M.effective_rank_centred(z), rel=1e-12)
    assert float(stats["participation_ratio"]) == pytest.approx(M.participation_ratio(z),
                                                                rel=1e-12)
    assert float(stats["normalized_std"]) == M.normalized_std(z)
    assert float(stats["latent_norm"]) == M.latent_norm(z)
    np.testing.assert_allclose(stats["singular_spectrum"].numpy(),
                               M.singular_spectrum(z, k=min(32, x.shape[1])).numpy(), rtol=1e-12)


def test_latent_statistics_edge_values():
    collapsed = torch.randn(1, 16).repeat(50, 1)
    stats = M.latent_statistics(collapsed, k=4)
    assert float(stats["effective_rank"]) == pytest.approx(1.0, abs=1e-3)
    assert float(stats["effective_rank_centred"]) == 0.0
    assert float(stats["participation_ratio"]) == 0.0
    assert float(stats["active_units"]) == 0.0
    one_row = M.latent_statistics(torch.randn(1, 8), k=8)
    assert float(one_row["normalized_std"]) == 0.0 and float(one_row["active_units"]) == 0.0
    zero = M.latent_statistics(torch.zeros(5, 3), k=3)
    assert float(zero["effective_rank"]) == 0.0 and (zero["singular_spectrum"] == 0).all()
    # VAE: units with posterior-mean variance above 0.01 are active (Burda et al. 2016).
    means = torch.randn(400, 6, dtype=torch.float64) * torch.tensor([1, 1, 0.5, 0.05, 0.01, 0])
    assert float(M.latent_summary(means)["active_units"]) == 3.0


def test_non_finite_latent_is_a_flag_not_an_exception():
    z = torch.randn(40, 8)
    z[3, 2] = float("nan")
    stats = M.latent_statistics(z, k=8)
    assert not bool(stats["finite"])
    assert torch.isnan(stats["effective_rank"]) and torch.isnan(stats["singular_spectrum"]).all()
    z[3, 2] = float("inf")
    assert not bool(M.latent_summary(z)["finite"])


def test_latent_summary_reads_nothing_on_the_host_and_the_spectrum_decomposes_once():
    z = torch.randn(256, 128)
    M.latent_statistics(z)  # warm-up: lazy imports
    with count_ops() as summary_counts:
        summary = M.latent_summary(z)
    assert summary_counts.syncs == 0, summary_counts.sync_sites
    with count_ops() as spectrum_counts:
        M.latent_spectrum(summary["grams"])
    # One eigen-decomposition (of the stacked uncentred and centred Gram) for every spectral
    # metric; it is the only thing that would wait for a GPU, which is why it runs on the host.
    assert spectrum_counts.by_op["aten::_linalg_eigh"] == 1
    assert spectrum_counts.syncs == spectrum_counts.sync_ops == 1


def cka_np(x, y):
    """Debiased CKA from the explicit n x n unbiased HSIC estimator (Song et al. 2012)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l = xc @ xc.T, yc @ yc.T
    return hsic_unbiased_explicit(k, l) / np.sqrt(hsic_unbiased_explicit(k, k) *
                                                  hsic_unbiased_explicit(l, l))


def test_latent_pair_summary_equals_cka_and_correlation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 12))
    y = 0.7 * x[:, :6] @ rng.standard_normal((6, 9)) + rng.standard_normal((80, 9))
    y[:, 4] = 3.0  # a constant column contributes 0 to the correlation
    a, b = torch.tensor(x), torch.tensor(y)
    with count_ops() as counts:
        pair = M.latent_pair_summary(a, b)
    assert counts.syncs == 0, counts.sync_sites
    corr = np.corrcoef(x.T, np.delete(y, 4, axis=1).T)[:12, 12:]
    assert float(pair["max_abs_correlation"]) == pytest.approx(np.abs(corr).max(), rel=1e-10)
    assert float(pair["cka"]) == pytest.approx(cka_np(x, y), rel=1e-9)
    assert float(pair["cka"]) == pytest.approx(M.linear_cka(a, b), rel=1e-12)
    assert float(pair["max_abs_correlation"]) == M.max_abs_correlation(a, b)
    with pytest.raises(ValueError, match="at least 4"):
        M.latent_pair_summary(a[:3], b[:3])


def test_gram_summary_equals_gram_statistics_and_explicit_gradients():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((4, 60))
    g[1] = -0.4 * g[0] + 0.1 * rng.standard_normal(60)
    g[3] = 0.0
    w = np.array([1.0, 0.05, -0.1, 0.5])
    gram = torch.tensor(g @ g.T)
    weights = torch.tensor(w)
    with count_ops() as counts:
        out = M.gram_summary(gram, weights)
    assert counts.syncs == 0, counts.sync_sites
    norms = np.linalg.norm(g, axis=1)
    combined = g.T @ w
    np.testing.assert_allclose(out["norm"].numpy(), norms, rtol=1e-12)
    assert float(out["combined_norm"]) == pytest.approx(np.linalg.norm(combined), rel=1e-12)
    np.testing.assert_allclose(out["contribution"].numpy(),
                               w * (g @ combined) / (combined @ combined), rtol=1e-10)
    assert float(out["cosine"][0, 1]) == pytest.approx(
        g[0] @ g[1] / (norms[0] * norms[1]), rel=1e-12)
    assert bool(out["finite"]) and bool(out["conflict"][0, 1])
    floats = M.gram_statistics(gram, w)
    for key in ("norm", "weighted_norm", "cosine", "magnitude_similarity", "contribution",
                "conflict"):
        assert torch.equal(out[key], floats[key]), key
    assert float(out["combined_norm"]) == floats["combined_norm"]


def test_gram_summary_marks_a_non_finite_step():
    gram = torch.eye(3)
    gram[1, 1] = float("inf")
    out = M.gram_summary(gram, torch.ones(3))
    assert not bool(out["finite"])
    assert out["norm"].tolist() == [1.0, float("inf"), 1.0]
    assert torch.isnan(out["cosine"]).all() and torch.isnan(out["combined_norm"])
    assert not out["conflict"].any()


def test_saturation_summary_equals_the_float_metrics_and_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(5000) * 6.0
    u, r = rng.standard_normal(300) * 2.0, rng.standard_normal(200) * 0.5
    t = torch.tensor(x)
    with count_ops() as counts:
        out = M.saturation_summary(t, terms=(torch.tensor(u), torch.tensor(r)))
    assert counts.syncs == 0, counts.sync_sites
    s = 1 / (1 + np.exp(-x))
    assert float(out["saturated_fraction"]) == pytest.approx((np.abs(x) > 4.6).mean(), rel=1e-12)
    assert float(out["mean_sigmoid_grad"]) == pytest.approx((s * (1 - s)).mean(), rel=1e-10)
    edges = np.linspace(-20, 20, 42)
    counts_np, _ = np.histogram(np.clip(x, -20, 20), bins=edges)
    assert out["histogram"].tolist() == counts_np.tolist()
    assert float(out["energy_scale_ratio"]) == pytest.approx(u.std() / r.std(), rel=1e-12)
    assert bool(out["finite"])
    assert out["histogram"].tolist() == M.saturation_histogram(t).tolist()
    assert float(out["saturated_fraction"]) == M.saturated_fraction(t)
    assert float(out["mean_sigmoid_grad"]) == M.mean_sigmoid_grad(t)
    bad = t.clone()
    bad[7] = float("nan")
    assert not bool(M.saturation_summary(bad)["finite"])


@pytest.mark.parametrize("ids", [[3, 3, 3, 3], [0, 1, 2, 3, 4], [7], [-2, 5, 5, 900, -2, 5],
                                 list(np.random.default_rng(4).integers(0, 9, 257))])
def test_batch_summary_equals_group_diversity_and_unique_counts(ids):
    groups = torch.tensor(ids)
    with count_ops() as counts:
        out = M.batch_summary(groups)
    assert counts.syncs == 0, counts.sync_sites
    _, c = np.unique(ids, return_counts=True)
    n, q = len(ids), c / len(ids)
    assert float(out["distinct"]) == len(c)
    assert float(out["entropy"]) == pytest.approx(-(q * np.log(q)).sum(), abs=1e-12)
    share = 1.0 if n == 1 else (c * (c - 1)).sum() / (n * (n - 1))
    assert float(out["same_group_pair_share"]) == pytest.approx(share, rel=1e-12)
    assert float(out["largest_group_share"]) == pytest.approx(q.max(), rel=1e-12)
    assert float(out["batch_size"]) == n
    diversity = M.group_diversity(groups)
    assert diversity["distinct"] == len(c)
    assert diversity["entropy"] == float(out["entropy"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_summaries_on_cuda_equal_the_cpu_and_never_wait_for_the_device():
    z = torch.randn(512, 96) * torch.linspace(0.1, 2.0, 96)
    g = torch.randn(4, 300, dtype=torch.float64)
    gram, weights = g @ g.T, torch.ones(4, dtype=torch.float64)
    x = torch.randn(10_000) * 5
    groups = torch.randint(0, 8, (512,))
    inputs = (z, gram, weights, x, groups)
    on_cpu = (M.latent_summary(z), M.gram_summary(gram, weights), M.saturation_summary(x),
              M.batch_summary(groups))
    z, gram, weights, x, groups = (t.cuda() for t in inputs)
    torch.cuda.synchronize()
    with count_ops(cpu_as_device=False) as counts:
        on_gpu = (M.latent_summary(z), M.gram_summary(gram, weights), M.saturation_summary(x),
                  M.batch_summary(groups))
    assert counts.syncs == 0, counts.sync_sites
    for cpu_part, gpu_part in zip(on_cpu, on_gpu):
        for key, value in cpu_part.items():
            torch.testing.assert_close(gpu_part[key].cpu(), value, rtol=1e-9, atol=1e-12)
