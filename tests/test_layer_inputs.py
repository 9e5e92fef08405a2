"""The probe's Gram matrix with shared Linear and Conv layers read from their inputs
(layer_inputs.py) equals autograd's J J^T, on the separate and the assembled path (where
``.grad`` then equals the ordinary backward's), falls back to the autograd way where the capture
cannot be trusted, and hooks the layers only for probe steps."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.probe import per_loss

from test_layer_gram import autograd_gram


class TokenNet(nn.Module):
    """A trunk of Linear layers, one applied twice per forward on tokens [B, T, d]."""

    def __init__(self, bias: bool = True, inplace: bool = False):
        super().__init__()
        self.embed = nn.Linear(32, 128, bias=bias)
        self.mix = nn.Linear(128, 128, bias=not bias)
        self.act = nn.ReLU(inplace=inplace)
        self.head_a = nn.Linear(128, 1)
        self.head_b = nn.Linear(128, 3)

    def trunk(self, tokens):
        h = torch.tanh(self.embed(tokens))          # [B, T, 128]
        h = self.act(self.mix(h))
        return self.mix(h).mean(dim=1)              # the second call of mix

    def forward(self, tokens):
        h = self.trunk(tokens)
        return self.head_a(h).squeeze(1), self.head_b(h)


def losses_of(model, *inputs, target):
    a, b = model(*inputs)
    return {"task": F.mse_loss(a, target),
            "aux": F.softplus(b).mean(),
            "l2": model.head_a.weight.pow(2).sum() * 1e-2}  # reaches no trunk layer


def trunk_params(model):
    return [p for m in (model.embed, model.mix) for p in m.parameters()]


class ConvNet(nn.Module):
    """A trunk of Conv1d and Conv2d layers with stride, padding and dilation; one grouped
    convolution (the autograd way) and one Conv2d applied twice per forward."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.wave = nn.Conv1d(8, 48, 3, stride=2, padding=2, dilation=2, bias=bias)
        self.grouped = nn.Conv1d(48, 48, 1, groups=2)
        self.image = nn.Conv2d(8, 32, 3, stride=2, padding=1, bias=not bias)
        self.mix = nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=bias)
        self.head_a = nn.Linear(48 * 5 + 32 * 9, 1)
        self.head_b = nn.Linear(48 * 5 + 32 * 9, 3)

    def forward(self, wave, image):
        a = torch.tanh(self.grouped(torch.tanh(self.wave(wave))))   # [B, 48, 5]
        h = torch.tanh(self.image(image))                           # [B, 32, 3, 3]
        h = self.mix(torch.tanh(self.mix(h)))
        h = torch.cat([a.flatten(1), h.flatten(1)], 1)
        return self.head_a(h).squeeze(1), self.head_b(h)


def conv_batch(dtype):
    return (torch.randn(2, 8, 9, dtype=dtype), torch.randn(2, 8, 6, 6, dtype=dtype)), \
        torch.randn(2, dtype=dtype)


def conv_trunk(model):
    return [p for m in (model.wave, model.grouped, model.image, model.mix)
            for p in m.parameters()]


def token_batch(dtype):
    return (torch.randn(4, 6, 32, dtype=dtype),), torch.randn(4, dtype=dtype)


def run_probe(model, tmp_path, monkeypatch, steps=4, scaler=None, every=1, extra=None,
              assemble=False, batch=token_batch, shared=trunk_params, grads=None):
    """Probe ``steps`` steps on the trunk; returns the recorded Gram matrices, autograd's own
    (taken before each backward) and the layers routed at each step. ``grads``: a list that
    gets, per probe step, (the ordinary backward's .grad, the probe's .grad)."""
    routed = []
    real = per_loss.routed_gram

    def spy(layers, scale):
        routed.append([entry.layer for entry in layers])
        return real(layers, scale)

    monkeypatch.setattr(per_loss, "routed_gram", spy)
    path = tmp_path / "r.gprobe"
    probe = gradprobe.Probe(model, shared=shared(model), every=every, run_file=path,
                            assemble=assemble)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = next(model.parameters()).dtype
    params = list(model.parameters())
    weights = {"aux": 0.3}
    expected = []
    torch.manual_seed(1)
    for step in range(steps):
        inputs, target = batch(dtype)
        losses = losses_of(model, *inputs, target=target)
        if extra is not None:
            extra(model, losses)
        if probe.is_probe_step:
            expected.append(autograd_gram(list(losses.values()), shared(model)))
            if grads is not None:
                total = sum(weights.get(k, 1.0) * v for k, v in losses.items())
                plain = torch.autograd.grad(total if scaler is None else scaler.scale(total),
                                            params, retain_graph=True)
        probe.backward(losses, weights, scaler=scaler)
        if grads is not None and probe.backward_path == "assembled":
            grads.append((plain, [p.grad.clone() for p in params]))
        (scaler.step(opt), scaler.update()) if scaler is not None else opt.step()
        opt.zero_grad()
    probe.close()
    _, grams = gradprobe.load_run(path).arrays("grad_gram", "shared")
    return [torch.tensor(g) for g in grams], expected, routed, probe


@pytest.mark.parametrize("bias", [True, False])
def test_float64_gram_from_layer_inputs_equals_autograd(tmp_path, monkeypatch, bias):
    torch.manual_seed(0)
    model = TokenNet(bias=bias).double()
    grams, expected, routed, probe = run_probe(model, tmp_path, monkeypatch)
    assert probe.enabled and len(grams) == len(expected) == 4
    # The first probe step takes the autograd way (no hooks yet); every later one routes both
    # trunk layers: the input route pays with N = 4 x 6 = 24 rows per call (two calls of mix).
    assert routed == [[]] + [[model.embed, model.mix]] * 3
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert float(grams[-1][2, 2]) == 0.0  # the l2 loss reaches no trunk layer


def test_float32_with_a_grad_scaler_divides_the_scale_out(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TokenNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    grams, expected, routed, _ = run_probe(model, tmp_path, monkeypatch, scaler=scaler)
    assert routed == [[]] + [[model.embed, model.mix]] * 3
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def test_an_output_changed_in_place_or_a_tied_weight_falls_back_to_autograd(tmp_path,
                                                                           monkeypatch):
    torch.manual_seed(0)
    model = TokenNet(inplace=True).double()  # ReLU(inplace=True) overwrites mix's output

    def tie(model, losses):  # embed's weight used once more outside the layer
        losses["aux"] = losses["aux"] + model.embed.weight.sum() * 1e-3

    def unused_call(model, losses):  # a call under no_grad contributes nothing
        with torch.no_grad():
            model.embed(torch.zeros(2, 32, dtype=torch.float64))

    grams, expected, routed, _ = run_probe(model, tmp_path, monkeypatch, extra=tie)
    assert routed == [[]] * 4  # mix changed in place, embed tied: both the autograd way
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    (tmp_path / "b").mkdir()
    grams, expected, routed, _ = run_probe(model, tmp_path / "b", monkeypatch,
                                           extra=unused_call)
    assert routed == [[]] + [[model.embed]] * 3
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_hooks_exist_only_for_probe_steps_and_training_is_unchanged(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TokenNet()
    plain = TokenNet()
    plain.load_state_dict(model.state_dict())
    hooked = []

    def record_hooks(model, losses):
        hooked.append(bool(model.embed._forward_hooks))

    grams, expected, routed, probe = run_probe(model, tmp_path, monkeypatch, steps=6,
                                               every=2, extra=record_hooks)
    assert hooked == [False, False, True, False, True, False]
    assert not model.embed._forward_hooks and not model.mix._forward_hooks  # after close
    assert routed == [[], [model.embed, model.mix], [model.embed, model.mix]]
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)
    # The same updates as the plain loop's sum of the losses, bit for bit.
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(6):
        tokens, target = torch.randn(4, 6, 32), torch.randn(4)
        total = losses_of(plain, tokens, target=target)
        (total["task"] + 0.3 * total["aux"] + total["l2"]).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_a_failure_in_the_layer_route_disables_the_probe_once(tmp_path, monkeypatch):
    real = per_loss.routed_gram

    def broken(layers, scale):
        if layers:
            raise RuntimeError("boom")
        return real(layers, scale)

    monkeypatch.setattr(per_loss, "routed_gram", broken)
    torch.manual_seed(0)
    model = TokenNet()
    probe = gradprobe.Probe(model, shared=trunk_params(model), every=1,
                            run_file=tmp_path / "r.gprobe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            probe.backward(losses_of(model, torch.randn(4, 6, 32), target=torch.randn(4)))
    probe.close()
    assert probe.step == 3 and not probe.enabled
    messages = [str(w.message) for w in caught if "disabled itself" in str(w.message)]
    assert len(messages) == 1 and "boom" in messages[0]
    assert not model.embed._forward_hooks
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    assert run.probe_steps().tolist() == [0]  # the step before the failure stays recorded


def assert_grads_match(grads, rtol):
    """Each .grad within ``rtol`` of the ordinary backward's, elementwise and measured against
    the tensor's largest entry (entries that cancel keep the rounding of the terms they sum)."""
    assert grads
    for plain, probed in grads:
        for want, got in zip(plain, probed):
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("bias", [True, False])
def test_assembled_path_routes_too_and_fills_grad_like_the_ordinary_backward(
        tmp_path, monkeypatch, bias):
    torch.manual_seed(0)
    model = TokenNet(bias=bias).double()
    grads = []
    grams, expected, routed, probe = run_probe(model, tmp_path, monkeypatch, assemble=True,
                                               grads=grads)
    assert probe.backward_path == "assembled" and len(grads) == 4
    # Assembling costs the route one weight gradient more: embed (24 rows, 32 -> 128) no
    # longer pays and keeps its Jacobian rows beside the routed mix.
    assert routed == [[]] + [[model.mix]] * 3
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert_grads_match(grads, rtol=1e-10)


@pytest.mark.parametrize("assemble", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_and_conv2d_layers_route_exactly(tmp_path, monkeypatch, assemble, bias):
    # Few output positions next to the channels: the N x N route pays for every convolution
    # with groups=1 (stride, padding, dilation; mix called twice); the grouped one takes the
    # autograd way.
    torch.manual_seed(0)
    model = ConvNet(bias=bias).double()
    grads = []
    grams, expected, routed, probe = run_probe(model, tmp_path, monkeypatch, assemble=assemble,
                                               batch=conv_batch, shared=conv_trunk, grads=grads)
    assert probe.enabled and probe.backward_path == ("assembled" if assemble else "separate")
    assert routed == [[]] + [[model.wave, model.image, model.mix]] * 3
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert bool(grads) == assemble
    if assemble:
        assert_grads_match(grads, rtol=1e-10)


def test_assembled_float32_with_a_grad_scaler(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ConvNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    grads = []
    grams, expected, routed, _ = run_probe(model, tmp_path, monkeypatch, scaler=scaler,
                                           assemble=True, batch=conv_batch, shared=conv_trunk,
                                           grads=grads)
    assert routed == [[]] + [[model.wave, model.image, model.mix]] * 3
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)
    # .grad carries the scale, as the ordinary backward's does (scaler.step divides it out).
    assert_grads_match(grads, rtol=1e-5)


def test_assembled_training_follows_plain_training(tmp_path, monkeypatch):
    # The probed model is trained with the route filling .grad on every probe step after the
    # first; its parameters stay with the plain loop's to float32 rounding.
    torch.manual_seed(0)
    model, plain = ConvNet(), ConvNet()
    plain.load_state_dict(model.state_dict())
    _, _, routed, _ = run_probe(model, tmp_path, monkeypatch, steps=6, assemble=True,
                                batch=conv_batch, shared=conv_trunk)
    assert routed[1:] == [[model.wave, model.image, model.mix]] * 5
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(6):
        inputs, target = conv_batch(torch.float32)
        losses = losses_of(plain, *inputs, target=target)
        (losses["task"] + 0.3 * losses["aux"] + losses["l2"]).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_frozen_weight_keeps_the_layer_on_the_autograd_way(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TokenNet().double()
    model.embed.weight.requires_grad_(False)
    grams, expected, routed, _ = run_probe(
        model, tmp_path, monkeypatch, assemble=True,
        shared=lambda m: [p for p in trunk_params(m) if p.requires_grad])
    assert routed == [[]] + [[model.mix]] * 3
    for got, want in zip(grams, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert model.embed.weight.grad is None
