"""An adversarial loss recorded from the generator's side (-log D of what the discriminator
should be fooled by, an adversarial autoencoder's latent against its prior) that rises far
above where it began: the discriminator wins, so the swamped term is failing by its own
measure, not at chance (docs/findings.md, ``adversary_rise_ratio``). A real training run; the
discriminator's win is measured on fresh samples, the loss's rise from the recorded series."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds, diagnose

STEPS = 300


def _run(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 8) @ torch.randn(8, 8) + 3.0  # a latent far from N(0, I) unless pushed
    autoencoder = nn.ModuleDict(dict(encoder=nn.Linear(8, 2), decoder=nn.Linear(2, 8)))
    discriminator = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(autoencoder.parameters(), 1e-2)
    opt_d = torch.optim.Adam(discriminator.parameters(), 1e-3)
    path = tmp_path / "aae.gprobe"
    ones, zeros = torch.ones(len(x), 1), torch.zeros(len(x), 1)
    with gradprobe.Probe(autoencoder, run_file=path, every=4) as probe:
        for _ in range(STEPS):
            opt.zero_grad()
            z = autoencoder["encoder"](x)
            losses = {"reconstruction": F.mse_loss(autoencoder["decoder"](z), x),
                      "adversarial": F.binary_cross_entropy_with_logits(discriminator(z), ones)}
            probe.backward(losses, weights={"adversarial": 1e-6})
            opt.step()
            opt_d.zero_grad()
            verdict = torch.cat([discriminator(torch.randn(len(x), 2)), discriminator(z.detach())])
            F.binary_cross_entropy_with_logits(verdict, torch.cat([ones, zeros])).backward()
            opt_d.step()
    with torch.no_grad():
        z = autoencoder["encoder"](x)
        right = torch.cat([discriminator(torch.randn(len(x), 2)) > 0, discriminator(z) < 0])
    return gradprobe.load_run(path), float(right.float().mean())


def test_a_generator_side_loss_whose_discriminator_wins_keeps_its_swamping_alarm(tmp_path):
    run, discriminator_accuracy = _run(tmp_path)
    assert discriminator_accuracy > 0.9  # it tells the latent from the prior
    th = Thresholds()
    _, values = run.series("loss", "adversarial")
    window = max(th.min_points, int(np.ceil(th.window_share * len(values))))
    rise = np.median(values[-window:]) / np.median(values[:window])
    assert rise > th.adversary_rise_ratio
    finding = next(f for f in diagnose(run, th) if f.id == "gradient-swamping")
    assert finding.subject == "adversarial" and finding.severity == "error"
    assert "its discriminator wins" in finding.title
    # Read as a game at chance (no ceiling on the rise), the same run's term is info.
    lenient = Thresholds(adversary_rise_ratio=1e9)
    finding = next(f for f in diagnose(run, lenient) if f.id == "gradient-swamping")
    assert finding.severity == "info" and "at chance" in finding.title
