"""The corpus's own truth measurements (benchmarks/validity/common.py), checked against an
independent implementation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from benchmarks.validity.common import knn_accuracy


def test_knn_accuracy_matches_scikit_learn_cosine_vote():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6))
    y = rng.integers(0, 4, 400)
    f = centres[y] + 0.8 * rng.normal(size=(400, 6))
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine").fit(f[:300], y[:300])
    expected = float((ref.predict(f[300:]) == y[300:]).mean())
    assert 0.5 < expected < 1.0
    assert knn_accuracy(f[:300], y[:300], f[300:], y[300:], k=20) == expected


def test_naive_cross_entropy_matches_the_formula_until_float32_rounds_the_sigmoid_to_one():
    """sigmoid-mse's naive-cross-entropy variant rests on network2.py's cost written on the
    probabilities: equal to the stable cost on moderate logits, NaN once sigmoid(z) == 1.0."""
    import torch

    from benchmarks.validity.sigmoid_mse import cross_entropy

    z = np.array([[-3.0, 0.5, 2.0], [1.5, -1.0, 0.2]])
    y = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    a = 1 / (1 + np.exp(-z))
    expected = float((-(y * np.log(a) + (1 - y) * np.log(1 - a))).sum(1).mean())
    logits, target = torch.tensor(z, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    assert float(cross_entropy(logits, target, naive=False)) == pytest.approx(expected, rel=1e-5)
    assert float(cross_entropy(logits, target, naive=True)) == pytest.approx(expected, rel=1e-5)
    saturated = torch.tensor([[20.0, -1.0, 1.0]])  # float32: sigmoid(20) rounds to exactly 1
    assert float(torch.sigmoid(saturated)[0, 0]) == 1.0
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    assert np.isnan(float(cross_entropy(saturated, one_hot, naive=True)))
    assert np.isfinite(float(cross_entropy(saturated, one_hot, naive=False)))


def test_identity_sampler_gives_p_classes_of_k_distinct_items_each():
    """center_loss's P x K sampler (the ``pk-sampler`` variants' declared composition), checked
    by counting with numpy: every batch holds exactly P classes, K distinct items of each."""
    import torch

    from benchmarks.validity.center_loss import BATCH, K_PER_CLASS, P_CLASSES, identity_batches

    labels = torch.from_numpy(np.repeat(np.arange(10), 40))
    sampler = identity_batches(labels, torch.Generator().manual_seed(0))
    seen_classes = set()
    for _ in range(20):
        idx = next(sampler).numpy()
        classes, counts = np.unique(labels.numpy()[idx], return_counts=True)
        assert len(idx) == P_CLASSES * K_PER_CLASS == BATCH
        assert len(np.unique(idx)) == len(idx)
        assert len(classes) == P_CLASSES and (counts == K_PER_CLASS).all()
        seen_classes.update(classes.tolist())
    assert seen_classes == set(range(10))  # the classes are drawn anew for each batch


def test_asp_mtl_difference_loss_and_dependence_measures_match_numpy():
    """asp-mtl's L_diff (eq. 16 raw, and the port's normalised form) and the dependence
    measures of its truth, against direct numpy formulas."""
    import torch

    from benchmarks.validity.asp_mtl import diff_loss, task_discriminability
    from benchmarks.validity.dsn import linear_cka, max_abs_correlation

    rng = np.random.default_rng(0)
    s, h = rng.normal(size=(40, 5)), rng.normal(size=(40, 3))
    h[:, 0] += 2 * s[:, 1]  # one dependent pair
    raw = float(diff_loss(torch.tensor(s), torch.tensor(h), normalised=False))
    assert raw == pytest.approx(sum((s[:, i] @ h[:, j]) ** 2 for i in range(5) for j in range(3)))
    sc, hc = s - s.mean(0), h - h.mean(0)
    sn = sc / np.linalg.norm(sc, axis=1, keepdims=True)
    hn = hc / np.linalg.norm(hc, axis=1, keepdims=True)
    normalised = float(diff_loss(torch.tensor(s), torch.tensor(h), normalised=True))
    assert normalised == pytest.approx(np.mean((hn.T @ sn) ** 2))
    # the normalised loss ignores the features' scale; the raw one grows with its square
    h_scaled = 7.0 * h
    s_t, h_scaled_t = torch.tensor(s), torch.tensor(h_scaled)
    assert float(diff_loss(s_t, h_scaled_t, normalised=True)) == pytest.approx(normalised)
    assert float(diff_loss(s_t, h_scaled_t, normalised=False)) == pytest.approx(49 * raw)
    corr = np.corrcoef(s.T, h.T)[:5, 5:]
    assert max_abs_correlation(s, h) == pytest.approx(np.abs(corr).max())
    kernel = lambda x: (x - x.mean(0)) @ (x - x.mean(0)).T  # noqa: E731
    ks, kh = kernel(s), kernel(h)
    hsic = np.sum(ks * kh)  # tr(K_s K_h), linear kernels on centred features
    assert linear_cka(s, h) == pytest.approx(hsic / np.sqrt(np.sum(ks * ks) * np.sum(kh * kh)))
    # tasks told apart from shared features: separated means near 1, identical ones near chance
    apart = [(rng.normal(size=(200, 4)), None), (rng.normal(size=(200, 4)) + 3.0, None)]
    alike = [(rng.normal(size=(200, 4)), None), (rng.normal(size=(200, 4)), None)]
    assert task_discriminability(apart) > 0.97
    assert abs(task_discriminability(alike) - 0.5) < 0.1


def test_misa_difference_and_cmd_losses_match_numpy():
    """misa's DiffLoss (the code's normalised form and the raw one) and CMD, against direct
    numpy formulas; the two modalities are the image's left and right columns."""
    import torch

    from benchmarks.validity.misa import cmd, diff_loss, modalities

    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=(30, 6)), rng.uniform(size=(30, 4))
    raw = float(diff_loss(torch.tensor(a), torch.tensor(b), normalised=False))
    assert raw == pytest.approx(np.mean((a.T @ b) ** 2))
    ac, bc = a - a.mean(0), b - b.mean(0)
    an = ac / (np.linalg.norm(ac, axis=1, keepdims=True) + 1e-6)
    bn = bc / (np.linalg.norm(bc, axis=1, keepdims=True) + 1e-6)
    assert float(diff_loss(torch.tensor(a), torch.tensor(b), normalised=True)) == \
        pytest.approx(np.mean((an.T @ bn) ** 2))
    # the raw loss falls with the square of each code's scale; the normalised one does not
    assert float(diff_loss(torch.tensor(a), torch.tensor(0.1 * b), normalised=False)) == \
        pytest.approx(0.01 * raw)
    assert float(diff_loss(torch.tensor(a), torch.tensor(0.1 * b), normalised=True)) == \
        pytest.approx(np.mean((an.T @ bn) ** 2), rel=1e-4)
    x1, x2 = rng.normal(size=(50, 3)), rng.normal(size=(50, 3)) * 2 + 1
    moments = [np.linalg.norm(x1.mean(0) - x2.mean(0))]
    moments += [np.linalg.norm(((x1 - x1.mean(0)) ** k).mean(0) - ((x2 - x2.mean(0)) ** k).mean(0))
                 for k in range(2, 6)]
    assert float(cmd(torch.tensor(x1), torch.tensor(x2), 5)) == pytest.approx(sum(moments))
    constant = torch.full((50, 3), 0.7, dtype=torch.float64)
    assert float(cmd(constant, constant.clone(), 5)) == 0.0  # two constant codes: CMD is zero
    image = torch.arange(64.0).view(1, 64)
    left, right = modalities(image)
    assert left.view(8, 4)[:, 0].tolist() == list(range(0, 64, 8))
    assert right.view(8, 4)[:, -1].tolist() == list(range(7, 64, 8))
