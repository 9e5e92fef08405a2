"""A run that turns swamped part-way, for the live tests (importable, and a script).

Two regression tasks share a trunk, with targets of the same scale and equal weights: healthy.
At step ``onset`` the loop drops the weight of task 'b' to 0.002, as a misconfigured schedule
would: from then on 'b''s weighted gradient on the trunk is about 0.2% of 'a''s, which is
gradient-swamping (error below 1%) once it holds on half the judged probe steps.

As a script (``python tests/live_run.py RUN --release FILE``) it trains in its own process,
one probe step in two, and keeps training after the onset (slowly) until FILE exists, so that
a test can watch the run while it trains and decide when training ends.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

ONSET = 110  # the first findings check with more than half the probe steps swamped: 225


def attach(model: nn.Module, **kwargs) -> gradprobe.Probe:
    """The probe of this run: on the trunk, one probe step in two, both losses tasks."""
    return gradprobe.Probe(model, shared=model["trunk"], every=2, task="a", roles={"b": "task"},
                           **kwargs)


def train(steps: int = 400, onset: int = ONSET, make_probe: Callable | None = None,
          release: Path | None = None, pause: float = 0.0,
          after_step: Callable | None = None):
    """Train ``steps`` steps with the probe ``make_probe(model)`` returns (none: None); returns
    ``(model, probe, steps trained)``. ``release``: after the onset, stop as soon as this file
    exists (``steps`` stays the cap); ``pause``: seconds to sleep per step after the onset;
    ``after_step(probe, step)``: called after each optimiser step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a busy machine
    try:
        return _train(steps, onset, make_probe, release, pause, after_step)
    finally:
        torch.set_num_threads(threads)


def _train(steps, onset, make_probe, release, pause, after_step):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    a, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    y_a, y_b = torch.sin(x @ a), torch.cos(x @ b)
    model = nn.ModuleDict(dict(trunk=nn.Sequential(nn.Linear(8, 32), nn.Tanh()),
                               a=nn.Linear(32, 1), b=nn.Linear(32, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = make_probe(model) if make_probe is not None else None
    weights = {"a": 1.0, "b": 1.0}
    trained = 0
    for step in range(steps):
        if step == onset:
            weights["b"] = 0.002
        if step > onset and release is not None:
            if release.exists():
                break
            time.sleep(pause)
        idx = torch.randint(0, len(x), (64,), generator=gen)
        h = model["trunk"](x[idx])
        losses = {"a": F.mse_loss(model["a"](h).squeeze(1), y_a[idx]),
                  "b": F.mse_loss(model["b"](h).squeeze(1), y_b[idx])}
        if probe is not None:
            probe.backward(losses, weights=weights)
        else:
            sum(weights[k] * v for k, v in losses.items()).backward()
        opt.step()
        opt.zero_grad()
        trained = step + 1
        if after_step is not None:
            after_step(probe, step)
    if probe is not None:
        probe.close()
    return model, probe, trained


def many_losses(run_file: Path, losses: int = 12, steps: int = 120) -> None:
    """A run of ``losses`` regression heads on one trunk, every other one weighted 0.002 (so
    swamped from the start, with fixed weights): more losses and findings than 24 rows hold."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    targets = torch.sin(x @ torch.randn(8, losses, generator=gen))
    trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
    heads = nn.Linear(32, losses)
    model = nn.ModuleDict(dict(trunk=trunk, heads=heads))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    names = [f"task{k:02d}" for k in range(losses)]
    weights = {n: 1.0 if k % 2 == 0 else 0.002 for k, n in enumerate(names)}
    probe = gradprobe.Probe(model, shared=trunk, every=2, run_file=run_file,
                            roles={n: "task" for n in names})
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        out = heads(trunk(x[idx]))
        probe.backward({n: F.mse_loss(out[:, k], targets[idx, k]) for k, n in enumerate(names)},
                       weights=weights)
        opt.step()
        opt.zero_grad()
    probe.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--release", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--pause", type=float, default=0.01)
    args = parser.parse_args()
    _, _, trained = train(args.steps, make_probe=lambda m: attach(m, run_file=args.log, overwrite=True),
                          release=args.release, pause=args.pause)
    print(f"trained {trained} steps", flush=True)
