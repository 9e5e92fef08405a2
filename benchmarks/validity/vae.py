"""Variational autoencoder, after pytorch/examples (vae/main.py) and Kingma & Welling 2014.

Published setup: encoder fc1 784->400 (ReLU), fc21 / fc22 400->20 (mean, log-variance);
decoder fc3 20->400 (ReLU), fc4 400->784, sigmoid; loss BCE(recon, x) summed plus
KLD = -1/2 sum(1 + logvar - mu^2 - exp(logvar)); Adam lr 1e-3, batch 128.

Here: the same network on the 64 pixels of scikit-learn's digits (grey levels in [0, 1],
as MNIST's), batch 128, 1,000 steps. To be probed, the decoder returns its logits beside
the sigmoid, and they are observed with their targets (the input pixels), as docs/probe.md
asks of a functional ``torch.sigmoid`` (``watch_saturation("recon", target="x")``); the
losses keep the example's names ``bce`` and ``kld``; the posterior mean (fc21's output) is
watched.

Variants (truth by construction):
- ``beta-1``: healthy (the published ELBO). Most latent dimensions stay active.
- ``beta-50``: the KL term weighted 50 (beta-VAE far past beta = 1): the posterior is pushed
  onto the prior and the latent carries almost no information about x (posterior collapse).
  Checked by active units (Burda, Grosse & Salakhutdinov 2016: Cov_x(E_q[z_u]) > 0.01).
  Expected: ``representation-collapse`` on ``mu``.
- ``logits-x30``: healthy, although saturated: the decoder's logits multiplied by 30 before
  the sigmoid, so that a quarter of the outputs sit in the sigmoid's flat region. The loss
  undoes the flat slope: the gradient of BCE(sigmoid(a), y) with respect to the logit a is
  sigmoid(a) - y, which vanishes only where the output already equals its target (and Adam
  rescales each output row's gradient anyway). Measured: no test pixel is saturated and more
  than 0.5 from its target (``saturated_wrong`` 0) and the test BCE is no worse than
  ``beta-1``'s. (With MSE on the probabilities instead, 0.6% of pixels end saturated and
  wrong and the error rises only 8%: Adam defeats the stall; the harmful case is the
  ``sigmoid-mse`` family, trained with SGD.)
Must not (all variants): ``gradient-conflict`` (reconstruction and KL oppose each other by
the ELBO's design), ``static-loss-weights``; on the healthy variants also
``sigmoid-saturation`` (saturation towards the target is correct and harmless) and
``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import batches, digits_split
from .harness import Expect, Family, Variant

STEPS, BATCH, LR = 1000, 128, 1e-3
SATURATION = 4.6  # |logit| beyond which the sigmoid's slope is below 1% of its maximum


class VAE(nn.Module):
    def __init__(self, logit_scale: float = 1.0):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(64, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 64)
        self.logit_scale = logit_scale

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z):
        logits = self.logit_scale * self.fc4(F.relu(self.fc3(z)))
        return torch.sigmoid(logits), logits

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon, logits = self.decode(z)
        return recon, logits, mu, logvar


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    model = VAE(logit_scale=30.0 if variant == "logits-x30" else 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    beta = 50.0 if variant == "beta-50" else 1.0
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("mu", model.fc21)
    probe.watch_saturation("recon", target="x")
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            x = x_tr[idx]
            recon, logits, mu, logvar = model(x)
            probe.observe(recon=logits, x=x)
            losses = {"bce": F.binary_cross_entropy(recon, x, reduction="sum"),
                      "kld": -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())}
            probe.backward(losses, weights={"kld": beta})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        mu, logvar = model.encode(x_te)
        recon, logits = model.decode(mu)
        bce = F.binary_cross_entropy(recon, x_te, reduction="sum") / len(x_te)
    saturated = logits.abs() > SATURATION
    wrong = (recon - x_te).abs() > 0.5
    return {"active_units": int((mu.var(0) > 0.01).sum()), "latent_dim": int(mu.shape[1]),
            "test_bce_per_image": float(bce),
            "saturated": float(saturated.float().mean()),
            "saturated_wrong": float((saturated & wrong).float().mean())}


_MUST_NOT = ("gradient-conflict", "static-loss-weights")

FAMILY = Family(
    name="vae",
    source="pytorch/examples vae/main.py; Kingma & Welling 2014",
    train=train,
    variants=(
        Variant("beta-1", True, "the published ELBO",
                must_not=_MUST_NOT + ("sigmoid-saturation", "representation-collapse")),
        Variant("beta-50", False,
                "KL weighted 50: the posterior is pushed onto the prior, few or no active units",
                expected=(Expect("representation-collapse", "mu"),), must_not=_MUST_NOT),
        Variant("logits-x30", True,
                "decoder logits x30: a quarter of the outputs saturate, but BCE's gradient with "
                "respect to the logit is sigmoid(a) - y, so no saturated output stays wrong",
                must_not=_MUST_NOT + ("sigmoid-saturation", "representation-collapse")),
    ),
    seeds=(0, 1, 2, 3),
    quick=(("beta-1", 1), ("beta-50", 1), ("logits-x30", 1)),
)
