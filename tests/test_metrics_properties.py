"""Hypothesis property tests: shapes, ranges, invariances."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

import gradprobe.metrics as M

SETTINGS = dict(max_examples=25, deadline=None)


@st.composite
def matrices(draw, min_n=1, max_n=24, max_d=12):
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@given(matrices())
@settings(**SETTINGS)
def test_rank_bounds_and_scale_invariance(z):
    n, d = z.shape
    r = M.effective_rank(z)
    assert 1.0 - 1e-6 <= r <= min(n, d) * (1 + 1e-5)
    assert abs(M.effective_rank(3.7 * z) - r) < 1e-6 * r
    pr = M.participation_ratio(z)
    assert pr == 0.0 or 1.0 - 1e-9 <= pr <= min(n - 1, d) + 1e-9
    rc = M.effective_rank_centred(z)
    assert rc == 0.0 or rc <= min(n, d) * (1 + 1e-5)


@given(matrices(), st.integers(1, 40))
@settings(**SETTINGS)
def test_singular_spectrum_shape_and_sum(z, k):
    s = M.singular_spectrum(z, k=k)
    assert s.shape == (k,)
    assert abs(float(s.sum()) - 1.0) < 1e-9
    assert bool((s[:-1] >= s[1:] - 1e-15).all())


@given(matrices(min_n=4), st.integers(0, 10_000), st.booleans())
@settings(**SETTINGS)
def test_cka_symmetric_and_orthogonal_invariant(x, seed, debiased):
    g = torch.Generator().manual_seed(seed)
    y = x @ torch.randn(x.shape[1], 5, generator=g, dtype=torch.float64) + torch.randn(x.shape[0], 5, generator=g, dtype=torch.float64)
    c = M.linear_cka(x, y, debiased=debiased)
    assert abs(c - M.linear_cka(y, x, debiased=debiased)) < 1e-9
    if x.shape[1] > 1:
        q = torch.tensor(ortho_group.rvs(x.shape[1], random_state=seed))
        assert abs(M.linear_cka(x @ q, y, debiased=debiased) - c) < 1e-7
    if not debiased:
        assert -1e-12 <= c <= 1 + 1e-12


@given(st.lists(st.integers(0, 5), min_size=1, max_size=60))
@settings(**SETTINGS)
def test_group_diversity_properties(groups):
    out = M.group_diversity(groups)
    g = np.array(groups)
    assert out["distinct"] == len(set(groups))
    assert 0.0 <= out["entropy"] <= np.log(out["distinct"]) + 1e-12
    if len(g) > 1:
        same = sum(int(g[i] == g[j]) for i in range(len(g)) for j in range(len(g)) if i != j)
        assert abs(out["same_group_pair_share"] - same / (len(g) * (len(g) - 1))) < 1e-12


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=100), st.integers(1, 50), st.floats(0.5, 30))
@settings(**SETTINGS)
def test_histogram_counts_everything(xs, bins, limit):
    h = M.saturation_histogram(torch.tensor(xs), bins=bins, limit=limit)
    assert h.shape == (bins,) and int(h.sum()) == len(xs)
    frac = M.saturated_fraction(torch.tensor(xs))
    assert 0.0 <= frac <= 1.0 and 0.0 <= M.mean_sigmoid_grad(torch.tensor(xs)) <= 0.25


@given(matrices(min_n=2), st.floats(0.05, 2.0))
@settings(**SETTINGS)
def test_contrastive_ranges(z, tau):
    out = M.contrastive_signal(z, z.flip(0), temperature=tau, groups=torch.arange(z.shape[0]) % 2)
    k = z.shape[0] - 1
    assert 1.0 - 1e-9 <= out["effective_negatives"] <= k + 1e-9
    assert out["loss"] >= 0.0 and 0.0 <= out["same_group_negative_share"] <= 1.0
