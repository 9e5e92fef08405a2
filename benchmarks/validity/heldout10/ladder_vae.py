"""Ladder VAE with KL warm-up, after Sønderby, Raiko, Maaløe, Sønderby & Winther 2016
("Ladder Variational Autoencoders", NeurIPS; sec. 2.2 eq. 17-21, the precision-weighted
merge of the bottom-up likelihood and the top-down prior; sec. 2.3, warm-up and batch
normalisation), in the authors' code casperkaae/LVAE (``run_models.py``, the merge layer
referenced at L106 by public ports).

Published setup: a deterministic bottom-up pass d_1 = MLP(x), d_2 = MLP(d_1) with batch norm,
each giving (mu_hat_i, sigma_hat_i); the top-down pass samples z_2 ~ q(z_2|x) =
N(mu_hat_2, sigma_hat_2^2), computes the prior p(z_1|z_2) = N(mu_p, sigma_p^2) and the
posterior q(z_1|x, z_2) with precision 1/sigma_hat_1^2 + 1/sigma_p^2 and the
precision-weighted mean. Loss: -E_q log p(x|z_1) + beta (KL(q(z_1)||p(z_1|z_2)) +
KL(q(z_2)||N(0, I))), beta raised linearly from 0 to 1 over the first 200 epochs (MNIST,
5 stochastic layers, Adam lr 2e-3).

Here: scikit-learn's 8x8 digits, two stochastic layers (z_1 of 8, z_2 of 4 units),
bottom-up MLP 64 -> 128 -> 64 with batch norm and leaky ReLU, Bernoulli decoder, batch 64,
Adam lr 2e-3, 2,000 steps, beta raised from 0 to 1 over the first 1,000 steps (not 200
epochs). Losses: ``reconstruction`` (Bernoulli cross-entropy summed over pixels, averaged
over the batch), ``kl_z1`` and ``kl_z2`` (the KL of each stochastic layer, beta as their
weight). The posterior means of both layers are watched (``z1``, ``z2``).

Variants (truth by construction):
- ``published``: healthy, warm-up 0 -> 1.
- ``no-warmup-beta4``: broken. No warm-up and beta fixed at 4 from the first step: the KL
  terms press the posteriors onto their priors before the decoder learns to use them.
Measured on the test split, independently of gradprobe (seeds 0 and 1): active units per
layer (variance over the inputs of the posterior mean > 0.01, Burda et al. 2016), the KL of
each layer (nats), and the pixel MSE of the decoded posterior means against the training
mean image's:
  published:       active units z1 8 and 8, z2 4 and 4; KL z1 0.47 and 0.70, z2 2.76 and
                   2.62 nats; MSE 0.0243 and 0.0239 (mean image 0.0740);
  no-warmup-beta4: active units z1 2 and 1, z2 0 and 0; KL z1 0.0001 and 0.0001, z2 0.0063
                   and 0.0080 nats; MSE 0.0737 and 0.0734 (the mean image's: nothing of x
                   reaches the decoder).
A run takes ~13-18 CPU-seconds.
Expected on ``no-warmup-beta4``: ``representation-collapse`` on ``z2`` (no active unit, KL
~0). Allowed: ``representation-collapse`` on ``z1`` (its posterior equals its prior, KL
0.0001, but the watched mean keeps a spread that z_2's sampling noise gives it, so its
collapse is true yet not visible in its spread), ``gradient-swamping`` and
``static-loss-weights`` on ``reconstruction`` (the fixed beta 4 drowns the reconstruction,
which stays at the mean digit). Must not (both): ``inert-loss``; on ``published`` also
``representation-collapse``, ``gradient-swamping``, ``gradient-conflict``,
``static-loss-weights`` (the published warm-up).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

Z1, Z2, H1, H2 = 8, 4, 128, 64
STEPS, WARMUP_STEPS, BATCH, LR = 2000, 1000, 64, 2e-3
FIXED_BETA = {"no-warmup-beta4": 4.0}


def dense(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.LeakyReLU(0.1))


class Gaussian(nn.Module):
    """A layer giving the mean and variance of a diagonal Gaussian."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.mean, self.variance = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, h: torch.Tensor):
        return self.mean(h), F.softplus(self.variance(h)) + 1e-4


class LadderVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1, self.up2 = dense(64, H1), dense(H1, H2)
        self.q1, self.q2 = Gaussian(H1, Z1), Gaussian(H2, Z2)
        self.prior1 = nn.Sequential(dense(Z2, H2), Gaussian(H2, Z1))
        self.decoder = nn.Sequential(dense(Z1, H1), nn.Linear(H1, 64))

    def forward(self, x: torch.Tensor, sample: bool = True):
        noise = 1.0 if sample else 0.0
        d1 = self.up1(x)
        mu_hat1, var_hat1 = self.q1(d1)
        mu2, var2 = self.q2(self.up2(d1))
        z2 = mu2 + noise * var2.sqrt() * torch.randn_like(mu2)
        mu_p1, var_p1 = self.prior1(z2)
        precision1 = 1 / var_hat1 + 1 / var_p1
        var1 = 1 / precision1
        mu1 = (mu_hat1 / var_hat1 + mu_p1 / var_p1) * var1
        z1 = mu1 + noise * var1.sqrt() * torch.randn_like(mu1)
        return self.decoder(z1), (mu1, var1, mu_p1, var_p1), (mu2, var2)


def gaussian_kl(mu_q, var_q, mu_p, var_p) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)), summed over units, averaged over the batch."""
    return 0.5 * (var_p.log() - var_q.log() + (var_q + (mu_q - mu_p) ** 2) / var_p - 1).sum(1).mean()


def layer_losses(model: LadderVAE, x: torch.Tensor, sample: bool = True):
    x_logits, (mu1, var1, mu_p1, var_p1), (mu2, var2) = model(x, sample)
    losses = {"reconstruction": F.binary_cross_entropy_with_logits(x_logits, x, reduction="sum") / len(x),
              "kl_z1": gaussian_kl(mu1, var1, mu_p1, var_p1),
              "kl_z2": gaussian_kl(mu2, var2, torch.zeros_like(mu2), torch.ones_like(var2))}
    return losses, mu1, mu2


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    model = LadderVAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z1")
    probe.watch_latent("z2")
    with probe:
        for step in range(1, STEPS + 1):
            losses, mu1, mu2 = layer_losses(model, x_tr[next(order)])
            probe.observe(z1=mu1, z2=mu2)
            beta = FIXED_BETA.get(variant, min(step / WARMUP_STEPS, 1.0))
            opt.zero_grad()
            probe.backward(losses, weights={"kl_z1": beta, "kl_z2": beta})
            opt.step()
    return posterior_truth(model, x_tr, x_te)


def posterior_truth(model: LadderVAE, x_tr: torch.Tensor, x_te: torch.Tensor) -> dict:
    """Active units and KL per layer, and reconstruction against the mean image, with z_2 set
    to its posterior mean: a sampled z_2 would give z_1's mean a spread over the inputs that
    is noise, not information about x."""
    model.eval()
    with torch.no_grad():
        losses, mu1, mu2 = layer_losses(model, x_te, sample=False)
        x_mean = torch.sigmoid(model.decoder(mu1))
    return {"active_units_z1": int((mu1.var(0) > 0.01).sum()),
            "active_units_z2": int((mu2.var(0) > 0.01).sum()),
            "kl_z1": float(losses["kl_z1"]), "kl_z2": float(losses["kl_z2"]),
            "recon_mse": float((x_mean - x_te).pow(2).mean()),
            "mean_image_mse": float((x_tr.mean(0) - x_te).pow(2).mean())}


FAMILY = Family(
    name="ladder-vae",
    source="Sønderby et al. 2016 (Ladder VAE, NeurIPS) sec. 2.2-2.3; casperkaae/LVAE run_models.py",
    train=train,
    variants=(
        Variant("published", True,
                "two stochastic layers, batch norm, KL warm-up beta 0 -> 1 over the first half: "
                "both layers keep active units",
                must_not=("representation-collapse", "inert-loss", "gradient-swamping",
                          "gradient-conflict", "static-loss-weights")),
        Variant("no-warmup-beta4", False,
                "no warm-up, beta fixed at 4 from the first step: the KL terms press the "
                "posteriors onto their priors before the decoder uses them: z2 has no active "
                "unit and the decoder outputs the mean digit",
                expected=(Expect("representation-collapse", "z2"),),
                allowed=(Expect("representation-collapse", "z1"),
                         Expect("gradient-swamping", "reconstruction"),
                         Expect("static-loss-weights", "reconstruction")),
                must_not=("inert-loss",)),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("no-warmup-beta4", 0)),
)
