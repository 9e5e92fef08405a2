"""Data, augmentations and ground-truth measurements shared by the corpus families.

Everything here is independent of gradprobe: the families use it to train and to measure
what actually happened to the model (accuracy, rank, active units...), so that the truth
of a variant is checked by numbers gradprobe never computed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits in [0, 1]: a fixed stratified 75/25 split (the same for
    every seed, so seeds vary the model and the batches, not the data)."""
    x, y = _digits()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
            torch.from_numpy(y_te))


def shift_one_pixel(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each flattened 8x8 digit of a batch shifted at random by up to one pixel in each
    direction (zero padding), as (n, 8, 8)."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x.view(n, 8, 8), (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, :, None].expand(n, 8, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, :].expand(n, 8, 8)
    return padded[torch.arange(n)[:, None, None], rows, cols]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A view of a batch of flattened 8x8 digits for self-supervised learning: a random shift
    of up to one pixel, a random intensity scale in [0.6, 1.4], a random 3x3 erased patch
    (half of the images) and Gaussian noise (std 0.1), the digit-sized analogue of SimCLR's
    crop + colour distortion + blur."""
    n = x.shape[0]
    view = shift_one_pixel(x, gen)
    view = view * (0.6 + 0.8 * torch.rand(n, 1, 1, generator=gen))
    erase = torch.rand(n, generator=gen) < 0.5
    r0 = torch.randint(0, 6, (n,), generator=gen)
    c0 = torch.randint(0, 6, (n,), generator=gen)
    grid = torch.arange(8)
    patch = ((grid[None, :, None] >= r0[:, None, None]) & (grid[None, :, None] < r0[:, None, None] + 3)
             & (grid[None, None, :] >= c0[:, None, None]) & (grid[None, None, :] < c0[:, None, None] + 3))
    view = torch.where(patch & erase[:, None, None], torch.zeros(()), view)
    view = view + 0.1 * torch.randn(view.shape, generator=gen)
    return view.reshape(n, 64)


def linear_probe_accuracy(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray,
                          y_test: np.ndarray) -> float:
    """Test accuracy of a logistic-regression probe on frozen features (the standard linear
    evaluation of self-supervised representations), features standardised on the training set."""
    mean, std = f_train.mean(0), f_train.std(0) + 1e-8
    clf = LogisticRegression(max_iter=2000)
    clf.fit((f_train - mean) / std, y_train)
    return float(clf.score((f_test - mean) / std, y_test))


def centred_effective_rank(z: np.ndarray) -> float:
    """Effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised singular
    values) of the centred matrix z, computed with numpy, independently of gradprobe."""
    z = np.asarray(z, dtype=np.float64)
    s = np.linalg.svd(z - z.mean(0), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def normalised_std(z: np.ndarray) -> float:
    """Mean per-dimension std of the l2-normalised outputs, times sqrt(d): ~1 when the outputs
    spread over the sphere, 0 when they collapse to one point (SimSiam, Chen & He 2021, sec. 4.1)."""
    z = np.asarray(z, dtype=np.float64)
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return float(zn.std(0).mean() * np.sqrt(z.shape[1]))


def batches(n: int, batch_size: int, gen: torch.Generator, shuffle: bool = True):
    """Endless mini-batch indices over n items: reshuffled each epoch (or in order)."""
    while True:
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def weighted_backward(losses: dict, weights: dict, probe=None) -> None:
    """The backward of the weighted sum of ``losses`` (a weight not given is 1): through
    ``probe.backward`` when a probe records the run, else a plain backward (the unprobed
    reference runs that train beside it)."""
    if probe is not None:
        probe.backward(losses, weights=weights)
    else:
        sum(weights.get(k, 1.0) * v for k, v in losses.items()).backward()


def continual_outcome(acc_a_after_a: float, acc_a: float, acc_b: float, **more) -> dict:
    """A run that learns task A then task B: A's accuracy after A and after B, B's, ``more``,
    and the forgetting (A's accuracy lost while B was learnt)."""
    return {"acc_a_after_a": acc_a_after_a, "acc_a": acc_a, "acc_b": acc_b, **more,
            "forgetting": acc_a_after_a - acc_a}


def log_task_accuracies(probe, step: int, every: int, accuracy_a, accuracy_b) -> None:
    """Log a continual run's test accuracies on tasks A and B (callables, evaluated only then)
    to ``probe`` on the last step of every ``every``, as a user watching forgetting would."""
    if probe is not None and step % every == every - 1:
        probe.log(acc_task_a=accuracy_a(), acc_task_b=accuracy_b())


def with_fine_tune(outcome: dict, reference: dict) -> dict:
    """A continual run's outcome beside its fine-tuning reference's (task B learnt alone
    after A, no penalty): accuracies and forgetting, prefixed ``fine_tune_``."""
    return outcome | {f"fine_tune_{k}": reference[k] for k in ("acc_a", "acc_b", "forgetting")}


def fit_classifier(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, order,
                   steps: int, optimizer: torch.optim.Optimizer, logits=lambda out: out
                   ) -> torch.nn.Module:
    """``steps`` steps of cross-entropy on (x, y) over the mini-batch indices ``order`` yields
    (``batches``): a teacher before distillation, a source classifier before adaptation (whose
    optimizer and batches then go on). ``logits`` picks the logits from the model's output."""
    for _ in range(steps):
        idx = next(order)
        torch.nn.functional.cross_entropy(logits(model(x[idx])), y[idx]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


class DigitEncoder(torch.nn.Module):
    """The backbone of the self-supervised families: a two-layer MLP with batch norm on the
    flattened 8x8 digits (the ResNet of the published setups, scaled to 64 inputs; width 128)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.width = width
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU())

    def forward(self, x):
        return self.net(x)


def encoded_digits(encoder: torch.nn.Module, head: torch.nn.Module) -> tuple:
    """The digits' train and test splits through a self-supervised run's backbone and head,
    both put in eval mode, without gradients: (f_tr, f_te, z_tr, z_te, y_tr, y_te) as numpy
    arrays, f the backbone features, z the head's outputs."""
    x_tr, y_tr, x_te, y_te = digits_split()
    encoder.eval()
    head.eval()
    with torch.no_grad():
        f_tr, f_te = encoder(x_tr), encoder(x_te)
        z_tr, z_te = head(f_tr), head(f_te)
    return (f_tr.numpy(), f_te.numpy(), z_tr.numpy(), z_te.numpy(), y_tr.numpy(),
            y_te.numpy())


def representation_truth(encoder: torch.nn.Module, head: torch.nn.Module) -> dict:
    """What a self-supervised run learnt, measured on the digits' test split without
    gradprobe: linear-probe accuracy of the backbone features and of the head's outputs, and
    the centred effective rank and normalised std of the head's outputs."""
    f_tr, f_te, z_tr, z_te, y_tr, y_te = encoded_digits(encoder, head)
    return {"linear_acc": linear_probe_accuracy(f_tr, y_tr, f_te, y_te),
            "z_linear_acc": linear_probe_accuracy(z_tr, y_tr, z_te, y_te),
            "z_rank": centred_effective_rank(z_te), "z_std": normalised_std(z_te),
            "z_dim": int(z_te.shape[1])}


def knn_accuracy(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray,
                 y_test: np.ndarray, k: int = 20) -> float:
    """Test accuracy of a k-nearest-neighbour vote by cosine similarity on frozen features
    (the kNN monitor of the self-supervised literature, e.g. Wu et al. 2018, k = 20), in numpy.
    Features that collapse to one point leave only ties, decided by the lowest-index neighbours."""
    def unit(f):
        f = np.asarray(f, dtype=np.float64)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sim = unit(f_test) @ unit(f_train).T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(f_test), int(y_train.max()) + 1))
    np.add.at(votes, (np.arange(len(f_test))[:, None], np.asarray(y_train)[nearest]), 1.0)
    return float((votes.argmax(1) == np.asarray(y_test)).mean())


def perplexity(codes: torch.Tensor, size: int) -> float:
    """exp of the entropy of the code usage: the number of equally used codes it equals
    (codebook perplexity, van den Oord et al. 2017)."""
    p = torch.bincount(codes, minlength=size).double() / len(codes)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def loss_end_over_start(series: dict[str, list[float]]) -> dict[str, float]:
    """For each ``*_loss`` series sampled during training: the median of its last 10 samples
    over the median of samples 1-5 (the first sample, before any step, left out)."""
    return {f"{name}_end_over_start": float(np.median(v[-10:]) / np.median(v[1:6]))
            for name, v in series.items() if name.endswith("_loss")}


# The 0-1 pixels of digits_split back to the stored 0-16 grey levels.
INK_SCALE = 16.0


def ink_of(x: torch.Tensor) -> torch.Tensor:
    """The ink of each digit image: the sum of its pixels in grey levels (about 313 on
    average), a regression target on a far larger scale than a 10-class cross entropy."""
    return x.sum(1) * INK_SCALE


class DigitInkNet(nn.Module):
    """A shared two-layer trunk with a digit-class head and an ink-regression head."""

    def __init__(self, width: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                                   nn.ReLU())
        self.digit_head, self.ink_head = nn.Linear(width, 10), nn.Linear(width, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.digit_head(h), self.ink_head(h).squeeze(1)


def trunk_grad_ratio(model: nn.Module, losses: dict, weights: dict, numerator: str,
                     denominator: str) -> float:
    """|w_a grad_trunk L_a| / |w_b grad_trunk L_b| over ``model.trunk``'s parameters by
    ``torch.autograd.grad``, the weights floats or tensors (1 where absent)."""
    params = list(model.trunk.parameters())
    norms = {}
    for name in (numerator, denominator):
        grads = torch.autograd.grad(losses[name], params, retain_graph=True)
        weight = float(torch.as_tensor(weights.get(name, 1.0)).detach())
        norms[name] = weight * float(torch.cat([g.flatten() for g in grads]).norm())
    return norms[numerator] / norms[denominator]
