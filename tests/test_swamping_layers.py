"""gradient-swamping judged where a loss acts: per-layer blocks of the Gram matrix recorded by
the probe (checked against torch.autograd.grad per loss and per layer), the rule on them
(checked against numpy on synthetic runs), a loss at its floor, and a ratio whose spread
straddles the threshold (info, and no static-loss-weights)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.diagnose.rules.layers import layer_ratios
from gradprobe.probe import per_loss
from gradprobe.probe.layer_blocks import MODEL_BLOCK, block_names
from gradprobe.record import RunWriter, load_run, run_from_state

STEPS = 40
TH = Thresholds()


# -- synthetic runs: per-layer Jacobian rows drawn at random, written as a probe would --------

def _write(path, names, weights, layers, losses, scales, rng, with_blocks=True, meta=None,
           arrays_at=None, roles=None):
    """``weights[k]``: loss k's weight, one for the run or one per step; ``scales[layer]``:
    per step, per loss, the size of that loss's gradient rows on the layer (0: the loss does
    not reach it); ``meta``, ``arrays_at(step)``: more metadata and
    arrays to record; ``roles``: roles other than the default (task first, then other).
    Returns the rows J[step][layer] [K, P]."""
    w = RunWriter(path)
    w.set_meta(losses=list(names), task=names[0],
               roles={n: "task" if i == 0 else "other" for i, n in enumerate(names)}
               | (roles or {}),
               every=1, expect_groups_per_batch=None, **(meta or {}))
    rows = []
    for s in range(STEPS):
        per_layer = {layer: rng.normal(size=(len(names), size)) * scales[layer][s][:, None]
                     for layer, size in layers.items()}
        rows.append(per_layer)
        grams = {layer: j @ j.T for layer, j in per_layer.items()}
        gram = sum(grams.values())
        scalars, arrays = {}, {("grad_gram", "shared"): gram}
        if with_blocks:
            arrays |= {("grad_gram_layer", layer): g for layer, g in grams.items()}
        if arrays_at is not None:
            arrays |= arrays_at(s)
        for k, name in enumerate(names):
            norm = float(np.sqrt(gram[k, k]))
            weight = float(np.broadcast_to(weights[k], STEPS)[s])
            scalars |= {("loss", name): float(losses[k][s]), ("grad_norm", name): norm,
                        ("weighted_grad_norm", name): abs(weight) * norm,
                        ("weight", name): weight}
        w.write_step(s, scalars, arrays)
    w.close()
    return rows


def _numpy_ratio(rows, weights, loss):
    """Independently, from the rows: per step, the median over the layers that ``loss`` and
    another loss both reach of |w_k| |J_l,k| / max_j |w_j| |J_l,j|."""
    out = []
    for per_layer in rows:
        ratios = []
        for j in per_layer.values():
            norms = np.abs(weights) * np.linalg.norm(j, axis=1)
            if norms[loss] > 0 and (np.delete(norms, loss) > 0).any():
                ratios.append(norms[loss] / norms.max())
        out.append(np.median(ratios) if ratios else np.nan)
    return np.array(out)


def _falling(start, end):
    return np.geomspace(start, end, STEPS)


def _router_case(tmp_path, balance_weight, with_blocks=True, meta=None, arrays_at=None,
                 tag=""):
    """A task and a balancing loss: the task dominates a large embedding by construction, the
    balancing loss acts on a small router (its gradient there ~40x the task's)."""
    rng = np.random.default_rng(0)
    ones = np.ones(STEPS)
    scales = {"embed": [np.array([10.0, 0.5]) for _ in ones],
              "router": [np.array([1.0, 40.0]) for _ in ones]}
    weights = [1.0, balance_weight]
    path = tmp_path / f"router-{balance_weight}-{with_blocks}{tag}.gprobe"
    rows = _write(path, ("task", "balance"), weights, {"embed": 200, "router": 16},
                  [_falling(2.0, 0.5), 1.5 * ones], scales, rng, with_blocks, meta, arrays_at)
    return load_run(path), rows, np.array(weights)


def _swamping(run):
    return [f for f in diagnose(run) if f.id in ("gradient-swamping", "static-loss-weights")]


def test_a_loss_that_holds_its_own_where_it_acts_is_not_swamped(tmp_path):
    run, rows, weights = _router_case(tmp_path, 1e-2)
    expected = _numpy_ratio(rows, weights, 1)
    # The median of its two layers' ratios (~0.4 on the router, ~5e-4 on the embedding)...
    assert np.median(expected) > 2 * TH.swamping_ratio
    whole = np.array([abs(weights[1]) * np.linalg.norm(np.hstack(list(r.values()))[1]) /
                      np.linalg.norm(np.hstack(list(r.values()))[0]) for r in rows])
    assert np.median(whole) < 0.02  # ...while the whole-norm ratio is far below the threshold
    blocks = np.array([[run.arrays("grad_gram_layer", layer)[1][s] for layer in
                        ("embed", "router")] for s in range(STEPS)])
    ratio, _, _ = layer_ratios(blocks, np.tile(weights[:, None], STEPS), np.ones(2, bool))
    assert np.allclose(ratio[1], expected, rtol=1e-9)
    assert _swamping(run) == []
    # The same run without blocks (an older run file) is judged on the whole norm, as before.
    old, _, _ = _router_case(tmp_path, 1e-2, with_blocks=False)
    found = {f.id: f for f in _swamping(old)}
    assert set(found) == {"gradient-swamping", "static-loss-weights"}
    assert found["gradient-swamping"].evidence["judged_on"] == "whole shared set"
    assert found["gradient-swamping"].evidence["median_ratio"] == pytest.approx(
        np.median(whole), rel=1e-6)


def test_a_loss_swamped_on_every_layer_it_shares_is_found_with_its_layers(tmp_path):
    run, rows, weights = _router_case(tmp_path, 1e-5)
    found = {f.id: f for f in _swamping(run)}
    assert set(found) == {"gradient-swamping", "static-loss-weights"}
    f = found["gradient-swamping"]
    assert f.subject == "balance" and f.severity == "error" and f.evidence["dominant"] == "task"
    expected = _numpy_ratio(rows, weights, 1)
    assert f.evidence["median_ratio"] == pytest.approx(np.median(expected), rel=1e-9)
    router = [abs(weights[1]) * np.linalg.norm(r["router"][1]) /
              max(np.abs(weights) * np.linalg.norm(r["router"], axis=1)) for r in rows]
    assert f.evidence["layer_ratios"]["router"] == pytest.approx(np.median(router), rel=1e-9)
    assert f.evidence["judged_on"] == "layers it shares"
    # The title shows the per-layer spread; the remedy balances the ratio judged there.
    spread = sorted(f.evidence["layer_ratios"].values())
    assert f"{100 * spread[0]:.2g}" in f.title.replace("%", "") or len(spread) == 1
    assert f"on its {len(spread)} layers" in f.title
    balanced = 1e-5 / np.median(expected)
    import re
    number = re.search(r"weight 'balance' 1e-05 -> ([0-9.e+]+)", f.remedy)
    assert number and float(number.group(1)) == pytest.approx(balanced, rel=5e-3), f.remedy


def _routing(tmp_path, shares, reached_by):
    """The swamped router case, its router watched as prototypes: each probe step's top-1
    counts drawn from ``shares`` (1,024 tokens), and the losses whose graph reaches the
    router (a role record's ``prototypes_reached``)."""
    rng = np.random.default_rng(1)
    counts = [rng.multinomial(1024, shares).astype(float) for _ in range(STEPS)]
    records = [{"name": n, "role": "task" if n == "task" else "other",
                "source": "first" if n == "task" else "name", "hint": None, "reach": "shared",
                "prototypes_reached": ["router"] if n in reached_by else []}
               for n in ("task", "balance")]
    run, _, _ = _router_case(tmp_path, 1e-5, meta={"role_records": records,
                                                   "prototypes": {"router": None}},
                             arrays_at=lambda s: {("prototype_assignments", "router"): counts[s]},
                             tag=f"-{shares[0]:.3f}-{'-'.join(reached_by)}")
    last = int(np.ceil(TH.window_share * STEPS))
    pooled = np.sum(counts[-last:], axis=0)
    return run, scipy.stats.entropy(pooled) / np.log(len(shares))


@pytest.mark.parametrize("reached_by", [("task", "balance"), ("balance",)])
def test_a_swamped_loss_whose_prototypes_keep_their_usage_is_info(tmp_path, reached_by):
    run, usage = _routing(tmp_path, np.full(8, 1 / 8), reached_by)
    assert usage >= TH.usage_held_fraction
    found = {f.id: f for f in _swamping(run)}
    assert set(found) == {"gradient-swamping"}  # static-loss-weights reads no info finding
    f = found["gradient-swamping"]
    assert f.severity == "info" and f.subject == "balance"
    assert f.evidence["prototype_usage_kept"]["router"] == pytest.approx(usage, rel=1e-9)
    assert "the prototypes 'router' it reaches keep their usage" in f.title
    assert f.remedy.startswith("None needed")  # nothing to rebalance: what it is for holds


def test_a_swamped_loss_whose_prototypes_lose_their_usage_keeps_its_alarm(tmp_path):
    skewed = np.array([0.55, 0.3, 0.1, 0.02, 0.01, 0.01, 0.005, 0.005])
    run, usage = _routing(tmp_path, skewed, ("task", "balance"))
    assert usage < TH.usage_held_fraction
    found = {f.id: f for f in _swamping(run)}
    assert set(found) == {"gradient-swamping", "static-loss-weights"}
    assert found["gradient-swamping"].severity == "error"
    assert found["gradient-swamping"].evidence["prototype_usage_kept"] is None
    # Kept usage that only the task reaches is not the balancing loss's to claim.
    run, usage = _routing(tmp_path, np.full(8, 1 / 8), ("task",))
    assert usage >= TH.usage_held_fraction
    assert {f.id: f.severity for f in _swamping(run)} == {
        "gradient-swamping": "error", "static-loss-weights": "warning"}


def test_a_ratio_whose_spread_straddles_the_threshold_is_info(tmp_path):
    # The second loss's ratio alternates between 0.05 and 0.25 of the first's (60% of the
    # steps below the threshold 0.1): persistent, but its quartiles over the end window of
    # the judged steps straddle the threshold. The aux loss falls too (to a third of its
    # start): one that never recovers its fit keeps its alarm (test_swamping_outcome.py).
    rng = np.random.default_rng(1)
    low = (np.arange(STEPS) % 5) < 3
    scales = {"trunk": [np.array([1.0, 0.05 if b else 0.25]) for b in low]}
    rows = _write(tmp_path / "s.gprobe", ("task", "aux"), [1.0, 1.0], {"trunk": 4000},
                  [_falling(2.0, 0.5), _falling(1.5, 0.5)], scales, rng)
    found = _swamping(load_run(tmp_path / "s.gprobe"))
    assert [f.id for f in found] == ["gradient-swamping"]  # no static-loss-weights
    f = found[0]
    ratio = _numpy_ratio(rows, np.ones(2), 1)
    end_window = np.arange(STEPS) >= (STEPS - 1) * (1 - 0.2)  # window_share of the steps
    smooth = np.array([np.median(ratio[max(0, i - 1):i + 2]) for i in range(STEPS)])
    quartiles = np.quantile(smooth[end_window], [0.25, 0.75])
    assert quartiles[0] < TH.swamping_ratio < quartiles[1]
    assert f.severity == "info" and f.evidence["straddles_threshold"]
    assert f.evidence["ratio_quartiles"] == pytest.approx(quartiles, rel=1e-9)


def test_a_loss_at_its_floor_is_satisfied_not_swamped(tmp_path):
    # A term that rises from 0.01 to 1, then falls to 1e-6 (the covariance term after a
    # collapse to the origin): swamped by the ratio, but at its floor.
    rng = np.random.default_rng(2)
    ones = np.ones(STEPS)
    cov = np.concatenate([np.linspace(0.01, 1.0, 8), np.geomspace(1.0, 1e-6, 12),
                          1e-6 * ones[:STEPS - 20]])
    scales = {"encoder": [np.array([1.0, 1e-3]) for _ in ones]}
    path = tmp_path / "f.gprobe"
    _write(path, ("invariance", "covariance"), [1.0, 1.0], {"encoder": 300},
           [_falling(2.0, 0.5), cov], scales, rng)
    assert _swamping(load_run(path)) == []
    # Independently: its end window (the last 20% of the steps) is at most
    # swamping_floor_fraction of its initial level (the median of its first 3 values).
    assert np.median(cov[-int(0.2 * STEPS):]) <= TH.swamping_floor_fraction * np.median(cov[:3])
    # Without the floor rule it is found: before it fell, it was swamped, and its low start
    # keeps it "to learn" under learned_fraction alone.
    found = [f for f in diagnose(load_run(path), Thresholds(swamping_floor_fraction=0.0))
             if f.id == "gradient-swamping"]
    assert [f.subject for f in found] == ["covariance"]


def test_a_loss_that_fell_forty_fold_is_at_its_floor_but_one_at_four_percent_is_judged(tmp_path):
    # A reconstruction term swamped all run long that falls from 1.1 to 1.5% of it (MISA's
    # published recon: 1.4-1.5%) has done its job; one that ends at 4% of where it began (the
    # equal-weight Poisson PINN's boundary term: 4-44%) is still judged.
    rng = np.random.default_rng(3)
    ones = np.ones(STEPS)
    scales = {"encoder": [np.array([1.0, 0.03]) for _ in ones]}
    found = {}
    for end in (0.015, 0.04):
        recon = np.concatenate([_falling(1.1, 1.1 * end)[:STEPS - 8], 1.1 * end * ones[:8]])
        path = tmp_path / f"floor-{end}.gprobe"
        _write(path, ("cls", "recon"), [1.0, 1.0], {"encoder": 300},
               [_falling(2.0, 0.5), recon], scales, rng)
        # Independently: end window (last 20%) over the median of the first 3 values.
        fraction = np.median(recon[-int(0.2 * STEPS):]) / np.median(recon[:3])
        assert (fraction <= TH.swamping_floor_fraction) == (end == 0.015)
        found[end] = {f.id: f.severity for f in _swamping(load_run(path))}
        if end == 0.015:  # at the old floor (1e-3 of its initial level) it was judged
            old = [f.subject for f in diagnose(load_run(path),
                                               Thresholds(swamping_floor_fraction=1e-3))
                   if f.id == "gradient-swamping"]
            assert old == ["recon"]
    assert found == {0.015: {}, 0.04: {"gradient-swamping": "warning",
                                        "static-loss-weights": "warning"}}


def _adversary(tmp_path, adv_loss, role="adversarial"):
    """A task and an adversarial loss (a discriminator through a reversed gradient) whose
    weighted gradient is 3% of the task's on the shared encoder all run long."""
    rng = np.random.default_rng(4)
    scales = {"encoder": [np.array([1.0, 0.03]) for _ in range(STEPS)]}
    path = tmp_path / f"adv-{adv_loss[-1]:.3f}-{role}.gprobe"
    _write(path, ("task", "adv"), [1.0, 1.0], {"encoder": 300},
           [_falling(2.0, 0.5), adv_loss], scales, rng, roles={"adv": role})
    return load_run(path)


def test_a_swamped_adversary_at_chance_is_info_and_one_that_wins_keeps_its_alarm(tmp_path):
    # At chance: the discriminator's loss stays near log 2 (two tasks), as ASP-MTL's does
    # at its equilibrium (0.97-1.0 of its start window).
    noise = np.random.default_rng(5).normal(0.0, 0.005, STEPS)
    at_chance = np.log(2) * (1 - 0.02 * np.linspace(0, 1, STEPS)) + noise
    found = {f.id: f for f in _swamping(_adversary(tmp_path, at_chance))}
    assert set(found) == {"gradient-swamping"}  # static-loss-weights reads no info finding
    f = found["gradient-swamping"]
    window = int(0.2 * (STEPS - 1)) + 1  # window_share of the training steps 0..STEPS-1
    start, end = np.median(at_chance[:window]), np.median(at_chance[-window:])
    assert end >= TH.adversary_chance_fraction * start
    assert f.severity == "info" and f.evidence["adversary_at_chance"]["end_fraction"] == \
        pytest.approx(end / start, rel=1e-9)
    assert "its discriminator is at chance" in f.title and f.remedy.startswith("None needed")
    # The same loss under another role is judged by its gradient share alone.
    assert {f.id: f.severity for f in _swamping(_adversary(tmp_path, at_chance, "other"))} \
        == {"gradient-swamping": "warning", "static-loss-weights": "warning"}
    # A discriminator that wins (its loss falls to 45% of chance, as in DANN with the
    # reversal cut off) reads the domain from the features: the alarm stands.
    wins = np.log(2) * np.geomspace(1.0, 0.45, STEPS) + noise
    assert np.median(wins[-window:]) < TH.adversary_chance_fraction * np.median(wins[:window])
    found = {f.id: f for f in _swamping(_adversary(tmp_path, wins))}
    assert {i: f.severity for i, f in found.items()} == {
        "gradient-swamping": "warning", "static-loss-weights": "warning"}
    assert found["gradient-swamping"].evidence["adversary_at_chance"] is None


# -- the probe records the blocks -------------------------------------------------------------

class Gated(nn.Module):
    """A trunk, a gate over three outputs (read by the task and by a balancing loss) and a
    task head."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 12)
        self.gate = nn.Linear(12, 3)
        self.head = nn.Linear(12, 3)

    def losses(self, x, y):
        h = torch.tanh(self.trunk(x))
        p = torch.softmax(self.gate(h), dim=-1)
        task = F.mse_loss((self.head(h) * p).sum(-1), y)
        balance = p.mean(0).pow(2).sum() * 3
        return {"task": task, "balance": balance}


def _independent_blocks(model, losses):
    """Per layer: the K x K Gram matrix of the per-loss gradients on its parameters, from one
    torch.autograd.grad per loss and layer, in numpy."""
    out = {}
    for layer in ("trunk", "gate"):
        params = list(getattr(model, layer).parameters())
        rows = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            rows.append(np.concatenate([g.detach().double().numpy().ravel() for g in grads]))
        j = np.vstack(rows)
        out[layer] = j @ j.T
    return out


@pytest.mark.parametrize("assemble", [False, True])
def test_the_probe_records_each_shared_layers_block(assemble):
    torch.manual_seed(0)
    model = Gated()
    probe = gradprobe.Probe(model, every=1, assemble=assemble)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    for _ in range(5):
        x, y = torch.randn(32, 6), torch.randn(32)
        losses = model.losses(x, y)
        expected.append(_independent_blocks(model, losses))
        probe.backward(losses, {"balance": 0.5})
        opt.step()
        opt.zero_grad()
    probe.close()
    run = run_from_state(probe.state_dict(), "gated")
    assert "per-layer blocks of the whole shared set" in run.events("shared_set")[0]["message"]
    # The Gram matrix stays on the nearest layer every path crosses (the trunk); the blocks
    # cover every layer the task and the balancing loss both reach (the head is the task's).
    assert run.meta["shared_parameters"] == ["trunk.bias", "trunk.weight"]
    assert run.array_names("grad_gram_layer") == ["gate", "trunk"]
    _, gram = run.arrays("grad_gram", "shared")
    for layer in ("trunk", "gate"):
        steps, blocks = run.arrays("grad_gram_layer", layer)
        assert list(steps) == [0, 1, 2, 3, 4]
        for got, want in zip(blocks, expected):
            assert np.allclose(got, want[layer], rtol=1e-5, atol=1e-12)
    for got, want in zip(gram, expected):
        assert np.allclose(got, want["trunk"], rtol=1e-5, atol=1e-12)


def test_over_the_budget_only_the_nearest_layers_block_is_recorded_and_said(monkeypatch):
    monkeypatch.setattr(per_loss, "WHOLE_SET_ENTRIES", 100)
    torch.manual_seed(0)
    model = Gated()
    probe = gradprobe.Probe(model, every=1)
    probe.backward(model.losses(torch.randn(8, 6), torch.randn(8)))
    probe.close()
    run = run_from_state(probe.state_dict(), "gated")
    message = run.events("shared_set")[0]["message"]
    numel = sum(p.numel() for p in (*model.trunk.parameters(), *model.gate.parameters()))
    assert "per-layer blocks of it alone" in message and f"2 x {numel} " in message
    assert run.meta["shared_parameters"] == ["trunk.bias", "trunk.weight"]
    assert run.array_names("grad_gram_layer") == ["trunk"]


def test_blocks_beyond_the_cap_merge_into_their_parents():
    names = [f"blocks.{i}.{part}.weight" for i in range(3) for part in ("attn", "mlp")] + \
        ["embed.weight", "scale"]
    assert block_names(names, cap=8) == [n.rpartition(".")[0] for n in names[:-1]] + [MODEL_BLOCK]
    assert block_names(names, cap=5) == [f"blocks.{i}" for i in range(3) for _ in (0, 1)] + \
        ["embed", MODEL_BLOCK]
    assert block_names(names, cap=3) == ["blocks"] * 6 + ["embed", MODEL_BLOCK]
    assert block_names(names, cap=2) == [MODEL_BLOCK] * 8
