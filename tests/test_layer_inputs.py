"""The probe's Gram matrix with shared Linear layers read from their inputs (layer_inputs.py)
equals autograd's J J^T, falls back to the autograd way where the capture cannot be trusted,
and hooks the layers only for probe steps."""

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


def losses_of(model, tokens, target):
    a, b = model(tokens)
    return {"task": F.mse_loss(a, target),
            "aux": F.softplus(b).mean(),
            "l2": model.head_a.weight.pow(2).sum() * 1e-2}  # reaches no trunk layer


def trunk_params(model):
    return [p for m in (model.embed, model.mix) for p in m.parameters()]


def run_probe(model, tmp_path, monkeypatch, steps=4, scaler=None, every=1, extra=None):
    """Probe ``steps`` steps on the trunk; returns the recorded Gram matrices, autograd's own
    (taken before each backward) and the layers routed at each step."""
    routed = []
    real = per_loss.routed_gram

    def spy(layers, grads, scale):
        routed.append([entry.layer for entry in layers])
        return real(layers, grads, scale)

    monkeypatch.setattr(per_loss, "routed_gram", spy)
    path = tmp_path / "r.gprobe"
    probe = gradprobe.Probe(model, shared=trunk_params(model), every=every, run_file=path)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = next(model.parameters()).dtype
    expected = []
    torch.manual_seed(1)
    for step in range(steps):
        tokens, target = torch.randn(4, 6, 32, dtype=dtype), torch.randn(4, dtype=dtype)
        losses = losses_of(model, tokens, target)
        if extra is not None:
            extra(model, losses)
        if probe.is_probe_step:
            expected.append(autograd_gram(list(losses.values()), trunk_params(model)))
        probe.backward(losses, scaler=scaler)
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
        sum(losses_of(plain, tokens, target).values()).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_a_failure_in_the_layer_route_disables_the_probe_once(tmp_path, monkeypatch):
    real = per_loss.routed_gram

    def broken(layers, grads, scale):
        if layers:
            raise RuntimeError("boom")
        return real(layers, grads, scale)

    monkeypatch.setattr(per_loss, "routed_gram", broken)
    torch.manual_seed(0)
    model = TokenNet()
    probe = gradprobe.Probe(model, shared=trunk_params(model), every=1,
                            run_file=tmp_path / "r.gprobe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            probe.backward(losses_of(model, torch.randn(4, 6, 32), torch.randn(4)))
    probe.close()
    assert probe.step == 3 and not probe.enabled
    messages = [str(w.message) for w in caught if "disabled itself" in str(w.message)]
    assert len(messages) == 1 and "boom" in messages[0]
    assert not model.embed._forward_hooks
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    assert run.probe_steps().tolist() == [0]  # the step before the failure stays recorded
