"""Edge-case policy shared by all metrics (see docs/metrics.md)."""

import numpy as np
import pytest
import torch

import gradprobe.metrics as M
from gradprobe.metrics import _common

Z = torch.randn(12, 5)
W = torch.randn(12, 5)

# (name, call taking a matrix z)
MATRIX_METRICS = [
    ("effective_rank", lambda z: M.effective_rank(z)),
    ("effective_rank_svd", lambda z: M.effective_rank(z, method="svd")),
    ("effective_rank_centred", lambda z: M.effective_rank_centred(z)),
    ("participation_ratio", lambda z: M.participation_ratio(z)),
    ("normalized_std", lambda z: M.normalized_std(z)),
    ("singular_spectrum", lambda z: M.singular_spectrum(z, k=4)),
    ("alignment", lambda z: M.alignment(z, W[: z.shape[0], : z.shape[1]] if z.ndim == 2 else z)),
    ("uniformity", lambda z: M.uniformity(z)),
    ("latent_norm", lambda z: M.latent_norm(z)),
    ("linear_cka", lambda z: M.linear_cka(z, W[: z.shape[0]] if z.ndim == 2 else z)),
    ("max_abs_correlation", lambda z: M.max_abs_correlation(z, W[: z.shape[0]] if z.ndim == 2 else z)),
    ("contrastive_signal", lambda z: M.contrastive_signal(z, z)),
    ("prototype_spread", lambda z: M.prototype_spread(z)),
    ("prototype_usage", lambda z: M.prototype_usage(z, W[:3, : z.shape[1]] if z.ndim == 2 else z)),
    ("prototype_drift", lambda z: M.prototype_drift(z, z)),
]


@pytest.mark.parametrize("name,fn", MATRIX_METRICS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_value_error(name, fn, bad):
    z = Z.clone()
    z[3, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        fn(z)


@pytest.mark.parametrize("name,fn", MATRIX_METRICS)
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_wrong_ndim_names_expected_shape(name, fn, shape):
    with pytest.raises(ValueError, match=r"2-D tensor of shape \("):
        fn(torch.randn(*shape))


@pytest.mark.parametrize("name,fn", MATRIX_METRICS)
def test_empty_raises(name, fn):
    with pytest.raises(ValueError, match="non-empty"):
        fn(torch.zeros(0, 5))


@pytest.mark.parametrize("fn", [M.saturated_fraction, M.mean_sigmoid_grad, M.saturation_histogram, M.latent_norm])
def test_non_finite_logits_raise(fn):
    x = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="NaN/Inf"):
        fn(x)


def test_non_finite_misc():
    with pytest.raises(ValueError, match="NaN/Inf"):
        M.energy_scale_ratio(torch.tensor([1.0, float("inf")]), torch.ones(2))
    with pytest.raises(ValueError, match="NaN/Inf"):
        M.prototype_lag(torch.zeros(2, 3), torch.full((4, 3), float("nan")), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        M.group_diversity(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="overflows float64"):
        M.effective_rank(torch.full((3, 3), 1e200, dtype=torch.float64))


def test_zero_constant_single_row_values():
    zero = torch.zeros(8, 6)
    const = torch.full((8, 6), 2.5)
    one = torch.randn(1, 6)
    assert M.effective_rank(zero) == 0.0
    assert M.effective_rank(const) == pytest.approx(1.0, abs=1e-4)
    assert M.effective_rank(one) == pytest.approx(1.0, abs=1e-4)
    for f in (M.effective_rank_centred, M.participation_ratio, M.normalized_std):
        assert f(zero) == 0.0 and f(const) == 0.0 and f(one) == 0.0
    assert M.normalized_std(zero) == 0.0
    assert M.uniformity(one) == 0.0 and M.uniformity(const) == pytest.approx(0.0, abs=1e-12)
    assert M.latent_norm(zero) == 0.0
    assert (M.singular_spectrum(zero, k=3) == 0).all()
    assert M.linear_cka(const, torch.randn(8, 2)) == 0.0
    assert M.linear_cka(zero, zero, debiased=False) == 0.0
    assert M.max_abs_correlation(const, torch.randn(8, 3)) == 0.0
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.max_abs_correlation(one, one)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast(dtype):
    z = torch.randn(40, 12).to(dtype)
    y = torch.randn(40, 12).to(dtype)
    ref = z.to(torch.float64)
    ry = y.to(torch.float64)
    assert M.effective_rank(z) == pytest.approx(M.effective_rank(ref), rel=1e-12)
    assert M.effective_rank_centred(z) == pytest.approx(M.effective_rank_centred(ref), rel=1e-12)
    assert M.normalized_std(z) == pytest.approx(M.normalized_std(ref), rel=1e-12)
    assert M.linear_cka(z, y) == pytest.approx(M.linear_cka(ref, ry), rel=1e-10)
    assert M.uniformity(z) == pytest.approx(M.uniformity(ref), rel=1e-12)
    assert M.contrastive_signal(z, y)["loss"] == pytest.approx(M.contrastive_signal(ref, ry)["loss"], rel=1e-12)
    assert M.mean_sigmoid_grad(z) == pytest.approx(M.mean_sigmoid_grad(ref), rel=1e-12)
    # and the result is the float64 value of the same numbers: matches numpy on them
    s = np.linalg.svd(ref.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert M.effective_rank(z) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-10)


def test_integer_numpy_and_requires_grad_inputs():
    x = torch.randn(10, 4, requires_grad=True)
    assert M.latent_norm(x) == pytest.approx(float(x.detach().double().norm(dim=1).mean()))
    assert M.effective_rank(np.eye(3)) == pytest.approx(3.0, rel=1e-5)
    assert M.effective_rank(torch.eye(4, dtype=torch.int64)) == pytest.approx(4.0, rel=1e-5)


def test_svd_failure_falls_back_to_gram_eigenvalues(monkeypatch):
    x = torch.randn(30, 6)
    expected = M.effective_rank(x)

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("svd did not converge")

    monkeypatch.setattr(torch.linalg, "svdvals", broken)
    assert M.effective_rank(x, method="svd") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape,library", [((30, 6), "torch"), ((2048, 520), "numpy")],
                         ids=["torch-eigh", "numpy-eigh"])
def test_eigh_failure_falls_back_to_svd(monkeypatch, shape, library):
    # A small latent takes torch's eigvalsh, a large one (>= 2^20 entries) numpy's: both
    # are broken, and the rank must come from the SVD fallback, equal to numpy's own SVD.
    x = torch.randn(*shape, dtype=torch.float64)
    s = np.linalg.svd(x.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    expected = float(np.exp(-(p * np.log(p)).sum()))
    calls = []

    def broken(name):
        def eigvalsh(*a, **k):
            calls.append(name)
            raise np.linalg.LinAlgError("eigh did not converge")
        return eigvalsh

    monkeypatch.setattr(_common.np.linalg, "eigvalsh", broken("numpy"))
    monkeypatch.setattr(_common.torch.linalg, "eigvalsh", broken("torch"))
    assert M.effective_rank(x) == pytest.approx(expected, rel=1e-9)
    assert calls == [library]  # that library's eigen-decomposition was tried and failed


def test_collapsed_rows_give_clean_rank():
    # rows collapsed onto 3 directions: rank exactly ~3 despite round-off in the Gram
    base = torch.randn(3, 64, dtype=torch.float64)
    z = base[torch.randint(0, 3, (400,))] * torch.rand(400, 1, dtype=torch.float64)
    s = np.linalg.svd(z.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert M.effective_rank(z) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)
    assert M.effective_rank(z) < 3.01
