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


def test_contrastive_signal_extra_negatives_match_info_nce():
    """With memory negatives and same-group masking the statistics describe the loss that
    gradprobe.remedies.info_nce actually optimises."""
    from gradprobe.remedies import info_nce

    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 8, generator=g, dtype=torch.float64)
    groups = torch.tensor([0] * 8 + [1] * 8)
    mem = torch.randn(40, 8, generator=g, dtype=torch.float64)
    mem_groups = torch.arange(40) % 5
    out = M.contrastive_signal(a, p, 0.2, groups=groups, negatives=mem, negative_groups=mem_groups,
                               mask_same_group=True)
    ref = info_nce(a, p, 0.2, memory=mem, groups=groups, memory_groups=mem_groups)
    assert out["loss"] == pytest.approx(float(ref), rel=1e-10)
    assert out["same_group_negative_share"] == 0.0
    # K_i = 7 other-group in-batch negatives + 32 other-group memory entries
    assert out["num_negatives"] == pytest.approx(8 + 32)
    # without masking: every candidate counts; shares by explicit counting
    out = M.contrastive_signal(a, p, 0.2, groups=groups, negatives=mem, negative_groups=mem_groups)
    assert out["loss"] == pytest.approx(float(info_nce(a, p, 0.2, memory=mem)), rel=1e-10)
    assert out["num_negatives"] == 15 + 40
    assert out["same_group_negative_share"] == pytest.approx((7 + 8) / 55)
    # extra negatives of unknown group: the share covers the in-batch negatives only
    out = M.contrastive_signal(a, p, 0.2, groups=groups, negatives=mem)
    assert out["same_group_negative_share"] == pytest.approx(7 / 15)
    # the 2-argument form is unchanged by an empty set of extra negatives
    base = M.contrastive_signal(a, p, 0.2, groups=groups)
    same = M.contrastive_signal(a, p, 0.2, groups=groups, negatives=torch.zeros(0, 8))
    assert base == same


def test_contrastive_signal_single_group_batch_with_memory():
    # the record's case: one cell line per batch; in-batch negatives are all same-line
    a = torch.randn(8, 4, dtype=torch.float64)
    groups = torch.zeros(8, dtype=torch.long)
    plain = M.contrastive_signal(a, a + 0.1, groups=groups)
    assert plain["same_group_negative_share"] == 1.0
    with pytest.raises(ValueError, match="no anchor has a negative"):
        M.contrastive_signal(a, a, groups=groups, mask_same_group=True)
    mem = torch.randn(12, 4, dtype=torch.float64)
    out = M.contrastive_signal(a, a, groups=groups, negatives=mem, negative_groups=torch.ones(12),
                               mask_same_group=True)
    assert out["num_negatives"] == 12 and out["same_group_negative_share"] == 0.0
    with pytest.raises(ValueError, match="needs groups"):
        M.contrastive_signal(a, a, negatives=mem, mask_same_group=True)
    with pytest.raises(ValueError, match="negative_groups"):
        M.contrastive_signal(a, a, groups=groups, negatives=mem, mask_same_group=True)
    with pytest.raises(ValueError, match="columns"):
        M.contrastive_signal(a, a, negatives=torch.randn(3, 5))


@pytest.mark.parametrize("form", ["pair", "tuple4", "dict"])
def test_contrastive_watch_forms(tmp_path, form):
    from gradprobe import Probe, load_run

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    probe = Probe(lin, every=1, run_file=str(tmp_path / "run.gprobe"), task="task")
    probe.watch_contrastive("cont", temperature=0.1)
    mem, mem_groups = torch.randn(20, 4), torch.arange(20) % 4
    for _ in range(3):
        x = torch.randn(8, 4)
        z, zp = lin(x), lin(x + 0.01)
        groups = torch.zeros(8, dtype=torch.long)
        value = {"pair": (z, zp), "tuple4": (z, zp, mem, mem_groups),
                 "dict": {"anchors": z, "positives": zp, "negatives": mem, "negative_groups": mem_groups,
                          "mask_same_group": True}}[form]
        probe.observe(cont=value, groups=groups)
        probe.backward({"task": z.pow(2).mean(), "reg": z.abs().mean()})
    probe.close()
    run = load_run(str(tmp_path / "run.gprobe"))
    share = run.series("contrastive_same_group_share", "cont")[1]
    k = run.series("contrastive_negatives", "cont")[1]
    expected = {"pair": (1.0, 7), "tuple4": ((7 + 5) / 27, 27), "dict": (0.0, 15)}[form]
    assert share[-1] == pytest.approx(expected[0]) and k[-1] == pytest.approx(expected[1])


def test_contrastive_watch_rejects_bad_forms():
    from gradprobe.probe.watches import ContrastiveWatch, ProbeUsageError

    w = ContrastiveWatch("cont", 0.1, None)
    z = torch.randn(4, 3)
    with pytest.raises(ProbeUsageError, match="needs"):
        w.prepare((z,), None, 64)
    with pytest.raises(ProbeUsageError, match="keys"):
        w.prepare({"anchors": z}, None, 64)
    with pytest.raises(ProbeUsageError, match="negatives must be"):
        w.prepare((z, z, torch.randn(5, 2)), None, 64)
    with pytest.raises(ProbeUsageError, match="negative_groups"):
        w.prepare((z, z, torch.randn(5, 3), torch.zeros(4)), None, 64)
    with pytest.raises(ProbeUsageError, match="mask_same_group"):
        w.prepare({"anchors": z, "positives": z, "mask_same_group": True}, None, 64)
    # masked away entirely (empty memory, one group): nothing to measure, no error (the shapes
    # are checked on the training thread, the metric runs on the host copy)
    pieces, facts = w.prepare({"anchors": z, "positives": z, "mask_same_group": True},
                              torch.zeros(4, dtype=torch.long), 64)
    assert w.record({**pieces, **facts}) == {}
