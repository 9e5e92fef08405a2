"""The GradNorm toy of Chen, Badrinarayanan, Lee & Rabinovich 2018 ("GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML, section 5.1;
re-implemented in LucasBoTang/GradNorm, Test.ipynb).

Published setup: T regression tasks, squared loss, onto f_i(x) = sigma_i tanh((B + eps_i) x),
x of dimension 250, outputs of dimension 100, B and eps_i constant matrices with entries
drawn i.i.d. from N(0, 10) and N(0, 3.5); sigma_i sets each task's scale (T = 2 with
sigma = (1, 100) in LucasBoTang's toy). A 4-layer fully connected ReLU trunk of 100 units
per layer and one affine head per task. GradNorm with alpha = 0.12 on the last shared layer.

Here: exactly that, T = 2, sigma = (1, 100), 10,000 samples (x ~ U(0, 1)^250 and standard
deviations 10 and 3.5 for B and eps_i, as in LucasBoTang's data.py), batch 100, Adam
lr 1e-3 for the network and 2.5e-2 for the GradNorm weights, 1,000 steps. GradNorm is the
paper's algorithm (written here): L_grad = sum_i |G_i - mean(G) r_i^alpha| on the last
shared layer, weights renormalised to sum to T after every step.

Variants (truth by construction):
- ``gradnorm``: healthy. GradNorm raises the sigma = 1 task's weight until its weighted
  gradient on the trunk is comparable to the other's.
- ``equal-weights``: both tasks weighted 1 (the paper's baseline). The gradient of a
  squared loss on a task of scale sigma is proportional to its error, ~sigma, so the
  sigma = 1 task's gradient on the trunk is ~1/100 of the sigma = 100 task's: it is
  swamped, with a weight fixed for the whole run, and fits its training data worse.
  Expected: ``gradient-swamping`` and ``static-loss-weights`` naming ``task0`` (sigma = 1,
  the first loss, so the probe's task by default). Must not: ``gradient-conflict``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .harness import Expect, Family, Variant

SIGMAS = (1.0, 100.0)
STEPS = 1000
BATCH = 100
ALPHA = 0.12


class ToyNet(nn.Module):
    def __init__(self, tasks: int):
        super().__init__()
        layers, width = [], 250
        for _ in range(4):
            layers += [nn.Linear(width, 100), nn.ReLU()]
            width = 100
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(100, 100) for _ in range(tasks))

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def toy_data(seed: int, n: int = 10_000):
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(100, 250, generator=gen) * 10.0
    x = torch.rand(n, 250, generator=gen)
    ys = [s * torch.tanh(x @ (b + torch.randn(100, 250, generator=gen) * 3.5).T) for s in SIGMAS]
    return x, ys


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, ys = toy_data(1000 + seed)
    x_test, ys_test = x[-2000:], [y[-2000:] for y in ys]
    x, ys = x[:-2000], [y[:-2000] for y in ys]
    tasks = len(SIGMAS)
    model = ToyNet(tasks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    task_weights = torch.ones(tasks, requires_grad=True)
    weight_opt = torch.optim.Adam([task_weights], lr=2.5e-2)
    last_shared = model.trunk[-2].weight
    initial = None
    probe = gradprobe.Probe(model, run_file=log, roles={f"task{i}": "task" for i in range(tasks)})
    with probe:
        for _ in range(STEPS):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            outs = model(x[idx])
            task_losses = [F.mse_loss(o, y[idx]) for o, y in zip(outs, ys)]
            if variant == "gradnorm":
                values = torch.stack([l.detach() for l in task_losses])
                initial = values if initial is None else initial
                norms = torch.stack([
                    torch.autograd.grad(w * l, last_shared, retain_graph=True, create_graph=True)[0].norm()
                    for w, l in zip(task_weights, task_losses)])
                ratio = values / initial
                target = (norms.mean() * (ratio / ratio.mean()) ** ALPHA).detach()
                weight_opt.zero_grad()
                (norms - target).abs().sum().backward(inputs=[task_weights])
                weight_opt.step()
                with torch.no_grad():
                    task_weights.clamp_(min=1e-6)
                    task_weights.mul_(tasks / task_weights.sum())
            losses = {f"task{i}": l for i, l in enumerate(task_losses)}
            probe.backward(losses, weights={f"task{i}": float(w)
                                            for i, w in enumerate(task_weights.detach())})
            opt.step()
            opt.zero_grad()
    # Normalised squared error (MSE / sigma^2) on the training and the test samples.
    with torch.no_grad():
        fit = {f"train_nmse_task{i}": float(F.mse_loss(o, y) / s ** 2)
               for i, (o, y, s) in enumerate(zip(model(x), ys, SIGMAS))}
        test = {f"test_nmse_task{i}": float(F.mse_loss(o, y) / s ** 2)
                for i, (o, y, s) in enumerate(zip(model(x_test), ys_test, SIGMAS))}
    return fit | test | {f"w_task{i}": float(w) for i, w in enumerate(task_weights.detach())}


FAMILY = Family(
    name="gradnorm-toy",
    source="Chen et al. 2018, GradNorm (ICML), section 5.1 toy; LucasBoTang/GradNorm Test.ipynb",
    train=train,
    variants=(
        Variant("gradnorm", True, "GradNorm (alpha 0.12) balances the trunk gradients of the "
                "sigma = 1 and sigma = 100 tasks", must_not=("gradient-swamping", "gradient-conflict",
                                                            "static-loss-weights")),
        Variant("equal-weights", False,
                "equal weights: the sigma = 1 task's squared-loss gradient is ~1/100 of the "
                "sigma = 100 task's on the shared trunk, with fixed weights",
                expected=(Expect("gradient-swamping", "task0"),
                          Expect("static-loss-weights", "task0")),
                must_not=("gradient-conflict",)),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("gradnorm", 1), ("equal-weights", 1)),
)
