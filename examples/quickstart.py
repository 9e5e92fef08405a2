"""Quickstart: attach gradprobe to an existing multi-loss training loop.

A two-latent model with four losses (task, contrastive, prototype, orthogonality) trains
for a few hundred steps; the probe records on every 10th step; then the recorded run is
read back and diagnosed. Run: python examples/quickstart.py [--out runs/quickstart.gprobe]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import diagnose


class TwoLatentModel(nn.Module):
    def __init__(self, inp=32, dim=16, groups=4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(inp, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.f_I = nn.Linear(64, dim)
        self.f_E = nn.Linear(64 + groups, dim)
        self.head = nn.Linear(2 * dim, 1)
        self.register_buffer("prototypes", torch.zeros(groups, dim))
        self.groups = groups

    def forward(self, x, group):
        h = self.backbone(x)
        z_I = self.f_I(h)
        z_E = self.f_E(torch.cat([h, F.one_hot(group, self.groups).float()], 1))
        return z_I, z_E, self.head(torch.cat([z_I, z_E], 1)).squeeze(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart.gprobe")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(2048, 32)
    group = torch.randint(0, 4, (2048,))
    y = ((x[:, :4].sum(1) + 0.3 * group) > 0.5).float()
    model = TwoLatentModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    # The probe: what the losses compete for, how often to look, where to write.
    probe = gradprobe.Probe(model, shared=model.backbone, every=10, run_file=args.out, overwrite=True,
                            roles={"cont": "contrastive", "proto": "prototype",
                                   "orth": "orthogonality"})
    probe.watch_latent("z_I", model.f_I)          # captured from the module's output
    probe.watch_latent("z_E")                     # handed over with observe()
    probe.watch_prototypes("group", lambda: model.prototypes, latent="z_E")

    with probe:
        for step in range(args.steps):
            idx = torch.randint(0, len(x), (128,))
            z_I, z_E, logit = model(x[idx], group[idx])
            probe.observe(z_E=z_E, groups=group[idx])
            a, b = F.normalize(z_I, dim=1), F.normalize(z_E, dim=1)
            losses = {
                "task": F.binary_cross_entropy_with_logits(logit, y[idx]),
                "cont": F.cross_entropy(a @ b.T / 0.1, torch.arange(len(idx))),
                "proto": ((z_E - model.prototypes[group[idx]]) ** 2).sum(1).mean(),
                "orth": (z_I.T @ z_E).pow(2).sum(),
            }
            probe.backward(losses, weights={"cont": 0.05, "proto": 0.1, "orth": 0.1})
            opt.step()
            opt.zero_grad()
            with torch.no_grad():  # momentum prototypes
                for c in group[idx].unique():
                    mean = z_E[group[idx] == c].mean(0)
                    model.prototypes[c] = 0.9 * model.prototypes[c] + 0.1 * mean
            probe.log(lr=opt.param_groups[0]["lr"])

    run = gradprobe.load_run(args.out)
    steps, ratio_cont = run.series("weighted_grad_norm", "cont")
    _, task = run.series("weighted_grad_norm", "task")
    print(f"recorded {len(run.probe_steps())} probe steps of {run.losses} into {args.out}")
    print(f"median weighted gradient of 'cont' relative to 'task': "
          f"{float(torch.tensor(ratio_cont / task).median()):.3g}")
    for finding in diagnose(run):
        print(f"{finding.severity:8s} {finding.id:28s} {finding.title}")
    print(f"next: gradprobe analyze {args.out} -o report.pdf")


if __name__ == "__main__":
    main()
