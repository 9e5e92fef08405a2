"""Prototype metrics against explicit numpy computations."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import entropy

import gradprobe.metrics as M


def test_prototype_drift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 6))
    b = a.copy()
    b[1] += 0.5
    b[3] *= 1 + 1e-9  # below the 1e-6 tolerance
    out = M.prototype_drift(torch.tensor(a), torch.tensor(b))
    assert out["relative"] == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a), rel=1e-12)
    np.testing.assert_allclose(out["per_prototype"].numpy(), np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1), rtol=1e-9, atol=1e-15)
    assert out["moved"].tolist() == [False, True, False, False, False]
    assert out["moved_fraction"] == pytest.approx(0.2)
    # stale table: nothing moves
    still = M.prototype_drift(torch.tensor(a), torch.tensor(a))
    assert still["relative"] == 0.0 and not still["moved"].any()
    # zero previous table: change measured against the new norm -> 1.0
    z = M.prototype_drift(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    assert z["relative"] == 1.0 and z["per_prototype"].tolist() == [1.0, 0.0] and z["moved"].tolist() == [True, False]
    with pytest.raises(ValueError, match=r"\(P, d\)"):
        M.prototype_drift(torch.zeros(2, 3), torch.zeros(3, 3))


def test_prototype_lag():
    rng = np.random.default_rng(1)
    e = np.concatenate([rng.standard_normal((20, 4)) * 2 + 10, rng.standard_normal((30, 4)) * 0.5])
    groups = np.array([2] * 20 + [0] * 30)
    p = rng.standard_normal((3, 4))
    lags = []
    for g in (0, 2):
        rows = e[groups == g]
        s = np.sqrt(rows.var(axis=0, ddof=1).mean())
        lags.append(np.linalg.norm(p[g] - rows.mean(0)) / s)
    assert M.prototype_lag(torch.tensor(p), torch.tensor(e), torch.tensor(groups)) == pytest.approx(np.mean(lags), rel=1e-10)
    # prototypes at the group means -> 0
    p2 = p.copy()
    p2[0], p2[2] = e[groups == 0].mean(0), e[groups == 2].mean(0)
    assert M.prototype_lag(torch.tensor(p2), torch.tensor(e), torch.tensor(groups)) == pytest.approx(0.0, abs=1e-12)
    # single-sample group falls back to the batch spread
    g1 = groups.copy()
    g1[0] = 1
    batch_s = np.sqrt(e.var(axis=0, ddof=1).mean())
    rows2 = e[g1 == 2]
    expect = np.mean([
        np.linalg.norm(p[0] - e[g1 == 0].mean(0)) / np.sqrt(e[g1 == 0].var(axis=0, ddof=1).mean()),
        np.linalg.norm(p[1] - e[0]) / batch_s,
        np.linalg.norm(p[2] - rows2.mean(0)) / np.sqrt(rows2.var(axis=0, ddof=1).mean()),
    ])
    assert M.prototype_lag(torch.tensor(p), torch.tensor(e), torch.tensor(g1)) == pytest.approx(expect, rel=1e-10)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        M.prototype_lag(torch.tensor(p), torch.tensor(e), torch.tensor(groups + 2))
    # constant batch: rms norm as the unit; zero batch: absolute distance
    assert M.prototype_lag(torch.zeros(1, 2), torch.full((3, 2), 3.0), torch.zeros(3)) == pytest.approx(1.0)
    assert M.prototype_lag(torch.tensor([[3.0, 4.0]]), torch.zeros(3, 2), torch.zeros(3)) == pytest.approx(5.0)


def test_prototype_spread():
    rng = np.random.default_rng(2)
    p = rng.standard_normal((7, 5))
    out = M.prototype_spread(torch.tensor(p))
    dist = pdist(p)
    assert out["min_distance"] == pytest.approx(dist.min(), rel=1e-9)
    assert out["mean_distance"] == pytest.approx(dist.mean(), rel=1e-9)
    s = np.linalg.svd(p, compute_uv=False)
    q = s / s.sum() + 1e-7
    assert out["effective_rank"] == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-9)
    collapsed = M.prototype_spread(torch.ones(4, 3))
    assert collapsed["min_distance"] == 0.0 and collapsed["effective_rank"] == pytest.approx(1.0, abs=1e-4)
    single = M.prototype_spread(torch.ones(1, 3))
    assert single["min_distance"] == 0.0 and single["mean_distance"] == 0.0


def test_prototype_usage():
    rng = np.random.default_rng(3)
    p = rng.standard_normal((4, 3)) * 5
    e = rng.standard_normal((100, 3)) * 5
    nearest = np.argmin(((e[:, None, :] - p[None, :, :]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=4)
    assert M.prototype_usage(torch.tensor(e), torch.tensor(p)) == pytest.approx(entropy(counts) / math.log(4), rel=1e-10)
    # everything near prototype 2 -> 0; equal usage -> 1
    assert M.prototype_usage(torch.tensor(p[2:3]).repeat(10, 1), torch.tensor(p)) == 0.0
    assert M.prototype_usage(torch.tensor(p).repeat(3, 1), torch.tensor(p)) == pytest.approx(1.0)
    assert M.prototype_usage(torch.tensor(e), torch.tensor(p[:1])) == 0.0


def test_prototype_lag_null_level_is_sqrt_d_over_n():
    g = torch.Generator().manual_seed(5)
    d, n_g = 16, 64
    lags = []
    for _ in range(20):
        e = torch.randn(n_g, d, generator=g, dtype=torch.float64) * 3 + 1
        lags.append(M.prototype_lag(torch.ones(1, d, dtype=torch.float64), e, torch.zeros(n_g)))
    assert np.mean(lags) == pytest.approx(math.sqrt(d / n_g), rel=0.1)
