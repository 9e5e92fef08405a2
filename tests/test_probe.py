"""The probe records exact per-loss gradient statistics and does not change training."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe import ProbeUsageError

from models import WEIGHTS, TwoLatentNet, four_losses, make_data, train


def attach(model, **kwargs):
    probe = gradprobe.Probe(model, **kwargs)
    probe.watch_latent("z_I", model.f_I)
    probe.watch_latent("z_E")
    return probe


def test_gram_and_norms_match_independent_autograd(tmp_path):
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    probe = attach(model, shared=model.trunk, every=1, run_file=tmp_path / "r.gprobe")
    losses, (z_I, z_E, _) = four_losses(model, x[:32], y[:32], g[:32])
    # The independent computation: one autograd.grad per loss, flattened.
    trunk = list(model.trunk.parameters())
    rows, latent_norms = [], {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, trunk + [z_I, z_E], retain_graph=True, allow_unused=True)
        rows.append(torch.cat([gr.reshape(-1) for gr in grads[:len(trunk)]]).double())
        for latent, gr in zip(("z_I", "z_E"), grads[len(trunk):]):
            latent_norms[f"{latent}|{name}"] = 0.0 if gr is None else \
                float(torch.linalg.vector_norm(gr))
    J = torch.stack(rows)
    expected_gram = (J @ J.T).numpy()
    probe.observe(z_E=z_E)
    probe.backward(losses, weights=WEIGHTS)
    # Read lazily from the step's copy to the host (demo balancer, gradprobe.remedies).
    norms = {name: float(torch.linalg.vector_norm(row)) for name, row in zip(losses, J)}
    assert probe.last_grad_norms == pytest.approx(norms, rel=1e-5)
    probe.close()

    run = gradprobe.load_run(tmp_path / "r.gprobe")
    names = list(losses)
    _, grams = run.arrays("grad_gram", "shared")
    np.testing.assert_allclose(grams[0], expected_gram, rtol=1e-5)
    for k, name in enumerate(names):
        norm = float(torch.linalg.vector_norm(J[k]))
        w = WEIGHTS.get(name, 1.0)
        np.testing.assert_allclose(run.series("grad_norm", name)[1], [norm], rtol=1e-5)
        np.testing.assert_allclose(run.series("weighted_grad_norm", name)[1], [w * norm], rtol=1e-5)
        np.testing.assert_allclose(run.series("weight", name)[1], [w])
        for j in range(k + 1, len(names)):
            pair = f"{name}|{names[j]}"
            cos = float(J[k] @ J[j]) / (norm * float(torch.linalg.vector_norm(J[j])))
            np.testing.assert_allclose(run.series("grad_cosine", pair)[1], [cos], rtol=1e-5)
            nj = float(torch.linalg.vector_norm(J[j]))
            np.testing.assert_allclose(run.series("magnitude_similarity", pair)[1],
                                       [2 * norm * nj / (norm ** 2 + nj ** 2)], rtol=1e-5)
    w = torch.tensor([WEIGHTS.get(n, 1.0) for n in names], dtype=torch.float64)
    combined = float(torch.linalg.vector_norm(w @ J))
    np.testing.assert_allclose(run.series("combined_grad_norm", "shared")[1], [combined], rtol=1e-5)
    total = w @ J
    for k, name in enumerate(names):
        share = float(w[k] * (J[k] @ total)) / combined ** 2
        np.testing.assert_allclose(run.series("grad_contribution", name)[1], [share], rtol=1e-5)
    for key, value in latent_norms.items():
        np.testing.assert_allclose(run.series("latent_grad_norm", key)[1], [value], rtol=1e-5,
                                   atol=1e-12)
    assert run.meta["shared_parameters"] == [n for n, _ in model.named_parameters()
                                             if n.startswith("trunk.")]


def test_a_probe_step_reads_nothing_on_the_host_and_what_the_writer_finds_is_warned(tmp_path):
    from gradprobe.opcount import count_ops
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    probe = attach(model, shared=model.trunk, every=1, run_file=tmp_path / "r.gprobe")
    probe.watch_prototypes("cell", torch.randn(4, 8), latent="z_E")
    for step in range(3):
        losses, (_, z_E, _) = four_losses(model, x[:16], y[:16], g[:16])
        probe.observe(z_E=z_E * float("nan") if step == 2 else z_E, groups=g[:16])
        with count_ops(cpu_as_device=True) as counts:
            probe.backward(losses, weights=WEIGHTS)
        # Every sync of the step is the model's own (F.one_hot); none is the probe's.
        assert [site for site in counts.sync_sites if "gradprobe" in site] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe.close()  # the writer thread found the NaN latent; its warning comes by here
    messages = [str(w.message) for w in caught]
    assert any("latent 'z_E' holds NaN or Inf" in m for m in messages), messages
    # The prototypes' usage cannot be measured from NaN rows: that watch alone is dropped.
    assert any("watch 'cell' disabled (ValueError: e contains NaN/Inf" in m for m in messages)
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    assert [(e["step"], e["name"]) for e in run.events("non_finite")] == [(2, "z_E")]
    assert [(e["step"], e["name"]) for e in run.events("watch_disabled")] == [(2, "cell")]
    assert run.series("effective_rank", "z_E")[0].tolist() == [0, 1]
    assert run.series("prototype_usage", "cell")[0].tolist() == [0, 1]
    assert run.probe_steps().tolist() == [0, 1, 2]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_probe_every_step_leaves_training_unchanged(optimizer):
    # The separate path runs the ordinary backward of the same weighted total: the updates
    # are those of the plain loop's sum(w * L), bit for bit.
    plain, _ = train(30, optimizer=optimizer)
    probed, probe = train(30, lambda m: attach(m, shared=m.trunk, every=1), optimizer=optimizer)
    assert probe.enabled and probe.step == 30 and probe.backward_path == "separate"
    for a, b in zip(_params(plain), _params(probed)):
        assert torch.equal(a, b)


def test_a_loss_in_float64_is_probed_in_its_own_precision(tmp_path):
    # A physics residual computed in float64 beside float32 losses: each loss's backward is
    # seeded in its own dtype, and its recorded norm is that of an independent autograd.grad.
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    probe = gradprobe.Probe(model, shared=model.trunk, every=1, run_file=tmp_path / "r.gprobe")
    losses, (z_I, _, _) = four_losses(model, x[:32], y[:32], g[:32])
    losses["residual"] = (z_I.double() ** 2).mean() * 1e-3
    weights = dict(WEIGHTS, residual=torch.tensor(0.5, dtype=torch.float64))
    trunk = list(model.trunk.parameters())
    expected = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, trunk, retain_graph=True)
        expected[name] = float(torch.linalg.vector_norm(
            torch.cat([gr.reshape(-1).double() for gr in grads])))
    reference = [p.detach().clone() for p in model.parameters()]
    sum(weights.get(k, 1.0) * v for k, v in losses.items()).backward(retain_graph=True)
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    probe.backward(losses, weights=weights)
    assert probe.last_grad_norms == pytest.approx(expected, rel=1e-6)
    for p, before, grad in zip(model.parameters(), reference, plain_grads):
        assert torch.equal(p.detach(), before) and torch.equal(p.grad, grad)
    probe.close()


def test_assembled_backward_fills_grad_like_the_ordinary_backward():
    # SGD: the update is linear in .grad, so float32 rounding of the assembled sum stays tiny.
    plain, _ = train(30, optimizer="sgd")
    probed, probe = train(30, lambda m: attach(m, shared=m.trunk, every=1, assemble=True),
                          optimizer="sgd")
    assert probe.backward_path == "assembled"
    for a, b in zip(_params(plain), _params(probed)):
        assert torch.allclose(a, b, rtol=1e-5)
    # Adam divides by sqrt(v): rounding-level differences in .grad stay at rounding level.
    plain, _ = train(30, optimizer="adam")
    probed, _ = train(30, lambda m: attach(m, shared=m.trunk, every=1, assemble=True))
    for a, b in zip(_params(plain), _params(probed)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_watch_that_raises_is_dropped_alone_and_training_finishes(tmp_path):
    calls = {"n": 0}

    def flaky_prototypes(model):
        def source():
            calls["n"] += 1
            if calls["n"] >= 4:
                raise RuntimeError("prototype store went away")
            return model.prototypes
        return source

    def factory(m):
        probe = attach(m, shared=m.trunk, every=1, run_file=tmp_path / "r.gprobe")
        probe.watch_prototypes("cell", flaky_prototypes(m))
        return probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain, _ = train(12)
        probed, probe = train(12, factory)
    dropped = [str(w.message) for w in caught if "disabled" in str(w.message)]
    assert len(dropped) == 1
    assert "watch 'cell' disabled (RuntimeError: prototype store went away)" in dropped[0]
    assert probe.enabled and probe.step == 12
    for a, b in zip(_params(plain), _params(probed)):
        assert torch.allclose(a, b, rtol=1e-5)
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    # the losses and the other watches go on; the prototypes stop where their source failed
    assert run.probe_steps().tolist() == list(range(12))
    assert run.series("effective_rank", "z_E")[0].tolist() == list(range(12))
    assert run.series("prototype_min_distance", "cell")[0].tolist() == [0, 1, 2]
    assert [(e["step"], e["name"]) for e in run.events("watch_disabled")] == [(3, "cell")]
    assert run.events("probe_disabled") == []


def test_unwritable_run_file_warns_once_and_keeps_what_was_written(tmp_path):
    def factory(m):
        probe = attach(m, shared=m.trunk, every=1, run_file=tmp_path / "r.gprobe")
        # The run file's own writer, which the probe's background writer drives.
        real_write = probe._writer._writer.write_step

        def failing_write(step, *args, **kwargs):
            if step >= 5:
                raise OSError(28, "No space left on device")
            return real_write(step, *args, **kwargs)

        probe._writer._writer.write_step = failing_write
        return probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, probe = train(10, factory)
    assert sum("disabled itself" in str(w.message) for w in caught) == 1
    assert probe.step == 10
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    assert run.probe_steps().tolist() == [0, 1, 2, 3, 4]


def test_bad_losses_and_weights_are_clear_errors_at_the_first_step():
    model = TwoLatentNet()
    x, y, g = make_data()
    losses, _ = four_losses(model, x[:8], y[:8], g[:8])
    probe = gradprobe.Probe(model, every=1)
    with pytest.raises(ProbeUsageError, match="shape \\[8\\]"):
        probe.backward({"task": torch.ones(8, requires_grad=True)})
    with pytest.raises(ProbeUsageError, match="unknown losses \\['typo'\\]"):
        probe.backward(losses, weights={"typo": 0.1})
    with pytest.raises(ProbeUsageError, match="every must be a positive integer"):
        gradprobe.Probe(model, every=0)
    with pytest.raises(ProbeUsageError, match="unknown role 'contrastiv'"):
        gradprobe.Probe(model, roles={"cont": "contrastiv"})
    with pytest.raises(ProbeUsageError, match="'z'.*no watch expects"):
        probe.observe(z=torch.ones(3))
    assert probe.step == 0


def test_non_finite_inert_and_unshared_losses_are_recorded(tmp_path):
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    probe = gradprobe.Probe(model, shared=model.trunk, every=1, run_file=tmp_path / "r.gprobe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            losses, (z_I, z_E, _) = four_losses(model, x[:16], y[:16], g[:16])
            losses["detached"] = (z_I.detach() ** 2).mean()        # trains nothing
            losses["head_only"] = model.head.weight.pow(2).sum()    # never reaches the trunk
            if step == 2:
                losses["cont"] = losses["cont"] * float("nan")
            probe.backward(losses)
        probe.close()  # tells what the writer found at step 2: 'cont' is non-finite
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    assert {e["name"] for e in run.events("inert_loss")} == {"detached"}
    assert {e["name"] for e in run.events("no_shared_path")} == {"head_only"}
    non_finite = run.events("non_finite")
    assert non_finite[0]["step"] == 2 and non_finite[0]["name"] == "cont"
    assert math.isnan(run.series("loss", "cont")[1][2])
    np.testing.assert_array_equal(run.series("grad_norm", "detached")[1], [0.0, 0.0, 0.0])
    # One warning per (kind, loss), not one per step.
    assert sum("'detached'" in str(w.message) for w in caught) == 1
    assert sum("'cont'" in str(w.message) for w in caught) == 1


def test_shared_inferred_from_the_graph_is_the_nearest_shared_layer(tmp_path):
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    losses, _ = four_losses(model, x[:16], y[:16], g[:16])
    reached = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True,
                                    allow_unused=True)
        for (pname, _), gr in zip(model.named_parameters(), grads):
            if gr is not None:
                reached[pname] = reached.get(pname, 0) + 1
    shared_everywhere = sorted(p for p, c in reached.items() if c >= 2)
    probe = gradprobe.Probe(model, every=1, run_file=tmp_path / "a.gprobe")
    probe.backward(losses)
    probe.close()
    chosen = gradprobe.load_run(tmp_path / "a.gprobe").meta["shared_parameters"]
    assert set(chosen) <= set(shared_everywhere)
    # f_I and f_E are each reached by several losses, but 'proto' bypasses f_I and the f_I
    # path bypasses f_E: the nearest layer every path of every loss crosses is the trunk's
    # last convolution. Checked by cutting each layer's output from the graph: only a layer
    # all paths cross leaves the trunk's first convolution without gradient from every loss.
    assert {c.rpartition(".")[0] for c in chosen} == {"trunk.2"}

    def deepest_gradients(cut):
        handle = cut.register_forward_hook(lambda module, inputs, output: output.detach())
        cut_losses, _ = four_losses(model, x[:16], y[:16], g[:16])
        handle.remove()
        return [torch.autograd.grad(loss, model.trunk[0].weight, retain_graph=True,
                                    allow_unused=True)[0] if loss.requires_grad else None
                for loss in cut_losses.values()]

    assert all(gr is None for gr in deepest_gradients(model.trunk[2]))
    for bypassed in (model.f_I, model.f_E):
        assert any(gr is not None for gr in deepest_gradients(bypassed))

    losses, _ = four_losses(model, x[:16], y[:16], g[:16])
    probe = gradprobe.Probe(model, "all", every=1, run_file=tmp_path / "b.gprobe")
    probe.backward(losses)
    probe.close()
    assert gradprobe.load_run(tmp_path / "b.gprobe").meta["shared_parameters"] == shared_everywhere


def test_changing_weights_are_recorded_as_used(tmp_path):
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradprobe.Probe(model, shared=model.trunk, every=2, run_file=tmp_path / "r.gprobe")
    used = {}
    for step in range(6):
        losses, _ = four_losses(model, x[:16], y[:16], g[:16])
        w = torch.tensor(0.1 * (step + 1))
        used[step] = float(w)
        total = probe.backward(losses, weights={"cont": w})
        expected = sum((float(w) if k == "cont" else 1.0) * float(v.detach())
                       for k, v in losses.items())
        assert float(total) == pytest.approx(expected, rel=1e-6)
        opt.step()
        opt.zero_grad()
        probe.log(lr=0.01 * (step + 1))
    probe.close()
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    steps, weights = run.series("weight", "cont")
    assert steps.tolist() == [0, 2, 4]
    np.testing.assert_allclose(weights, [used[s] for s in steps.tolist()])
    steps, lrs = run.series("logged", "lr")
    assert steps.tolist() == list(range(6))
    np.testing.assert_allclose(lrs, [0.01 * (s + 1) for s in range(6)])
    assert run.roles["cont"] == "contrastive" and "cont" in run.meta["roles_guessed"]


def test_checkpoint_loads_with_weights_only_and_resumes(tmp_path):
    log = tmp_path / "r.gprobe"
    model, probe = train(6, lambda m: attach(m, shared=m.trunk, every=2, run_file=log))
    ckpt = tmp_path / "run.ckpt"
    torch.save({"model": model.state_dict(), "gradprobe": probe.state_dict()}, ckpt)
    loaded = torch.load(ckpt, weights_only=True)
    assert loaded["gradprobe"]["step"] == 6
    run = gradprobe.load_run(ckpt)
    assert run.probe_steps().tolist() == [0, 2, 4]
    np.testing.assert_allclose(run.series("grad_norm", "task")[1],
                               gradprobe.load_run(log).series("grad_norm", "task")[1])

    # Resume into the same run file: the step counter continues.
    resumed = attach(model, shared=model.trunk, every=2, run_file=log)
    resumed.load_state_dict(loaded["gradprobe"])
    x, y, g = make_data()
    for _ in range(4):
        losses, (_, z_E, _) = four_losses(model, x[:16], y[:16], g[:16])
        resumed.observe(z_E=z_E)
        resumed.backward(losses)
    resumed.close()
    assert gradprobe.load_run(log).probe_steps().tolist() == [0, 2, 4, 6, 8]

    # The run file is gone (the checkpoint went to a colleague): it is recreated from the state.
    log.unlink()
    again = attach(model, shared=model.trunk, every=2, run_file=log)
    again.load_state_dict(loaded["gradprobe"])
    losses, (_, z_E, _) = four_losses(model, x[:16], y[:16], g[:16])
    again.observe(z_E=z_E)
    again.backward(losses)
    again.close()
    assert gradprobe.load_run(log).probe_steps().tolist() == [0, 2, 4, 6]


def test_existing_run_file_and_second_writer_are_refused(tmp_path):
    log = tmp_path / "r.gprobe"
    train(2, lambda m: attach(m, shared=m.trunk, every=1, run_file=log))
    with pytest.raises(ProbeUsageError, match="already holds a recorded run"):
        train(1, lambda m: attach(m, shared=m.trunk, every=1, run_file=log))
    first = gradprobe.Probe(TwoLatentNet(), every=1, run_file=tmp_path / "s.gprobe")
    with pytest.raises(gradprobe.RunFileError, match="already being written"):
        gradprobe.Probe(TwoLatentNet(), every=1, run_file=tmp_path / "s.gprobe")
    with pytest.warns(gradprobe.GradprobeWarning, match="without having seen a backward"):
        first.close()  # it recorded nothing, and says so
    _, probe = train(2, lambda m: attach(m, shared=m.trunk, every=1, run_file=log, overwrite=True))
    assert gradprobe.load_run(log).probe_steps().tolist() == [0, 1]


def test_non_probe_steps_record_nothing_but_the_logged_scalars(tmp_path):
    _, probe = train(10, lambda m: attach(m, shared=m.trunk, every=5, run_file=tmp_path / "r.gprobe"))
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    assert run.probe_steps().tolist() == [0, 5]
    assert run.series("loss", "task")[0].tolist() == [0, 5]


def test_each_watch_keeps_its_own_cadence(tmp_path):
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    probe = gradprobe.Probe(model, shared=model.trunk, every=2, run_file=tmp_path / "r.gprobe")
    probe.watch_latent("z_I", model.f_I, every=6)
    probe.watch_latent("z_E")                                   # the probe's own cadence
    probe.watch_saturation("logit", every=4)
    probe.watch_prototypes("proto", lambda: model.prototypes, every=8)
    for step in range(13):
        idx = torch.arange(16 * step, 16 * (step + 1)) % len(x)
        losses, (z_I, z_E, logit) = four_losses(model, x[idx], y[idx], g[idx])
        probe.observe(z_E=z_E, logit=logit)
        probe.backward(losses, weights=WEIGHTS)
    probe.close()
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    assert run.probe_steps().tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert run.series("effective_rank", "z_I")[0].tolist() == [0, 6, 12]
    assert run.series("effective_rank", "z_E")[0].tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert run.series("saturated_fraction", "logit")[0].tolist() == [0, 4, 8, 12]
    assert run.series("prototype_rank", "proto")[0].tolist() == [0, 8]


def test_watch_saturation_reads_a_sigmoid_input_or_another_module_output(tmp_path):
    torch.manual_seed(0)
    linear, sigmoid = torch.nn.Linear(4, 3), torch.nn.Sigmoid()
    model = torch.nn.Sequential(linear, sigmoid)
    x = 3.0 * torch.randn(64, 4)
    probe = gradprobe.Probe(model, every=1, run_file=tmp_path / "r.gprobe")
    probe.watch_saturation("at_sigmoid", sigmoid, threshold=1.0)
    probe.watch_saturation("at_linear", linear, threshold=1.0, target="y")
    y = (torch.rand(64, 3) > 0.5).float()
    probe.observe(y=y)
    out = model(x)
    probe.backward({"fit": (out - y).pow(2).mean(), "aux": out.mean()})
    probe.close()
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    logits = linear(x).detach()
    expected = float((logits.abs() > 1.0).double().mean())
    # Both see the logits: the sigmoid's input is the linear layer's output.
    assert run.series("saturated_fraction", "at_sigmoid")[1].tolist() == [expected]
    assert run.series("saturated_fraction", "at_linear")[1].tolist() == [expected]
    wrong = ((logits.abs() > 1.0) & ((torch.sigmoid(logits) - y).abs() > 0.5)).double().mean()
    assert run.series("saturated_wrong_fraction", "at_linear")[1].tolist() == [float(wrong)]
    with pytest.raises(ProbeUsageError, match="target must name a tensor"):
        probe.watch_saturation("again", target="at_linear")
