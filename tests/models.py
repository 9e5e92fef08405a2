"""Small seeded multi-loss models shared by the tests: a conv trunk, two latents, 4 losses."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class TwoLatentNet(nn.Module):
    """Conv trunk -> z_I (intrinsic) and z_E (environment); task head on both."""

    def __init__(self, channels: int = 4, length: int = 32, dim: int = 8, groups: int = 4):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv1d(channels, 16, 5, padding=2), nn.ReLU(),
                                   nn.Conv1d(16, 16, 3, padding=1), nn.ReLU())
        self.f_I = nn.Linear(16 * length, dim)
        self.f_E = nn.Linear(16 * length + groups, dim)
        self.head = nn.Linear(2 * dim, 1)
        self.register_buffer("prototypes", torch.zeros(groups, dim))
        self.groups = groups

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        h = self.trunk(x).flatten(1)
        z_I = self.f_I(h)
        z_E = self.f_E(torch.cat([h, F.one_hot(g, self.groups).float()], 1))
        logit = self.head(torch.cat([z_I, z_E], 1)).squeeze(1)
        return z_I, z_E, logit


def make_data(n: int = 256, channels: int = 4, length: int = 32, groups: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, length, generator=gen)
    g = torch.randint(0, groups, (n,), generator=gen)
    y = ((x[:, 0, :8].sum(1) + 0.5 * g) > 0.75).float()
    return x, y, g


def four_losses(model: TwoLatentNet, x, y, g):
    z_I, z_E, logit = model(x, g)
    a = F.normalize(z_I, dim=1)
    b = F.normalize(z_E, dim=1)
    logits = a @ b.T / 0.1
    losses = {
        "task": F.binary_cross_entropy_with_logits(logit, y),
        "cont": F.cross_entropy(logits, torch.arange(len(x))),
        "proto": ((z_E - model.prototypes[g]) ** 2).sum(1).mean(),
        "orth": (z_I.T @ z_E).pow(2).sum() / len(x) ** 2,
    }
    return losses, (z_I, z_E, logit)


WEIGHTS = {"cont": 0.05, "proto": 0.1, "orth": 0.1}


def train(steps: int = 30, probe_factory=None, seed: int = 0, batch: int = 32, lr: float = 1e-2,
          optimizer: str = "adam"):
    """Train ``steps`` steps; ``probe_factory(model)`` attaches a probe. Returns (model, probe)."""
    torch.manual_seed(seed)
    model = TwoLatentNet()
    x, y, g = make_data(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam" else \
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    probe = probe_factory(model) if probe_factory else None
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x)
        losses, (z_I, z_E, _) = four_losses(model, x[idx], y[idx], g[idx])
        if probe is not None:
            probe.observe(z_E=z_E, groups=g[idx])
            probe.backward(losses, weights=WEIGHTS)
        else:
            sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items()).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():  # momentum prototypes, as in the record
            for c in g[idx].unique():
                model.prototypes[c] = 0.9 * model.prototypes[c] + 0.1 * z_E[g[idx] == c].mean(0)
    if probe is not None:
        probe.close()
    return model, probe
