"""``inert-loss`` and ``gradient-swamping`` read whether a loss has a gradient on the whole
shared set (its per-layer blocks), not on the Gram matrix's layer alone: a task of a gated
mixture crosses the other task's gate with a gradient of exactly 0 (DSelect-k's gates, both
computed, one read per task) and still trains the experts. Real training runs; the gradients
are recomputed with autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import diagnose

STEPS = 40


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict(dict(experts=nn.Linear(8, 16), gate_a=nn.Linear(8, 1),
                              gate_b=nn.Linear(8, 1), head_a=nn.Linear(16, 1),
                              head_b=nn.Linear(16, 1)))


def _losses(model, x, cut: bool):
    experts = torch.tanh(model["experts"](x))
    gates = torch.sigmoid(torch.cat([model["gate_a"](x), model["gate_b"](x)], 1))
    # ``cut``: task_1 still crosses every layer, with a gradient of exactly 0 on all of them.
    mixed = experts * gates[:, :1] * (0.0 if cut else 1.0)
    return {"task_1": F.mse_loss(model["head_a"](mixed), x[:, :1].sin()),
            "task_2": F.mse_loss(model["head_b"](experts * gates[:, 1:]), x[:, 1:2] * x[:, 2:3]),
            "gate_penalty": model["gate_a"].weight.pow(2).sum() +
            model["gate_b"].weight.pow(2).sum()}


def _run(tmp_path, cut: bool):
    model = _model()
    x = torch.randn(128, 8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    path = tmp_path / f"gated-{cut}.gprobe"
    with gradprobe.Probe(model, run_file=path, every=2) as probe:
        for _ in range(STEPS):
            opt.zero_grad()
            probe.backward(_losses(model, x, cut), weights={"gate_penalty": 1e-3})
            opt.step()
    return gradprobe.load_run(path), model, x


def _gradient_norm(model, loss, module: str) -> float:
    grads = torch.autograd.grad(loss, list(model[module].parameters()), retain_graph=True,
                                allow_unused=True)
    return float(sum(g.pow(2).sum() for g in grads if g is not None) ** 0.5)


@pytest.mark.parametrize("cut", [False, True])
def test_a_zero_gradient_on_the_gram_layer_alone_is_not_inert(tmp_path, cut):
    run, model, x = _run(tmp_path, cut)
    gram_layer = run.meta["shared_parameters"]
    assert all(name.startswith("gate_b.") for name in gram_layer)
    assert run.series("grad_norm", "task_1")[1].max() == 0.0  # exactly 0 on the Gram layer
    task_1 = _losses(model, x, cut)["task_1"]
    assert _gradient_norm(model, task_1, "gate_b") == 0.0
    on_experts = _gradient_norm(model, task_1, "experts")
    assert (on_experts == 0.0) == cut
    # The recorded blocks hold the same: task_1's squared norm on the experts' layer.
    _, blocks = run.arrays("grad_gram_layer", "experts")
    assert (max(float(b[0][0]) for b in blocks) == 0.0) == cut
    inert = [f for f in diagnose(run) if f.id == "inert-loss" and f.subject == "task_1"]
    assert [f.severity for f in inert] == (["warning"] if cut else [])
