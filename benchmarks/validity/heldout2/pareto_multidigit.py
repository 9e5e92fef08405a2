"""Two overlaid digits on a shared LeNet, after Lin, Zhen, Li, Zhang & Kwong 2019 ("Pareto
Multi-Task Learning", NeurIPS, the Multi-MNIST experiments; Xi-L/ParetoMTL, multiMNIST/
model_lenet.py ``RegressionModel``/``RegressionTrain`` and multiMNIST/train.py).

Published setup: two digits on a 36x36 canvas, one at the top-left and one at the
bottom-right, overlapping; task 0 classifies the top-left digit, task 1 the bottom-right. The
LeNet trunk (conv 9x9 x10, ReLU, max-pool 2, conv 5x5 x20, ReLU, max-pool 2, fc 500->50, ReLU)
is shared and each task has a linear head of its own (``task_0``, ``task_1``: fc 50->10);
one cross-entropy per task; SGD lr 1e-3, momentum 0.9, batch 256, 100 epochs of 120,000
images. The paper compares Pareto MTL with single-task training and linear scalarisation
(fixed preference weights); train.py records each task's training accuracy every second
epoch.

Here (no download): two 8x8 scikit-learn digits on a 12x12 canvas, built by ``mtl.pairs``
(left at the top-left, right shifted 4 pixels down-right, combined by max); conv kernels
3x3 and 2x2 (8x8 digits, not 28x28: conv 3x3 x10, pool, conv 2x2 x20, pool, fc 80->50);
SGD momentum 0.9 at lr 0.05 (the published 1e-3 is set for 47,000 steps; here 1,000), batch
256; losses ``task_0`` and ``task_1`` weighted 0.5 each (linear scalarisation at the middle
preference, train.py's ``init_weight``) passed to ``probe.backward``; every 100 steps ``probe.log(train_acc_task_0=...,
train_acc_task_1=...)`` on 1,000 fixed training pairs, as train.py records them.

Truth, measured without gradprobe: each task's test accuracy (2,000 pairs of test digits)
against the same network trained on that task alone (same steps and seed, weight 1); the
cosine of the two losses' gradients over the shared trunk and over its last layer ``fc1``
alone (torch.autograd.grad every 10 steps: median and share below 0).

Variants (truth by construction):
- ``uniform``: as published. The two digits share their stroke features.
  Healthy. Measured, seeds 0 / 1: task_0 accuracy 0.972 / 0.963 against 0.960 / 0.974
  single-task, task_1 0.956 / 0.974 against 0.980 / 0.976; gradient cosine on the trunk,
  median +0.11 / +0.12 (below 0 on 29% / 22% of the measured steps), on fc1 +0.01 / +0.03.
  Must not: ``gradient-conflict``, ``gradient-swamping``, ``static-loss-weights``.
- ``head-slip``: the loop over the tasks reads the first head for both
  (``getattr(self, 'task_{}'.format(0))`` where model_lenet.py has ``format(i)``): both
  losses read one set of 10 logits, and the left and right digits are independent, so the
  two label maps disagree on 9 images in 10 and no trunk or head satisfies both. The fixed
  weights (0.5, 0.5) settle the shared parameters on a compromise where each task's gradient
  undoes the other's. Measured, seeds 0 / 1: task_0 accuracy 0.522 / 0.517 against 0.960 /
  0.974 single-task, task_1 0.568 / 0.563 against 0.980 / 0.976; gradient cosine on the trunk,
  median -0.36 / -0.23 (below 0 on 79% / 71% of the measured steps), on fc1 -0.47 / -0.33
  (82% / 84%). Expected: ``gradient-conflict`` on ``task_0|task_1``. Allowed:
  ``static-loss-weights`` on both (the fixed weights of the losses held back). Must not:
  ``gradient-swamping`` (equal weights, gradients of one scale).

Left out: a trunk too narrow for two digits (fc1 of width 2 or 4 instead of 50, the
trade-off a Pareto front describes forced by capacity). Its harm was not solid: width 4 cost
both tasks half their accuracy on seed 0 (0.43 / 0.40 against 0.89 / 0.88 single-task) and
nothing on seed 1 (0.91 / 0.36 against 0.91 / 0.37: task_1 alone stuck as low); width 2
held even the single-task references at 0.42-0.46. Its gradient cosine stayed near 0 (fc1
median -0.18 / +0.01 at width 4): the two digits ask for different features, not opposite
ones.

One run (the variant and its two single-task references) takes 30-36 CPU-seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import digits_split
from ..harness import Expect, Family, Variant
from ..mtl import pairs

STEPS, BATCH, LR, MOMENTUM = 1000, 256, 0.05, 0.9
WIDTH = 50
COSINE_EVERY, LOG_EVERY, LOG_PAIRS, TEST_PAIRS = 10, 100, 1000, 2000
TASKS = ("task_0", "task_1")


class MultiDigitLeNet(nn.Module):
    def __init__(self, n_tasks: int = 2, head_slip: bool = False):
        super().__init__()
        self.head_slip = head_slip
        self.conv1 = nn.Conv2d(1, 10, 3)
        self.conv2 = nn.Conv2d(10, 20, 2)
        self.fc1 = nn.Linear(20 * 2 * 2, WIDTH)
        self.heads = nn.ModuleList(nn.Linear(WIDTH, 10) for _ in range(n_tasks))

    def trunk(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # 12 -> 10 -> 5
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # 5 -> 4 -> 2
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        h = self.trunk(x)
        if self.head_slip:  # getattr(self, 'task_{}'.format(0)) in the loop over the tasks
            return [self.heads[0](h) for _ in self.heads]
        return [head(h) for head in self.heads]


def shared_cosines(model: MultiDigitLeNet, losses: list[torch.Tensor]) -> tuple[float, float]:
    """Cosine of the two losses' gradients over the whole trunk and over fc1 alone."""
    trunk = [p for name, p in model.named_parameters() if not name.startswith("heads")]
    a, b = ([g.flatten() for g in torch.autograd.grad(loss, trunk, retain_graph=True)] for loss in losses)
    last = slice(len(trunk) - 2, len(trunk))  # fc1's weight and bias

    def cosine(u, v):
        u, v = torch.cat(u), torch.cat(v)
        return float(u @ v / (u.norm() * v.norm()))

    return cosine(a, b), cosine(a[last], b[last])


def accuracies(model: MultiDigitLeNet, img: torch.Tensor, labels: list[torch.Tensor]) -> list[float]:
    model.eval()
    with torch.no_grad():
        outs = model(img)
    model.train()
    return [float((o.argmax(1) == y).float().mean()) for o, y in zip(outs, labels)]


def fit(seed: int, tasks: tuple[int, ...], probe_file: Path | None,
        head_slip: bool = False) -> tuple[MultiDigitLeNet, dict]:
    """Train the tasks listed (both, or one alone for a single-task reference)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, _, _ = digits_split()
    log_img, *log_labels = pairs(x_tr, y_tr, LOG_PAIRS, torch.Generator().manual_seed(99))
    model = MultiDigitLeNet(len(tasks), head_slip)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    cosines = []
    probe = gradprobe.Probe(model, run_file=probe_file) if probe_file else None
    for step in range(STEPS):
        img, *labels = pairs(x_tr, y_tr, BATCH, gen)
        outs = model(img)
        losses = [F.cross_entropy(o, labels[t]) for o, t in zip(outs, tasks)]
        if probe is None:
            losses[0].backward()
        else:
            if step % COSINE_EVERY == 0:
                cosines.append(shared_cosines(model, losses))
            probe.backward(dict(zip(TASKS, losses)), weights={t: 0.5 for t in TASKS})
        opt.step()
        opt.zero_grad()
        if probe is not None and (step + 1) % LOG_EVERY == 0:
            acc = accuracies(model, log_img, log_labels)
            probe.log(train_acc_task_0=acc[0], train_acc_task_1=acc[1])
    if probe is None:
        return model, {}
    probe.close()
    cos = np.array(cosines)
    return model, {"cos_trunk_median": float(np.median(cos[:, 0])),
                   "cos_trunk_negative_share": float((cos[:, 0] < 0).mean()),
                   "cos_fc1_median": float(np.median(cos[:, 1])),
                   "cos_fc1_negative_share": float((cos[:, 1] < 0).mean())}


def train(variant: str, seed: int, log: Path) -> dict:
    _, _, x_te, y_te = digits_split()
    img, *labels = pairs(x_te, y_te, TEST_PAIRS, torch.Generator().manual_seed(1234))
    model, measured = fit(seed, (0, 1), log, head_slip=variant == "head-slip")
    acc = accuracies(model, img, labels)
    single = [accuracies(fit(seed, (t,), None)[0], img, [labels[t]])[0] for t in (0, 1)]
    return {"acc_task_0": acc[0], "single_acc_task_0": single[0],
            "acc_task_1": acc[1], "single_acc_task_1": single[1]} | measured


FAMILY = Family(
    name="pareto-multidigit",
    source="Lin et al. 2019, Pareto Multi-Task Learning (NeurIPS), Multi-MNIST, linear "
           "scalarisation (0.5, 0.5); Xi-L/ParetoMTL multiMNIST/model_lenet.py, train.py",
    train=train,
    variants=(
        Variant("uniform", True, "two overlaid digits share their stroke features: both tasks "
                "at their single-task accuracy (measured)",
                must_not=("gradient-conflict", "gradient-swamping", "static-loss-weights")),
        Variant("head-slip", False, "both tasks read the first head: independent digits on one "
                "set of logits, a compromise where each loss undoes the other's gradient on the "
                "shared trunk (cosine median -0.23 to -0.36, accuracies ~0.55 against ~0.97)",
                expected=(Expect("gradient-conflict", "task_0|task_1"),),
                allowed=(Expect("static-loss-weights", "task_0"), Expect("static-loss-weights", "task_1")),
                must_not=("gradient-swamping",)),
    ),
    seeds=(0, 1),
    quick=(("uniform", 1), ("head-slip", 1)),
)
