"""gram_statistics against explicit per-loss gradient vectors."""

import numpy as np
import pytest
import torch

import gradprobe.metrics as M


def test_gram_statistics_matches_explicit_gradients():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((4, 50))
    g[1] = -0.3 * g[0] + 0.1 * rng.standard_normal(50)  # conflicts with g0
    g[3] = 0.0  # a loss with no gradient
    w = np.array([1.0, 0.05, -0.1, 0.5])
    gram = M.gram_from_gradients(torch.tensor(g))
    np.testing.assert_allclose(gram.numpy(), g @ g.T, rtol=1e-12)
    out = M.gram_statistics(gram, w)
    norms = np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(out["norm"].numpy(), norms, rtol=1e-12)
    np.testing.assert_allclose(out["weighted_norm"].numpy(), np.abs(w) * norms, rtol=1e-12)
    for i in range(4):
        for j in range(4):
            ni, nj = norms[i], norms[j]
            cos = 0.0 if ni == 0 or nj == 0 else g[i] @ g[j] / (ni * nj)
            mag = 0.0 if ni == 0 and nj == 0 else 2 * ni * nj / (ni**2 + nj**2)
            assert float(out["cosine"][i, j]) == pytest.approx(cos, abs=1e-12)
            assert float(out["magnitude_similarity"][i, j]) == pytest.approx(mag, abs=1e-12)
            assert bool(out["conflict"][i, j]) == (cos < 0)
    assert bool(out["conflict"][0, 1]) and not bool(out["conflict"][0, 0])
    combined = w @ g
    assert out["combined_norm"] == pytest.approx(np.linalg.norm(combined), rel=1e-12)
    contrib = w * (g @ combined) / (combined @ combined)
    np.testing.assert_allclose(out["contribution"].numpy(), contrib, rtol=1e-10, atol=1e-14)
    assert float(out["contribution"].sum()) == pytest.approx(1.0)
    assert out["conflict"].dtype == torch.bool and out["cosine"].shape == (4, 4)


def test_gram_from_list_of_parameter_grads_and_float16():
    a = [torch.randn(3, 4), torch.randn(5)]
    b = [torch.randn(3, 4), torch.randn(5)]
    flat = [torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])]
    gram = M.gram_from_gradients(flat)
    ref = torch.stack(flat).double() @ torch.stack(flat).double().T
    torch.testing.assert_close(gram, ref)
    h = M.gram_statistics(ref.half(), torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ref32 = M.gram_statistics(ref.half().float(), [1.0, 2.0])
    torch.testing.assert_close(h["norm"], ref32["norm"])


def test_gram_statistics_zero_and_swamping():
    out = M.gram_statistics(torch.zeros(3, 3), [1, 1, 1])
    assert out["combined_norm"] == 0.0
    assert (out["cosine"] == 0).all() and (out["magnitude_similarity"] == 0).all()
    assert (out["contribution"] == 0).all() and not out["conflict"].any()
    # swamping: task gradient 100x a weighted constraint gradient
    g = torch.tensor([[100.0, 0.0], [0.0, 10.0]])
    out = M.gram_statistics(g @ g.T, [1.0, 0.1])
    assert float(out["weighted_norm"][0] / out["weighted_norm"][1]) == pytest.approx(100.0)
    assert float(out["contribution"][0]) == pytest.approx(1e4 / (1e4 + 1))


def test_gram_statistics_input_errors():
    with pytest.raises(ValueError, match=r"\(K, K\)"):
        M.gram_statistics(torch.zeros(2, 3), [1, 1])
    with pytest.raises(ValueError, match="weights"):
        M.gram_statistics(torch.eye(2), [1, 1, 1])
    with pytest.raises(ValueError, match="NaN/Inf"):
        M.gram_statistics(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), [1, 1])
    with pytest.raises(ValueError, match="NaN/Inf"):
        M.gram_statistics(torch.eye(2), [1, float("inf")])
    with pytest.raises(ValueError, match="same number of elements"):
        M.gram_from_gradients([torch.zeros(3), torch.zeros(4)])
