"""contrastive_signal against an explicit numpy InfoNCE."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, softmax

import gradprobe.metrics as M


def reference(a, p, tau, groups=None):
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    n = a.shape[0]
    losses, gaps, effs, shares = [], [], [], []
    for i in range(n):
        row = np.array([an[i] @ pn[j] for j in range(n)]) / tau
        negs = np.delete(row, i)
        losses.append(logsumexp(row) - row[i])
        gaps.append(row[i] - negs.max())
        r = softmax(negs)
        effs.append(1.0 / (r**2).sum())
        if groups is not None:
            others = np.delete(groups, i)
            shares.append(np.mean(others == groups[i]))
    return np.mean(losses), np.mean(gaps), np.mean(effs), (np.mean(shares) if shares else None)


def test_contrastive_signal_matches_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((24, 8))
    p = a + 0.7 * rng.standard_normal((24, 8))
    groups = rng.integers(0, 3, 24)
    loss, gap, eff, share = reference(a, p, 0.2, groups)
    out = M.contrastive_signal(torch.tensor(a), torch.tensor(p), temperature=0.2, groups=torch.tensor(groups))
    assert out["loss"] == pytest.approx(loss, rel=1e-10)
    assert out["loss_ratio"] == pytest.approx(loss / math.log(24), rel=1e-10)
    assert out["gap"] == pytest.approx(gap, rel=1e-10)
    assert out["effective_negatives"] == pytest.approx(eff, rel=1e-10)
    assert out["same_group_negative_share"] == pytest.approx(share, rel=1e-12)
    assert out["num_negatives"] == 23.0
    # the loss is the usual cross-entropy of the logits with diagonal targets
    logits = F.normalize(torch.tensor(a), dim=1) @ F.normalize(torch.tensor(p), dim=1).T / 0.2
    assert out["loss"] == pytest.approx(float(F.cross_entropy(logits, torch.arange(24))), rel=1e-10)
    assert "same_group_negative_share" not in M.contrastive_signal(torch.tensor(a), torch.tensor(p))


def test_contrastive_signal_levels():
    # no information: all embeddings identical -> loss = log(n), ratio 1, all negatives equal
    x = torch.ones(16, 4)
    out = M.contrastive_signal(x, x, groups=torch.zeros(16, dtype=torch.long))
    assert out["loss_ratio"] == pytest.approx(1.0)
    assert out["effective_negatives"] == pytest.approx(15.0)
    assert out["gap"] == pytest.approx(0.0, abs=1e-12)
    assert out["same_group_negative_share"] == 1.0
    # perfect positives, well-separated negatives -> ratio ~ 0, positive gap
    e = torch.eye(16)
    out = M.contrastive_signal(e, e, temperature=0.05)
    assert out["loss_ratio"] < 1e-6 and out["gap"] == pytest.approx(20.0) and out["top1_accuracy"] == 1.0
    # one very hard negative per anchor -> effective negatives near 1
    a = torch.randn(32, 64)
    a[1::2] = a[0::2] + 1e-3 * torch.randn(16, 64)  # rows 2k, 2k+1 near-duplicates
    out = M.contrastive_signal(a, a, temperature=0.01)
    assert out["effective_negatives"] == pytest.approx(1.0, abs=1e-3)
    assert abs(out["gap"]) < 0.5 and out["loss"] == pytest.approx(math.log(2), abs=0.3)


def test_contrastive_signal_errors():
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.contrastive_signal(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="same shape"):
        M.contrastive_signal(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        M.contrastive_signal(torch.randn(3, 4), torch.randn(3, 4), temperature=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        M.contrastive_signal(torch.randn(3, 4), torch.randn(3, 4), groups=torch.zeros(4))
