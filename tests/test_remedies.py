"""Tests for gradprobe.remedies."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.remedies import (GradNormBalancer, LearnableTemperature, MemoryBank, correlation_loss,
                                grad_norms, info_nce, interaction_energy, l1_penalty, linear_ramp)


def _toy_losses(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    x = torch.randn(64, 8)
    h = trunk(x)
    losses = {
        "task": (h[:, 0] - x[:, 1]).pow(2).mean(),          # scale ~1
        "cont": 0.01 * h[:, 1:4].pow(2).mean(),             # ~100x smaller gradient
        "proto": 100.0 * (h[:, 4:] - 1.0).pow(2).mean(),    # ~100x larger gradient
    }
    return trunk, losses


def _independent_norm(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((g ** 2).sum()) for g in grads if g is not None))


def test_balancer_equalises_weighted_norms():
    trunk, losses = _toy_losses()
    params = list(trunk.parameters())
    raw = {k: _independent_norm(v, params) for k, v in losses.items()}
    assert raw["proto"] / raw["cont"] > 1e3  # the toy really has wildly different scales
    bal = GradNormBalancer(task="task", targets=1.0, ema=0.5, min_w=1e-6, max_w=1e6)
    for _ in range(40):  # EMA converges geometrically to the fixed point
        w = bal.step(losses, params)
    g_task = _independent_norm(losses["task"], params)
    for name in ("cont", "proto"):
        weighted = _independent_norm(w[name] * losses[name], params)
        assert weighted == pytest.approx(g_task, rel=1e-3)
    assert all(isinstance(v, float) for v in w.values())


def test_balancer_per_loss_targets_first_update_and_clamp():
    trunk, losses = _toy_losses(1)
    params = list(trunk.parameters())
    bal = GradNormBalancer(targets={"cont": 0.5, "proto": 0.1}, ema=0.9, min_w=1e-6, max_w=1e6)
    w = bal.step(losses, params)  # first update jumps straight to the target
    g_task = _independent_norm(losses["task"], params)
    assert _independent_norm(w["cont"] * losses["cont"], params) == pytest.approx(0.5 * g_task, rel=1e-4)
    assert _independent_norm(w["proto"] * losses["proto"], params) == pytest.approx(0.1 * g_task, rel=1e-4)
    clamped = GradNormBalancer(min_w=0.01, max_w=2.0).step(losses, params)
    assert clamped["cont"] == 2.0 and clamped["proto"] == 0.01


def test_balancer_update_from_given_norms_ema_and_state():
    bal = GradNormBalancer(ema=0.5, init={"cont": 1.0})
    w = bal.update({"task": 2.0, "cont": 1.0, "dead": 0.0, "bad": float("nan")})
    assert w["cont"] == pytest.approx(0.5 * 1.0 + 0.5 * 2.0)
    assert "dead" not in w and "bad" not in w
    assert bal.weight("task") == 1.0
    other = GradNormBalancer()
    other.load_state_dict(bal.state_dict())
    assert other.weights == bal.weights
    with pytest.raises(KeyError):
        bal.update({"cont": 1.0})


def test_grad_norms_leaves_grad_untouched():
    trunk, losses = _toy_losses()
    norms = grad_norms(losses, trunk.parameters())
    assert set(norms) == set(losses)
    assert all(p.grad is None for p in trunk.parameters())
    assert norms["task"] > 0


def test_memory_bank_fifo_and_wraparound():
    bank = MemoryBank(size=5, dim=2, normalize=False)
    assert len(bank) == 0
    feats = torch.arange(14, dtype=torch.float32).reshape(7, 2)
    bank.push(feats[:3], torch.tensor([0, 0, 1]))
    assert len(bank) == 3 and not bank.full
    assert torch.equal(bank.features, feats[:3])
    bank.push(feats[3:7], torch.tensor([1, 2, 2, 3]))  # wraps: oldest two overwritten
    assert len(bank) == 5 and bank.full
    assert torch.equal(bank.features, feats[2:7])
    assert bank.groups.tolist() == [1, 1, 2, 2, 3]
    bank.push(feats[:1] * 0 + 99, 7)  # int group for the whole batch
    assert bank.groups.tolist() == [1, 2, 2, 3, 7]
    assert bank.features[-1].tolist() == [99.0, 99.0]
    big = torch.randn(12, 2)
    bank.push(big, torch.arange(12))  # more than the bank holds: newest `size` survive
    assert torch.equal(bank.features, big[-5:])
    assert bank.groups.tolist() == list(range(7, 12))


def test_memory_bank_normalises_detaches_and_saves():
    bank = MemoryBank(size=4, dim=3)
    x = torch.randn(2, 3, requires_grad=True)
    bank.push(x * 10, torch.tensor([0, 1]))
    assert not bank.features.requires_grad
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(2))
    state = bank.state_dict()
    other = MemoryBank(size=4, dim=3)
    other.load_state_dict(state)
    assert torch.equal(other.features, bank.features) and other.groups.tolist() == [0, 1]


def test_memory_negatives_from_other_groups():
    bank = MemoryBank(size=8, dim=4)
    bank.push(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 3, 3]))
    neg = bank.negatives(exclude=torch.tensor([0, 3]))
    expected = bank.features[torch.tensor([1, 2, 4, 5])]
    assert torch.equal(neg, expected)
    assert bank.negatives(1).shape[0] == 6


def _manual_info_nce(a, p, t, mem=None):
    a = a / a.norm(dim=1, keepdim=True)
    p = p / p.norm(dim=1, keepdim=True)
    losses = []
    for i in range(a.shape[0]):
        cands = [float(a[i] @ p[j]) / t for j in range(p.shape[0])]
        if mem is not None:
            cands += [float(a[i] @ m) / t for m in mem[i]]
        num = cands[i]
        losses.append(-(num - math.log(sum(math.exp(c) for c in cands))))
    return sum(losses) / len(losses)


def test_info_nce_matches_formula():
    torch.manual_seed(0)
    a, p = torch.randn(6, 5), torch.randn(6, 5)
    got = float(info_nce(a, p, temperature=0.2))
    assert got == pytest.approx(_manual_info_nce(a, p, 0.2), rel=1e-5)


def test_info_nce_with_memory_uses_only_other_group_negatives():
    torch.manual_seed(1)
    a, p = torch.randn(4, 5), torch.randn(4, 5)
    groups = torch.tensor([2, 2, 2, 2])  # a single-group batch, like CellBatchSampler's
    bank = MemoryBank(size=10, dim=5)
    bank.push(torch.randn(10, 5), torch.tensor([0, 1, 2, 2, 3, 0, 2, 1, 1, 3]))
    got = float(info_nce(a, p, temperature=0.5, memory=bank, groups=groups))
    others = bank.negatives(exclude=2)
    assert others.shape[0] == 7
    # same-group in-batch negatives masked -> the candidates are the own positive + other-group memory
    an = a / a.norm(dim=1, keepdim=True)
    pn = p / p.norm(dim=1, keepdim=True)
    manual = 0.0
    for i in range(4):
        pos = float(an[i] @ pn[i]) / 0.5
        negs = [float(an[i] @ m) / 0.5 for m in others]
        manual += -(pos - math.log(math.exp(pos) + sum(math.exp(n) for n in negs)))
    assert got == pytest.approx(manual / 4, rel=1e-5)
    # without groups: all in-batch negatives + the whole bank
    got_all = float(info_nce(a, p, temperature=0.5, memory=bank))
    mem_rows = [list(bank.features)] * 4
    assert got_all == pytest.approx(_manual_info_nce(a, p, 0.5, mem_rows), rel=1e-5)


def test_info_nce_raw_memory_tensor_and_gradient():
    torch.manual_seed(2)
    a = torch.randn(3, 4, requires_grad=True)
    p = torch.randn(3, 4)
    mem = torch.randn(5, 4)
    loss = info_nce(a, p, 0.1, memory=mem)
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    assert float(loss.detach()) == pytest.approx(_manual_info_nce(a.detach(), p, 0.1, [list(mem / mem.norm(dim=1, keepdim=True))] * 3), rel=1e-5)


def test_correlation_loss_matches_numpy_and_is_scale_invariant():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = np.column_stack([x[:, 0] * 0.7 + rng.normal(size=200), rng.normal(size=200)])
    c = np.corrcoef(x.T, y.T)[:3, 3:]
    expected = float((c ** 2).mean())
    xt, yt = torch.tensor(x), torch.tensor(y)
    got = float(correlation_loss(xt, yt))
    assert got == pytest.approx(expected, rel=1e-6)
    scaled = float(correlation_loss(xt * 1e-3 + 5.0, yt * torch.tensor([1e4, 0.5])))
    assert scaled == pytest.approx(expected, rel=1e-5)
    # the gradient does not vanish when the norms shrink (unlike ||x^T y||^2)
    for s in (1.0, 1e-3):
        xs = (xt * s).clone().requires_grad_(True)
        correlation_loss(xs, yt).backward()
        rel = float((xs.grad * xs.detach()).abs().sum())  # scale-free size of the gradient
        assert rel > 1e-3


def test_l1_penalty():
    a = torch.tensor([[1.0, -2.0]])
    b = torch.tensor([-3.0, 3.0, 0.0])
    assert float(l1_penalty(a, b)) == pytest.approx(1.5 + 2.0)
    with pytest.raises(ValueError):
        l1_penalty()


def test_learnable_temperature_value_and_gradient():
    for init in (0.05, 1.0, 7.5, 40.0):
        t = LearnableTemperature(init)
        assert float(t) == pytest.approx(init, rel=1e-5)
    t = LearnableTemperature(2.0)
    x = torch.tensor([1.0, -3.0])
    loss = torch.sigmoid(x / t()).sum()
    loss.backward()
    assert t.raw.grad is not None and float(t.raw.grad) != 0.0
    assert any(p is t.raw for p in t.parameters())
    t2 = LearnableTemperature(0.5, min_value=0.1)
    assert float(t2) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError):
        LearnableTemperature(0.0)


def test_interaction_energy():
    u = torch.tensor([1.0, 2.0])
    r = torch.tensor([0.5, -1.0])
    assert torch.allclose(interaction_energy(u, r, 0.0), u - r)
    assert torch.allclose(interaction_energy(u, r, 2.0), torch.tensor([1.0 - 0.5 + 1.0, 2.0 + 1.0 - 4.0]))
    lam = torch.tensor(0.3, requires_grad=True)
    interaction_energy(u, r, lam).sum().backward()
    assert float(lam.grad) == pytest.approx(float((u * r).sum()))


def test_linear_ramp():
    assert [linear_ramp(s, 10, 4) for s in (0, 9, 10, 11, 13, 50)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert linear_ramp(10, 10, 0) == 1.0


def test_correlation_loss_constant_dimension_has_finite_gradient():
    # regression: a dimension that is constant over the batch (dead ReLUs, collapsed latent)
    # must not turn the backward into NaN (sqrt'(0) = inf)
    x = torch.randn(16, 3)
    x[:, 1] = 0.7
    x.requires_grad_(True)
    y = torch.zeros(16, 2)
    y[:, 0] = torch.randn(16)
    y.requires_grad_(True)
    loss = correlation_loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    xd = x.detach()
    c = np.corrcoef(xd[:, [0, 2]].T.numpy(), y.detach()[:, :1].T.numpy())[:2, 2:]
    assert float(loss.detach()) == pytest.approx(float((c ** 2).sum()) / 6, rel=1e-5)
