"""A loop that runs its own backward: PCGrad gradient surgery with the probe around it.

Two regression tasks on a narrow shared trunk (4 features) whose targets partly oppose each
other, so their gradients on the trunk conflict at most steps, trained with
PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020): each task's
gradient on the shared parameters is projected off the other task's gradient when the two
conflict, and the projected gradients are summed into ``.grad``. The probe records the
per-loss gradients *before* the surgery (what the losses ask for), with
``probe.before_backward`` in place of the backward and ``probe.after_backward`` after it.
Run: python examples/pcgrad.py [--out runs/pcgrad.gprobe] [--steps 300]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import diagnose


class TwoTaskNet(nn.Module):
    def __init__(self, inp=16, width=4):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inp, width), nn.Tanh(), nn.Linear(width, width),
                                   nn.Tanh())
        self.left, self.right = nn.Linear(width, 1), nn.Linear(width, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.left(h).squeeze(1), self.right(h).squeeze(1)


def pcgrad_backward(losses: dict[str, torch.Tensor], shared: list[torch.Tensor],
                    own: list[torch.Tensor], rng: np.random.Generator) -> float:
    """PCGrad's backward; returns the cosine of the two tasks' shared gradients."""
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared,
                                                                   retain_graph=True)])
             for loss in losses.values()]
    projected = [g.clone() for g in grads]
    for i in range(len(grads)):
        for j in rng.permutation([j for j in range(len(grads)) if j != i]):
            dot = projected[i] @ grads[j]
            if dot < 0:  # conflict: remove the component along the other task's gradient
                projected[i] -= dot / grads[j].square().sum() * grads[j]
    combined, offset = torch.stack(projected).sum(0), 0
    for p in shared:
        p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    # the task heads get their own loss's gradient, as in an ordinary backward
    torch.autograd.backward(sum(losses.values()), inputs=own)
    return float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))


def train(steps: int, out: str | None, seed: int = 0) -> dict:
    """Train with PCGrad, with a probe when ``out`` is a path; the final parameters and the
    cosines PCGrad saw at each step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.randn(1024, 16)
    a, b = torch.randn(16), torch.randn(16)
    y_left, y_right = torch.sin(x @ a), -torch.sin(x @ a) + 0.5 * torch.cos(x @ b)
    model = TwoTaskNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    shared = list(model.trunk.parameters())
    own = [*model.left.parameters(), *model.right.parameters()]
    probe = None
    if out is not None:
        # overwrite=True: a second run of the script replaces the run file instead of
        # refusing it ("already holds a recorded run").
        probe = gradprobe.Probe(model, shared=model.trunk, run_file=out, overwrite=True,
                                roles={"right": "task"})
    cosines = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (16,))
        left, right = model(x[idx])
        losses = {"left": F.mse_loss(left, y_left[idx]), "right": F.mse_loss(right, y_right[idx])}
        pending = probe.before_backward(losses) if probe else None  # per-loss statistics
        cosines.append(pcgrad_backward(losses, shared, own, rng))   # instead of .backward()
        if probe:
            probe.after_backward(pending)                           # records, counts the step
        opt.step()
        opt.zero_grad()
    if probe:
        probe.close()
    return {"parameters": [p.detach().clone() for p in model.parameters()], "cosines": cosines}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/pcgrad.gprobe")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    result = train(args.steps, args.out)
    run = gradprobe.load_run(args.out)
    _, cosine = run.series("grad_cosine", "left|right")
    print(f"recorded {len(run.probe_steps())} probe steps of {run.losses}; median cosine of "
          f"the task gradients before the surgery {np.median(cosine):.2f}; PCGrad projected "
          f"at {np.mean(np.array(result['cosines']) < 0):.0%} of the steps")
    for finding in diagnose(run):
        print(f"  {finding.severity:7s} {finding.id}: {finding.title}")


if __name__ == "__main__":
    main()
