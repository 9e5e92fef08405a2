"""Saturation metrics and group diversity against numpy/scipy."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

import gradprobe.metrics as M


def sig(x):
    return 1 / (1 + np.exp(-x))


def test_threshold_is_where_sigmoid_grad_drops_below_one_percent():
    assert sig(4.6) * (1 - sig(4.6)) < 0.01 < sig(4.55) * (1 - sig(4.55))


def test_saturated_fraction_and_mean_grad():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 7)) * 6
    assert M.saturated_fraction(torch.tensor(x)) == pytest.approx(np.mean(np.abs(x) > 4.6))
    assert M.saturated_fraction(torch.tensor(x), threshold=1.0) == pytest.approx(np.mean(np.abs(x) > 1.0))
    assert M.mean_sigmoid_grad(torch.tensor(x)) == pytest.approx(np.mean(sig(x) * (1 - sig(x))), rel=1e-12)
    assert M.mean_sigmoid_grad(torch.zeros(5)) == 0.25
    assert M.mean_sigmoid_grad(torch.full((3,), 800.0)) == pytest.approx(0.0, abs=1e-300)
    big = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert M.mean_sigmoid_grad(big) == pytest.approx(0.2067, abs=0.002)  # the documented null


def test_energy_scale_ratio():
    rng = np.random.default_rng(1)
    u, r = rng.standard_normal(100) * 50, rng.standard_normal(100) * 0.5
    assert M.energy_scale_ratio(torch.tensor(u), torch.tensor(r)) == pytest.approx(u.std() / r.std(), rel=1e-12)
    assert M.energy_scale_ratio(torch.tensor(r), torch.tensor(u)) == pytest.approx(u.std() / r.std(), rel=1e-12)
    assert M.energy_scale_ratio(torch.tensor(r), torch.tensor(u), symmetric=False) == pytest.approx(r.std() / u.std(), rel=1e-12)
    assert M.energy_scale_ratio(torch.ones(3), torch.ones(4)) == 1.0
    assert M.energy_scale_ratio(torch.ones(3), torch.tensor(u)) == math.inf
    assert M.energy_scale_ratio(torch.ones(3), torch.tensor(u), symmetric=False) == 0.0


def test_saturation_histogram_fixed_edges():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(1000) * 10 + 0.123  # stays off the edges
    edges = M.saturation_histogram_edges(41, 20.0)
    assert edges.shape == (42,) and float(edges[0]) == -20.0 and float(edges[-1]) == 20.0
    ref, _ = np.histogram(np.clip(x, -20, 20), bins=edges.numpy())
    out = M.saturation_histogram(torch.tensor(x))
    assert out.dtype == torch.int64 and out.tolist() == ref.tolist() and int(out.sum()) == 1000
    out = M.saturation_histogram(torch.tensor([-1e9, 1e9, 20.0, -20.0, 0.0]), bins=4, limit=2.0)
    assert out.tolist() == [2, 0, 1, 2]


def test_group_diversity():
    g = np.array([3, 3, 3, 1, 1, 7, 3, 1])
    out = M.group_diversity(torch.tensor(g))
    _, c = np.unique(g, return_counts=True)
    assert out["distinct"] == 3
    assert out["entropy"] == pytest.approx(entropy(c), rel=1e-12)
    pairs = [(i, j) for i in range(8) for j in range(8) if i != j]
    assert out["same_group_pair_share"] == pytest.approx(np.mean([g[i] == g[j] for i, j in pairs]))
    assert out["largest_group_share"] == pytest.approx(0.5)
    single = M.group_diversity(torch.zeros(64, dtype=torch.long))
    assert single["distinct"] == 1 and single["entropy"] == 0.0 and single["same_group_pair_share"] == 1.0
    assert M.group_diversity([5])["same_group_pair_share"] == 1.0
    with pytest.raises(ValueError, match="integer"):
        M.group_diversity(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        M.group_diversity(torch.zeros(2, 2))


def test_saturated_wrong_fraction_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 6, size=(50, 4))
    y = (rng.random((50, 4)) > 0.5).astype(float)
    expected = np.mean((np.abs(x) > 4.6) & (np.abs(sig(x) - y) > 0.5))
    assert M.saturated_wrong_fraction(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected)
    # Probabilities as targets, any shape with as many entries.
    p = rng.random(200)
    expected = np.mean((np.abs(x.reshape(-1)) > 2.0) & (np.abs(sig(x.reshape(-1)) - p) > 0.5))
    assert M.saturated_wrong_fraction(x, p, threshold=2.0) == pytest.approx(expected)
    # Saturated towards the targets: nothing wrong.
    assert M.saturated_wrong_fraction(torch.tensor([10.0, -10.0]), torch.tensor([1.0, 0.0])) == 0.0
    with pytest.raises(ValueError, match="as many entries"):
        M.saturated_wrong_fraction(torch.zeros(3), torch.zeros(4))


def test_saturated_wrong_class_fraction_is_the_worst_class_by_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 6, size=(40, 5))
    y = rng.random((40, 5))
    bad = (np.abs(x) > 4.6) & (np.abs(sig(x) - y) > 0.5)
    expected = max(bad[y >= 0.5].mean(), bad[y < 0.5].mean())
    assert M.saturated_wrong_class_fraction(torch.tensor(x), torch.tensor(y)) == \
        pytest.approx(expected)
    assert M.saturated_wrong_shares(x, y) == pytest.approx(
        {"saturated_wrong_fraction": bad.mean(), "saturated_wrong_class_fraction": expected})
    # A pairwise sigmoid loss over a batch of 128: every positive (the diagonal) saturated on
    # the wrong side, every negative on the right side. Over all logits that is 1/128, under
    # 1%; within the positives, all of them.
    n = 128
    logits, target = torch.full((n, n), -10.0), torch.eye(n)
    assert M.saturated_wrong_fraction(logits, target) == pytest.approx(1 / n)
    assert M.saturated_wrong_class_fraction(logits, target) == 1.0
    # One class absent from the batch is not counted; nothing wrong reads 0.
    assert M.saturated_wrong_class_fraction(torch.tensor([10.0, -10.0]),
                                            torch.tensor([0.0, 0.0])) == 0.5
    assert M.saturated_wrong_class_fraction(torch.tensor([10.0]), torch.tensor([1.0])) == 0.0
