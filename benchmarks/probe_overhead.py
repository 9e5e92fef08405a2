"""Wall time per training step with and without the probe, as ratios taken side by side.

Configurations, interleaved round by round (this machine is noisy), medians over rounds:

- plain: weighted sum of the losses and one ordinary backward;
- probe defaults: ``Probe(model)`` (the default schedule, measured past its dense start, at one
  probe step in 64 where a long run spends nearly all its steps; shared set inferred: nearest
  shared layer); what the dense start adds to a short run is printed from the every-step cost;
- probe every step: defaults with ``every=1``;
- probe every step, whole trunk: ``shared=trunk, every=1, assemble=True`` (exact per-loss
  gradients over the whole trunk, ``.grad`` assembled from them);
- naive: one ``autograd.grad`` per loss over all parameters, then the ordinary backward;
- reference "forward + K backwards": one ``autograd.grad`` per loss over all parameters and
  nothing else: the least any exact per-loss method pays.

Usage: python benchmarks/probe_overhead.py [--rounds 7] [--block 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.probe.cadence import MAX_DEFAULT_INTERVAL, is_probe_step


class ConvTwoLatent(nn.Module):
    """Conv trunk over one-hot-like sequences, two latents, task head (the record's shape)."""

    def __init__(self, channels=4, length=100, width=64, dim=32, groups=8):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv1d(channels, width, 9, padding=4), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(8))
        self.f_I = nn.Linear(width * 8, dim)
        self.f_E = nn.Linear(width * 8 + groups, dim)
        self.head = nn.Linear(2 * dim, 1)
        self.groups = groups

    def forward(self, x, g):
        h = self.trunk(x).flatten(1)
        z_I = self.f_I(h)
        z_E = self.f_E(torch.cat([h, F.one_hot(g, self.groups).float()], 1))
        return z_I, z_E, self.head(torch.cat([z_I, z_E], 1)).squeeze(1)


class WideMLP(nn.Module):
    def __init__(self, inp=512, width=1024, dim=128, groups=8):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inp, width), nn.ReLU(), nn.Linear(width, width),
                                   nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.f_I = nn.Linear(width, dim)
        self.f_E = nn.Linear(width + groups, dim)
        self.head = nn.Linear(2 * dim, 1)
        self.groups = groups

    def forward(self, x, g):
        h = self.trunk(x)
        z_I = self.f_I(h)
        z_E = self.f_E(torch.cat([h, F.one_hot(g, self.groups).float()], 1))
        return z_I, z_E, self.head(torch.cat([z_I, z_E], 1)).squeeze(1)


def losses_of(model, x, y, g, prototypes):
    z_I, z_E, logit = model(x, g)
    a, b = F.normalize(z_I, dim=1), F.normalize(z_E, dim=1)
    return {
        "task": F.binary_cross_entropy_with_logits(logit, y),
        "cont": F.cross_entropy(a @ b.T / 0.1, torch.arange(len(x))),
        "proto": ((z_E - prototypes[g]) ** 2).sum(1).mean(),
        "orth": (z_I.T @ z_E).pow(2).sum() / len(x) ** 2,
    }, z_E


WEIGHTS = {"cont": 0.05, "proto": 0.1, "orth": 0.1}


class Trainer:
    """One model + optimiser + step function for one configuration."""

    def __init__(self, make_model, batch, mode, log_dir: Path):
        torch.manual_seed(0)
        self.model = make_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.batch = batch
        self.mode = mode
        self.prototypes = torch.zeros(self.model.groups, self.model.f_E.out_features)
        self.params = list(self.model.parameters())
        self.probe = None
        if mode.startswith("probe"):
            kwargs = {"log": log_dir / f"{mode}.gprobe"}
            if mode != "probe defaults":
                kwargs["every"] = 1
            if mode == "probe every step, whole trunk":
                kwargs.update(shared=self.model.trunk, assemble=True)
            self.probe = gradprobe.Probe(self.model, **kwargs)
            self.probe.watch_latent("z_I", self.model.f_I)
            self.probe.watch_latent("z_E")
            if mode == "probe defaults":  # the first probe step still runs (shared set, meta)
                self.step()
                self.probe.step = MAX_DEFAULT_INTERVAL ** 2

    def step(self):
        x, y, g = self.batch
        losses, z_E = losses_of(self.model, x, y, g, self.prototypes)
        if self.probe is not None:
            self.probe.observe(z_E=z_E, groups=g)
            self.probe.backward(losses, WEIGHTS)
        elif self.mode == "plain":
            sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items()).backward()
        else:
            per_loss = [torch.autograd.grad(v, self.params, retain_graph=True, allow_unused=True)
                        for v in losses.values()]
            if self.mode == "naive":
                sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items()).backward()
            del per_loss
        self.opt.step()
        self.opt.zero_grad()


MODES = ["plain", "probe defaults", "probe every step", "probe every step, whole trunk", "naive",
         "forward + K backwards"]


def measure(label, make_model, batch, rounds, block, log_dir):
    trainers = {mode: Trainer(make_model, batch, mode, log_dir / label) for mode in MODES}
    for trainer in trainers.values():  # warm-up: caches, allocator, first probe step
        for _ in range(3):
            trainer.step()
    times = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(block):
                trainer.step()
            times[mode].append((time.perf_counter() - start) / block)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    base = medians["plain"]
    print(f"\n{label}: median ms/step over {rounds} interleaved rounds of {block} steps")
    print(f"{'configuration':34s} {'ms/step':>9s} {'x plain':>8s}")
    for mode in MODES:
        print(f"{mode:34s} {medians[mode] * 1e3:9.2f} {medians[mode] / base:8.3f}")
    whole = medians["probe every step, whole trunk"] / medians["forward + K backwards"]
    print(f"whole-trunk every-step probe / (forward + K backwards): {whole:.3f} (target <= 1.1)")
    print(f"defaults overhead over plain: {100 * (medians['probe defaults'] / base - 1):+.1f}% "
          "(target <= 3%)")
    per_probe_step = medians["probe every step"] / base - 1
    for steps in (300, 1000, 100_000):
        share = sum(is_probe_step(s, None) for s in range(steps)) / steps
        print(f"  a {steps:,}-step run at the defaults: {100 * share:.1f}% probe steps, "
              f"about {100 * share * per_probe_step:+.1f}% over plain")
    for trainer in trainers.values():
        if trainer.probe is not None:
            trainer.probe.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    conv_batch = (torch.randn(128, 4, 100), torch.randint(0, 2, (128,)).float(),
                  torch.randint(0, 8, (128,)))
    mlp_batch = (torch.randn(256, 512), torch.randint(0, 2, (256,)).float(),
                 torch.randint(0, 8, (256,)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for label, make_model, batch in (("conv trunk, two latents, 4 losses", ConvTwoLatent,
                                          conv_batch),
                                         ("MLP 512-1024x3, two latents, 4 losses", WideMLP,
                                          mlp_batch)):
            (Path(tmp) / label).mkdir()
            measure(label, make_model, batch, args.rounds, args.block, Path(tmp))


if __name__ == "__main__":
    main()
