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
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import digits_split
from .harness import Expect, Family, Variant

STEPS = 1000
BATCH = 256
LR = 5e-4


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
    def __init__(self):
        super().__init__()
        self.trunk, self.left, self.right = Trunk(), Head(), Head()

    def forward(self, x):
        h = self.trunk(x)
        return self.left(h), self.right(h)


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
    model = MultiLeNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    weights = {"left": 1.0, "right": 1e-3 if variant == "right-weight-1e-3" else 1.0}
    probe = gradprobe.Probe(model, run_file=log, roles={"right": "task"})
    probe.watch_latent("features", model.trunk)
    with probe:
        for _ in range(STEPS):
            img, yl, yr = pairs(x_tr, y_tr, BATCH, gen)
            out_l, out_r = model(img)
            losses = {"left": F.nll_loss(out_l, yl), "right": F.nll_loss(out_r, yr)}
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        out_l, out_r = model(test_img)
    return {"acc_left": float((out_l.argmax(1) == test_l).float().mean()),
            "acc_right": float((out_r.argmax(1) == test_r).float().mean())}


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
    ),
    seeds=(0, 1, 2, 3),
    quick=(("healthy", 1), ("right-weight-1e-3", 1)),
)
