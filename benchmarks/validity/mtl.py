"""Two-task multi-digit LeNet with a shared trunk (MultiMNIST), after
WeiChengTseng/Pytorch-PCGrad (main_multi_mnist.py, net/lenet.py), the MultiMNIST setup of
Sener & Koltun 2018 and Yu et al. 2020 (PCGrad).

Published setup: two overlapping MNIST digits per image (one shifted up-left, one
down-right); a shared LeNet trunk (``MultiLeNetR``: conv 5x5 x10, max-pool, conv 5x5 x20,
channel dropout, max-pool, fc 320->50, ReLU) and one head per digit (``MultiLeNetO``: fc
50->50, ReLU, dropout, fc 50->10, log-softmax); NLL loss per head, summed; Adam lr 5e-4,
batch 256.

Here: two 8x8 scikit-learn digits on a 12x12 canvas (left at the top-left, right shifted
4 pixels down-right, overlapping, combined by max), conv kernels 3x3 (the images are 8x8,
not 28x28), the same heads, Adam lr 5e-4, batch 256, 1,000 steps.

Variants (truth by construction):
- ``healthy``: both heads weighted 1, as published. Both tasks train the trunk.
- ``right-weight-1e-3``: the right digit's loss weighted 1e-3. Its gradient on the trunk is
  scaled by 1e-3 against the left loss's: the trunk is trained by the left task alone, so
  the right task is swamped and its weight is fixed for the whole run.
  Expected: ``gradient-swamping`` and ``static-loss-weights`` naming ``right``. Must not:
  ``gradient-conflict`` (the two digits do not oppose each other), ``representation-collapse``
  on the trunk (a supervised 10-class feature settles near rank 9: neural collapse).
- ``shared-head``: one head module reused for both digits (``right = left``, the slip of
  building ``MultiLeNetO`` once instead of once per task). Both tasks then read one set of
  10 log-probabilities; the left and right digits are independent, so the label maps disagree
  on 9 of 10 images and no output satisfies both (the conflict of Yu et al. 2020, section 2,
  on shared outputs): both losses settle together on a compromise plateau (each head puts
  about half its mass on each digit) and each task's accuracy falls to about a half.
  Measured without gradprobe: both accuracies against ``healthy``'s on the same seed, the
  cosine of the two losses' gradients over every parameter every 10 steps (median, share
  below -0.5), and the last 50 steps' mean losses. Expected: ``gradient-conflict`` on
  ``left|right``. Allowed: ``static-loss-weights`` on both (their fixed weights 1 are the
  weights of the suffering losses).
- ``shared-head-mirror``: the shared head of ``shared-head``, and the right task asks for
  9 - (left digit) instead of the right digit: two-task-conflict's opposing label maps
  (issue 21's row, after Yu et al. 2020, section 2) on MultiMNIST's LeNet, with its conv
  trunk, dropout and Adam lr 5e-4. The label maps are opposite on every image, so the
  optimum of the sum splits each output between y and 9 - y: both losses converge on ln 2
  and each accuracy falls to about a half. Measured as ``shared-head``. Expected:
  ``gradient-conflict`` on ``left|right``; allowed ``static-loss-weights`` on both.
- ``detached-right-head``: the right head reads the trunk's features through ``.detach()``
  (a slip that cuts a task off the shared trunk: the right loss trains its head alone, on
  features learnt for the left digit only). Measured: the norm of the right loss's gradient
  on the trunk's parameters every 100 steps (exactly 0: no path), and the right digit's
  accuracy against ``healthy``'s. The right loss is declared a task (``roles={"right":
  "task"}``, as every variant declares it), so the intent is known. Expected: ``inert-loss``
  on ``right``.
- ``train-64-pairs``: the training set cut to 64 fixed two-digit images (the data-starved
  regime of Sener & Koltun's MultiMNIST reduced to a handful of examples; no other change),
  full batch; each digit's validation loss (NLL on 500 test images, eval mode) logged every
  50 steps with ``probe.log(val_left=..., val_right=...)``. The network memorises the 64
  images: the training losses keep falling while the validation losses rise from their
  minimum (classic overfitting, Goodfellow, Bengio & Courville 2016, sec. 7.8, early
  stopping). Measured: each validation loss's minimum, its last value and the rise, and the
  training losses at the end. Expected: ``overfitting`` on ``val_left`` and ``val_right``.

Measured (seeds 0-3, one thread): ``healthy`` accuracies 0.91-0.92 (left) and 0.90-0.92
(right). ``shared-head``: 0.50-0.51 and 0.52-0.53; gradient cosine over every parameter,
median -0.41 to -0.48, below -0.5 on 21-44% of the measured steps; the losses still fall
slowly at the end (1.32-1.40 over the last 50 steps; 1.06 after 2,750 steps on seed 0, the
compromise's floor being ln 2 = 0.69). Before rule change 9 (benchmarks/validity/rule-changes.md) gradprobe missed it: the
default shared set is the shared head's layer nearest the losses, where the recorded
cosine's median is only -0.07 to -0.10; with the per-layer blocks the conflict is judged on
the trunk's conv layers, where it fights (-0.62 to -0.74), and found as a warning on every
seed. ``shared-head-mirror``: accuracies 0.47-0.51 and
0.46-0.51, losses 0.85-0.90 over the last 50 steps; the cosine over every parameter is
positive (median +0.09 to +0.17: both tasks need the left digit, so the trunk is pulled the
same way) and the conflict sits in the shared head, where the recorded cosine's median is
-0.43 to -0.49 (negative on 82-87% of the probe steps). Before rule change 9 gradprobe raised it only as ``info`` (descent undone 0.43-0.50 and
settled 0.66-0.73 against the old 0.5 and 0.7); now a warning on every seed. ``detached-right-head``: the right loss's gradient on the
trunk exactly 0 at every measurement, right accuracy 0.29-0.45 (left 0.93-0.95).
``train-64-pairs``: validation NLL rises from its minimum (1.19-1.43 left, 1.12-1.37 right) by
25-48% (left) and 18-54% (right) by the end, while the training losses end at 0.07-0.22;
accuracies 0.57-0.67.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import digits_split
from .harness import Expect, Family, Variant
from .two_task_conflict import gradient_cosine

STEPS = 1000
BATCH = 256
LR = 5e-4
SMALL_TRAIN = 64  # train-64-pairs: the fixed training images
VAL_PAIRS, VAL_EVERY = 500, 50  # train-64-pairs: the logged validation losses
COSINE_EVERY, GRAD_EVERY = 10, 100  # shared-head and detached-right-head measurements
SHARED_HEAD = ("shared-head", "shared-head-mirror")


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=3)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=3)
        self.drop = nn.Dropout2d()
        self.fc = nn.Linear(20 * 3 * 3, 50)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))       # 12 -> 10 -> 5
        x = F.relu(self.drop(self.conv2(x)))               # 5 -> 3
        return F.relu(self.fc(x.flatten(1)))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(50, 50), nn.Linear(50, 10)
        self.drop = nn.Dropout()

    def forward(self, h):
        return F.log_softmax(self.fc2(self.drop(F.relu(self.fc1(h)))), dim=1)


class MultiLeNet(nn.Module):
    def __init__(self, shared_head: bool = False, detach_right: bool = False):
        super().__init__()
        self.trunk, self.left = Trunk(), Head()
        self.right = self.left if shared_head else Head()
        self.detach_right = detach_right

    def forward(self, x):
        h = self.trunk(x)
        return self.left(h), self.right(h.detach() if self.detach_right else h)


def pairs(x: torch.Tensor, y: torch.Tensor, n: int, gen: torch.Generator):
    """n two-digit images: left digit at the top-left of a 12x12 canvas, right digit shifted
    4 pixels down-right, overlapping, combined by max (MultiMNIST's construction)."""
    i = torch.randint(0, len(x), (n,), generator=gen)
    j = torch.randint(0, len(x), (n,), generator=gen)
    canvas_l = torch.zeros(n, 12, 12)
    canvas_r = torch.zeros(n, 12, 12)
    canvas_l[:, :8, :8] = x[i].view(n, 8, 8)
    canvas_r[:, 4:, 4:] = x[j].view(n, 8, 8)
    return torch.maximum(canvas_l, canvas_r).unsqueeze(1), y[i], y[j]


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    test_img, test_l, test_r = pairs(x_te, y_te, 2000, torch.Generator().manual_seed(1234))
    model = MultiLeNet(shared_head=variant in SHARED_HEAD,
                       detach_right=variant == "detached-right-head")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    weights = {"left": 1.0, "right": 1e-3 if variant == "right-weight-1e-3" else 1.0}
    fixed = pairs(x_tr, y_tr, SMALL_TRAIN, gen) if variant == "train-64-pairs" else None
    measured = {"cosines": [], "tail": [], "trunk_grad": [], "val": []}
    probe = gradprobe.Probe(model, run_file=log, roles={"right": "task"})
    probe.watch_latent("features", model.trunk)
    with probe:
        for step in range(STEPS):
            img, yl, yr = fixed if fixed is not None else pairs(x_tr, y_tr, BATCH, gen)
            if variant == "shared-head-mirror":
                yr = 9 - yl
            out_l, out_r = model(img)
            losses = {"left": F.nll_loss(out_l, yl), "right": F.nll_loss(out_r, yr)}
            measure(variant, step, model, losses, measured)
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
            if fixed is not None and step % VAL_EVERY == 0:
                val = validation_losses(model, test_img[:VAL_PAIRS], test_l[:VAL_PAIRS],
                                        test_r[:VAL_PAIRS])
                probe.log(val_left=val[0], val_right=val[1])
                measured["val"].append(val)
    model.eval()
    with torch.no_grad():
        out_l, out_r = model(test_img)
    if variant == "shared-head-mirror":
        test_r = 9 - test_l
    return {"acc_left": float((out_l.argmax(1) == test_l).float().mean()),
            "acc_right": float((out_r.argmax(1) == test_r).float().mean()),
            **summary(variant, measured)}


def measure(variant: str, step: int, model: MultiLeNet, losses: dict, measured: dict) -> None:
    """The new variants' truth, read before the update from the step's own graph (no
    gradprobe): the two losses' gradient cosine over every parameter and the last 50 steps'
    losses (shared-head); the right loss's gradient norm on the trunk (detached-right-head);
    the training losses (train-64-pairs)."""
    if variant in SHARED_HEAD:
        if step % COSINE_EVERY == 0:
            measured["cosines"].append(gradient_cosine(model, losses))
        if step >= STEPS - 50:
            measured["tail"].append([v.item() for v in losses.values()])
    elif variant == "detached-right-head" and step % GRAD_EVERY == 0:
        trunk = list(model.trunk.parameters())
        grads = torch.autograd.grad(losses["right"], trunk, retain_graph=True, allow_unused=True)
        measured["trunk_grad"].append(sum(0.0 if g is None else float(g.norm()) for g in grads))
    elif variant == "train-64-pairs":
        measured["tail"] = [[v.item() for v in losses.values()]]


def validation_losses(model: MultiLeNet, img: torch.Tensor, yl: torch.Tensor,
                      yr: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out_l, out_r = model(img)
    model.train()
    return float(F.nll_loss(out_l, yl)), float(F.nll_loss(out_r, yr))


def summary(variant: str, measured: dict) -> dict:
    if variant in SHARED_HEAD:
        cos, tail = torch.tensor(measured["cosines"]), torch.tensor(measured["tail"]).mean(0)
        return {"cos_median": float(cos.median()),
                "share_cos_below_-0.5": float((cos < -0.5).float().mean()),
                "end_loss_left": float(tail[0]), "end_loss_right": float(tail[1])}
    if variant == "detached-right-head":
        return {"right_trunk_grad_max": max(measured["trunk_grad"])}
    if variant == "train-64-pairs":
        val = torch.tensor(measured["val"])
        low, end = val.min(0).values, val[-1]
        return {"val_left_min": float(low[0]), "val_left_end": float(end[0]),
                "val_left_rise": float(end[0] / low[0] - 1),
                "val_right_min": float(low[1]), "val_right_end": float(end[1]),
                "val_right_rise": float(end[1] / low[1] - 1),
                "train_left_end": measured["tail"][0][0], "train_right_end": measured["tail"][0][1]}
    return {}


FAMILY = Family(
    name="mtl",
    source="WeiChengTseng/Pytorch-PCGrad (main_multi_mnist.py, net/lenet.py); MultiMNIST of "
           "Sener & Koltun 2018",
    train=train,
    variants=(
        Variant("healthy", True, "both digit losses weighted 1, as published",
                must_not=("gradient-conflict", "representation-collapse")),
        Variant("right-weight-1e-3", False,
                "the right digit's loss weighted 1e-3: its trunk gradient is scaled 1000x down, "
                "so the trunk learns from the left task alone",
                expected=(Expect("gradient-swamping", "right"),
                          Expect("static-loss-weights", "right")),
                must_not=("gradient-conflict", "representation-collapse")),
        Variant("shared-head", False,
                "one head reused for both digits: the two independent labels disagree on 9 of "
                "10 images on the same outputs, so both losses settle on a compromise plateau "
                "and each accuracy falls to about a half (healthy: ~0.91); gradient cosine over "
                "all parameters measured every 10 steps",
                expected=(Expect("gradient-conflict", "left|right"),),
                allowed=(Expect("static-loss-weights", "left"), Expect("static-loss-weights", "right")),
                must_not=("gradient-swamping",)),
        Variant("shared-head-mirror", False,
                "one head reused for both tasks, the right task reading the left digit's mirror "
                "9 - y: the label maps are opposite on every image, both losses converge on "
                "ln 2 (0.85-0.90 at the end) and each accuracy falls to about a half "
                "(healthy: ~0.91)",
                expected=(Expect("gradient-conflict", "left|right"),),
                allowed=(Expect("static-loss-weights", "left"), Expect("static-loss-weights", "right")),
                must_not=("gradient-swamping",)),
        Variant("detached-right-head", False,
                "the right head reads detached trunk features: the right loss's gradient on the "
                "trunk measured exactly 0 every 100 steps, the right accuracy falls to ~0.3 "
                "(healthy: ~0.9)",
                expected=(Expect("inert-loss", "right"),),
                must_not=("gradient-conflict", "gradient-swamping")),
        Variant("train-64-pairs", False,
                "64 training images: the training losses keep falling while each digit's logged "
                "validation loss rises from its minimum (memorisation), measured on 500 test "
                "images every 50 steps",
                expected=(Expect("overfitting", "val_left"), Expect("overfitting", "val_right")),
                must_not=("gradient-conflict", "gradient-swamping")),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("healthy", 1), ("right-weight-1e-3", 1)),
)
