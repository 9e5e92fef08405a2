"""DIP-VAE-I, after Kumar, Sattigeri & Balakrishnan 2018 ("Variational Inference of
Disentangled Latent Concepts from Unlabeled Observations", ICLR; sec. 3, eq. 6 and the
DIP-VAE-I regulariser on Cov_p(x)[mu(x)]), in the PyTorch port amir-abdi/disentanglement-pytorch
(``dipvaei_loss_fn``, ``covariance_z_mean``; read as copied in public repositories).

Published setup: the ELBO (reconstruction + KL to N(0, I)) plus
lambda_od * sum_{i != j} Cov[mu]_ij^2 + lambda_d * sum_i (Cov[mu]_ii - 1)^2, Cov[mu] the
covariance of the encoder means over the minibatch; dSprites with lambda_od 10 and
lambda_d = 10 x lambda_od = 100, 10 latents, Adam.

Here: scikit-learn's 8x8 digits (64 pixels, not 4,096), MLP encoder 64 -> 128 -> 2 x 10,
decoder 10 -> 128 -> 64 logits, batch 64, Adam lr 1e-3, 1,500 steps, the published
lambda_od 10 and lambda_d 100. Losses as the task names them: ``reconstruction`` (Bernoulli
cross-entropy summed over pixels, averaged over the batch), ``kld`` (summed over latents,
averaged over the batch), ``dip`` (the DIP-VAE-I penalty, lambdas inside). The posterior
mean is watched (``mu``).

Variants (truth by construction):
- ``published``: healthy, diagonal target 1 as in eq. 6.
- ``zero-diagonal-target``: broken. The diagonal target is 0, not 1: lambda_d 100 drives the
  variance of every encoder mean to 0, so mu carries nothing about x (all units inactive)
  and the decoder falls back to the mean digit.
Measured on the test split, independently of gradprobe (seeds 0 and 1): active units
(variance of mu over the inputs > 0.01, Burda et al. 2016), the pixel MSE of the decoded
posterior mean against the training mean image's, the summed |off-diagonal| of Cov[mu] and
the mean diagonal:
  published:            active units 10 and 10, MSE 0.0203 and 0.0199 (mean image 0.0740),
                        sum |offdiag| 3.35 and 3.89, mean diagonal 0.99 and 0.96;
  zero-diagonal-target: active units 0 and 0, MSE 0.0773 and 0.0784 (no better than the mean
                        image), sum |offdiag| 0.15 and 0.16, mean diagonal 0.0040 and 0.0041.
A run takes ~6 CPU-seconds.
Expected on ``zero-diagonal-target``: ``representation-collapse`` on ``mu`` (no active unit).
Allowed: ``gradient-swamping`` and ``static-loss-weights`` on ``reconstruction`` (the fixed
lambda_d drowns the reconstruction, which stays at the mean digit). Must not (both):
``inert-loss``; on ``published`` also ``representation-collapse``, ``gradient-swamping``,
``gradient-conflict``, ``static-loss-weights`` (the published weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant
from ..heldout9.capacity_vae import VAE

STEPS, BATCH, LR = 1500, 64, 1e-3
LAMBDA_OD, LAMBDA_D = 10.0, 100.0
DIAGONAL_TARGET = {"published": 1.0, "zero-diagonal-target": 0.0}


def covariance_z_mean(mu: torch.Tensor) -> torch.Tensor:
    centred = mu - mu.mean(0, keepdim=True)
    return centred.T @ centred / len(mu)


def dip_vae_i_penalty(mu: torch.Tensor, diagonal_target: float) -> torch.Tensor:
    cov = covariance_z_mean(mu)
    diagonal = torch.diagonal(cov)
    off_diagonal = cov - torch.diag(diagonal)
    return LAMBDA_OD * off_diagonal.pow(2).sum() + LAMBDA_D * (diagonal - diagonal_target).pow(2).sum()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (1 + logvar - mu ** 2 - logvar.exp())).sum(1).mean()


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("mu")
    with probe:
        for _ in range(STEPS):
            x = x_tr[next(order)]
            x_recon, mu, logvar = model(x)
            probe.observe(mu=mu)
            losses = {"reconstruction": F.binary_cross_entropy_with_logits(x_recon, x, reduction="sum") / len(x),
                      "kld": kl_divergence(mu, logvar),
                      "dip": dip_vae_i_penalty(mu, DIAGONAL_TARGET[variant])}
            opt.zero_grad()
            probe.backward(losses)
            opt.step()
    return posterior_truth(model, x_tr, x_te)


def posterior_truth(model: VAE, x_tr: torch.Tensor, x_te: torch.Tensor) -> dict:
    """Active units, reconstruction against the mean image, and Cov[mu] on the test split."""
    model.eval()
    with torch.no_grad():
        mu, _ = model.encoder(x_te).chunk(2, dim=1)
        cov = covariance_z_mean(mu)
        diagonal = torch.diagonal(cov)
        return {"active_units": int((mu.var(0) > 0.01).sum()),
                "recon_mse": float((torch.sigmoid(model.decoder(mu)) - x_te).pow(2).mean()),
                "mean_image_mse": float((x_tr.mean(0) - x_te).pow(2).mean()),
                "cov_offdiag_abs_sum": float((cov - torch.diag(diagonal)).abs().sum()),
                "cov_diag_mean": float(diagonal.mean())}


FAMILY = Family(
    name="dip-vae",
    source="Kumar, Sattigeri & Balakrishnan 2018 (DIP-VAE, ICLR) sec. 3 eq. 6, DIP-VAE-I; "
           "amir-abdi/disentanglement-pytorch dipvaei_loss_fn",
    train=train,
    variants=(
        Variant("published", True,
                "DIP-VAE-I with lambda_od 10, lambda_d 100 and diagonal target 1: Cov[mu] is "
                "pushed towards the identity and every latent unit carries information",
                must_not=("representation-collapse", "inert-loss", "gradient-swamping",
                          "gradient-conflict", "static-loss-weights")),
        Variant("zero-diagonal-target", False,
                "diagonal target 0 instead of 1: lambda_d 100 drives the variance of every "
                "encoder mean to 0, no unit is active and the decoder outputs the mean digit",
                expected=(Expect("representation-collapse", "mu"),),
                allowed=(Expect("gradient-swamping", "reconstruction"),
                         Expect("static-loss-weights", "reconstruction")),
                must_not=("inert-loss",)),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("zero-diagonal-target", 0)),
)
