"""Mixed precision (autocast, GradScaler), gradient accumulation and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe import ProbeUsageError

from models import WEIGHTS, TwoLatentNet, four_losses, make_data


def independent_norms(losses, params):
    """Per-loss gradient norms on ``params`` by plain autograd (no probe, no scaling)."""
    norms = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[name] = sum(float(g.double().square().sum()) for g in grads if g is not None) ** 0.5
    return norms


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def train_with_scaler(steps, probe_factory=None, spikes=None):
    """SGD with a CPU GradScaler. ``spikes``: {step: module} whose bias gets a gradient that
    overflows once scaled (1e38 times the scale), so the scaler skips that step. The head's
    spike never reaches the shared trunk: a probe says so once."""
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    probe = probe_factory(model) if probe_factory else None
    expected_norms, moved = [], []
    for step in range(steps):
        losses, _ = four_losses(model, x[:16], y[:16], g[:16])
        for name, module in (("spike_trunk", model.trunk[0]), ("spike_head", model.head)):
            big = 1e38 if (spikes or {}).get(step) == name else 0.0
            losses[name] = big * module.bias.sum()
        expected_norms.append(independent_norms(losses, list(model.trunk.parameters())))
        before = params_of(model)
        if probe is None:
            scaler.scale(sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items())).backward()
        else:
            probe.backward(losses, weights=WEIGHTS, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, params_of(model))))
    if probe is not None:
        probe.close()
    return model, expected_norms, moved


def test_grad_scaler_norms_are_unscaled_and_updates_unchanged(tmp_path):
    log = tmp_path / "amp.gprobe"
    plain, _, _ = train_with_scaler(5)
    # 'spike_head' (a multiple of the head's bias, no data) reads as a penalty from its graph:
    # missing the shared trunk is its design, so no warning (any would fail the test)
    probed, expected, _ = train_with_scaler(
        5, lambda m: gradprobe.Probe(m, shared=m.trunk, every=1, run_file=log))
    for a, b in zip(params_of(plain), params_of(probed)):
        assert torch.equal(a, b)
    run = gradprobe.load_run(log)
    for name in ("task", "cont", "proto", "orth"):
        np.testing.assert_allclose(run.series("grad_norm", name)[1],
                                   [e[name] for e in expected], rtol=1e-5)
    np.testing.assert_array_equal(run.series("grad_scale", "amp")[1], [2.0 ** 10] * 5)
    assert run.meta["grad_scaler"] is True
    assert run.roles["spike_head"] == "regularization"


def test_steps_the_scaler_skips_are_recorded_as_skipped_not_non_finite(tmp_path):
    log = tmp_path / "skip.gprobe"
    # Step 2 overflows on the shared trunk (seen in the per-loss gradients themselves); step 4
    # only on the head, outside the shared set (seen when the scaler lowers its scale).
    _, _, moved = train_with_scaler(
        6, lambda m: gradprobe.Probe(m, shared=m.trunk, every=1, run_file=log),
        spikes={2: "spike_trunk", 4: "spike_head"})
    skipped_by_scaler = [s for s, m in enumerate(moved) if not m]
    assert skipped_by_scaler == [2, 4]
    run = gradprobe.load_run(log)
    assert [e["step"] for e in run.events("skipped_step")] == skipped_by_scaler
    assert run.events("non_finite") == []
    assert run.probe_steps().tolist() == list(range(6))


def test_bfloat16_autocast_records_the_autocast_graph_and_leaves_training_unchanged(tmp_path):
    def train(probe_factory=None):
        torch.manual_seed(0)
        model = TwoLatentNet()
        x, y, g = make_data()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        probe = probe_factory(model) if probe_factory else None
        expected = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses, (_, z_E, _) = four_losses(model, x[:16], y[:16], g[:16])
            expected.append(independent_norms(losses, list(model.trunk.parameters())))
            if probe is None:
                sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items()).backward()
            else:
                probe.observe(z_E=z_E)
                probe.backward(losses, weights=WEIGHTS)
            opt.step()
            opt.zero_grad()
        if probe is not None:
            probe.close()
        return model, expected

    def attach(m):
        probe = gradprobe.Probe(m, shared=m.trunk, every=1, run_file=tmp_path / "bf16.gprobe")
        probe.watch_latent("z_E")
        return probe

    plain, _ = train()
    probed, expected = train(attach)
    for a, b in zip(params_of(plain), params_of(probed)):
        assert torch.equal(a, b)
    run = gradprobe.load_run(tmp_path / "bf16.gprobe")
    np.testing.assert_allclose(run.series("grad_norm", "task")[1], [e["task"] for e in expected],
                               rtol=1e-5)
    assert np.isfinite(run.series("effective_rank", "z_E")[1]).all()  # bf16 latent upcast


@pytest.mark.parametrize("assemble", [False, True])
def test_gradient_accumulation_probes_each_micro_batch(tmp_path, assemble):
    micro, accumulate = 8, 2

    def train(probe_factory=None):
        torch.manual_seed(0)
        model = TwoLatentNet()
        x, y, g = make_data()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        probe = probe_factory(model) if probe_factory else None
        first_micro_norms = []
        for step in range(3):
            for m in range(accumulate):
                idx = torch.arange((step * accumulate + m) * micro,
                                   (step * accumulate + m + 1) * micro)
                losses, _ = four_losses(model, x[idx], y[idx], g[idx])
                losses = {k: v / accumulate for k, v in losses.items()}
                if m == 0:
                    first_micro_norms.append(independent_norms(losses,
                                                               list(model.trunk.parameters())))
                if probe is None:
                    sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items()).backward()
                else:
                    probe.backward(losses, weights=WEIGHTS)
            opt.step()
            opt.zero_grad()
        if probe is not None:
            probe.close()
        return model, first_micro_norms

    log = tmp_path / "accumulate.gprobe"
    plain, _ = train()
    # every=accumulate: the first micro-batch of each optimizer step is probed.
    probed, expected = train(lambda m: gradprobe.Probe(m, shared=m.trunk, every=accumulate,
                                                       run_file=log, assemble=assemble))
    for a, b in zip(params_of(plain), params_of(probed)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    run = gradprobe.load_run(log)
    assert run.probe_steps().tolist() == [0, 2, 4]
    np.testing.assert_allclose(run.series("grad_norm", "cont")[1], [e["cont"] for e in expected],
                               rtol=1e-5)


def test_compiled_model_is_refused_with_the_reason():
    model = TwoLatentNet()
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first call
    with pytest.raises(ProbeUsageError, match="torch.compile'd model.*fused autograd node"):
        gradprobe.Probe(compiled)
    probe = gradprobe.Probe(compiled._orig_mod)  # the eager model it wraps is fine
    with pytest.warns(gradprobe.GradprobeWarning, match="without having seen a backward"):
        probe.close()  # (closed before any backward: it recorded nothing, and says so)
