"""Two more loop shapes with the probe: mixed precision with a GradScaler, and gradient
accumulation over micro-batches.

A task loss and a small auxiliary loss share an encoder. ``--loop scaler``: the forward runs
under ``torch.autocast`` and ``probe.backward(..., scaler=scaler)`` does the scaled backward
(the recorded gradients are unscaled). ``--loop accumulation``: every optimizer step
accumulates 4 micro-batches; ``probe.backward`` is called on each micro-batch, as
``.backward()`` would be, with the losses divided by 4. Either way the parameters end
exactly where they end without the probe.
Run: python examples/amp_and_accumulation.py --loop scaler|accumulation [--out ...] [--steps N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

MICRO_BATCHES = 4


def setup(seed: int):
    torch.manual_seed(seed)
    x = torch.randn(2048, 12)
    y = x[:, :3].sum(1, keepdim=True)
    encoder = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    task, aux = nn.Linear(16, 1), nn.Linear(16, 12)
    model = nn.ModuleDict(dict(encoder=encoder, task=task, aux=aux))
    return x, y, model


def losses_of(model: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor) -> dict:
    h = model["encoder"](x)
    # .float(): under autocast the heads' outputs are bfloat16 (float16 on a GPU)
    return {"task": F.mse_loss(model["task"](h).float(), y),
            "recon": F.mse_loss(model["aux"](h).float(), x)}


def train_with_scaler(steps: int, out: str | None, seed: int = 0) -> list[torch.Tensor]:
    x, y, model = setup(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    x, y = x.to(device), y.to(device)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device)
    probe = gradprobe.Probe(model, shared=model["encoder"], run_file=out, overwrite=True) \
        if out else None
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), device=device)
        with torch.autocast(device, dtype=dtype):
            losses = losses_of(model, x[idx], y[idx])
        weights = {"recon": 0.1}
        if probe:
            probe.backward(losses, weights, scaler=scaler)  # = scaler.scale(total).backward()
        else:
            scaler.scale(losses["task"] + 0.1 * losses["recon"]).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    if probe:
        probe.close()
    return [p.detach().cpu().clone() for p in model.parameters()]


def train_with_accumulation(steps: int, out: str | None, seed: int = 0) -> list[torch.Tensor]:
    x, y, model = setup(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # The step counter counts micro-batches; every=MICRO_BATCHES would probe the first
    # micro-batch of each optimizer step only. Here: the default schedule.
    probe = gradprobe.Probe(model, shared=model["encoder"], run_file=out, overwrite=True) \
        if out else None
    weights = {"recon": 0.1}
    for step in range(steps):
        for micro in range(MICRO_BATCHES):
            idx = torch.randint(0, len(x), (16,))
            losses = {k: v / MICRO_BATCHES for k, v in losses_of(model, x[idx], y[idx]).items()}
            if probe:
                probe.backward(losses, weights)  # .grad accumulates as with .backward()
            else:
                (losses["task"] + 0.1 * losses["recon"]).backward()
        opt.step()
        opt.zero_grad()
    if probe:
        probe.close()
    return [p.detach().clone() for p in model.parameters()]


LOOPS = {"scaler": train_with_scaler, "accumulation": train_with_accumulation}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=sorted(LOOPS), required=True)
    parser.add_argument("--out", default=None, help="default: runs/<loop>.gprobe")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    out = args.out or f"runs/{args.loop}.gprobe"
    LOOPS[args.loop](args.steps, out)
    run = gradprobe.load_run(out)
    print(f"recorded {len(run.probe_steps())} probe steps of {run.losses}")


if __name__ == "__main__":
    main()
