"""InfoVAE with the MMD divergence (MMD-VAE), after Zhao, Song & Ermon 2019 ("InfoVAE:
Balancing Learning and Inference in Variational Autoencoders", AAAI; sec. 3, eq. 6-7: the
objective E[log p(x|z)] - (1 - alpha) KL(q(z|x) || p(z)) - (alpha + lambda - 1) D(q(z) || p(z)),
D the maximum mean discrepancy between the aggregate posterior and the prior; MMD-VAE with
alpha 0 and lambda 1000), in the PyTorch port AntixK/PyTorch-VAE ``models/info_vae.py``
(``InfoVAE.loss_function``, ``compute_mmd``, ``compute_inv_mult_quad``: losses
``Reconstruction_Loss``, ``KLD``, ``MMD``; KL weighted (1 - alpha), MMD weighted
(alpha + reg_weight - 1) / (n (n - 1)), inverse multiquadric kernel C / (C + ||z - z'||^2) with
C = 2 * latent_dim * latent_var, latent_var 2, the diagonal excluded, prior samples drawn
fresh each batch).

Published setup: convolutional encoder/decoder on MNIST/CelebA, Gaussian posterior,
reparameterised sample z, Adam.

Here: scikit-learn's 8x8 digits (64 pixels, not MNIST's 784: lambda 1000 is scaled by
64 / 784 to 82, so that the MMD keeps its published weight against a likelihood summed over
12 times fewer pixels; measured at seed 0, unscaled lambda 1000 collapses the posterior,
lambda 1, 10 and 82 keep 9, 9 and 8 active units, lambda 300 keeps 8 but reconstructs at
MSE 0.067 of the mean image's 0.074), MLP encoder 64 -> 128 -> 2 x 10, decoder
10 -> 128 -> 64 logits, batch 64, Adam lr 1e-3, 1,500 steps. ``Reconstruction_Loss`` is the
Bernoulli negative log-likelihood summed over pixels (the paper's -E[log p(x|z)], where the
port takes beta times the pixel-mean MSE), ``KLD`` summed over latents, ``MMD`` the
port's kernel sums divided by n (n - 1) (its bias correction), weights 1 - alpha and
alpha + lambda - 1 passed as loss weights. The posterior mean is watched (``mu``).

Variants (truth by construction):
- ``published``: healthy, MMD-VAE, alpha 0 and lambda 82 (KLD weight 1, MMD weight 81).
- ``unscaled-lambda``: broken. lambda 1000 taken over unscaled (MMD weight 999 against a
  64-pixel likelihood): the MMD term drowns the likelihood, the posterior collapses to the
  prior (no latent unit active) and the reconstruction fails (the mean digit).
- ``strong-kl``: broken. alpha -49 (the paper allows any alpha <= 0; the port's default is
  -0.5) with lambda 82: KLD weight 50, MMD weight 32. The per-sample KL at 50 times the
  likelihood drives every posterior to the prior: the posterior collapses, no latent unit
  is active and the decoder falls back to the mean digit.
Measured on the test split, independently of gradprobe (seeds 0 and 1): active units
(variance of mu over the inputs > 0.01, Burda et al. 2016), KL per latent dimension, the
pixel MSE of the decoded posterior mean against the training mean image's:
  published:       active units 8 and 7 of 10, KL per dim 0.263 and 0.254, MSE 0.0339 and
                   0.0344 (mean image 0.0740);
  unscaled-lambda: active units 0 and 0, KL per dim 0.0005 and 0.0004, MSE 0.0742 and 0.0742;
  strong-kl:       active units 0 and 0, KL per dim 0.0000 and 0.0000, MSE 0.0743 and 0.0743.
A run takes ~5-8 CPU-seconds.
Expected on both broken variants: ``representation-collapse`` on ``mu`` (no active unit).
Allowed: ``gradient-swamping`` and ``static-loss-weights`` on ``Reconstruction_Loss`` (a
fixed weight, MMD 999 or KL 50, drowns the likelihood). Must not (both): ``inert-loss``; on ``published`` also
``representation-collapse``, ``gradient-swamping``, ``gradient-conflict``,
``static-loss-weights`` (the published weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

LATENT, HIDDEN = 10, 128
STEPS, BATCH, LR = 1500, 64, 1e-3
LATENT_VAR = 2.0
# (alpha, lambda): lambda 1000 is the paper's for a 784-pixel likelihood, scaled by 64 / 784
# to the digits' 64 pixels so that the MMD keeps its published weight against the likelihood.
ALPHA_LAMBDA = {"published": (0.0, 82.0), "unscaled-lambda": (0.0, 1000.0),
                "strong-kl": (-49.0, 82.0)}


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 64))

    def forward(self, x: torch.Tensor):
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        return self.decoder(z), z, mu, log_var


def inverse_multiquadric_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The port's kernel sum: C / (C + ||a_i - b_j||^2) over i != j."""
    c = 2 * LATENT * LATENT_VAR
    kernel = c / (c + torch.cdist(a, b).pow(2))
    return kernel.sum() - kernel.diagonal().sum()


def mmd_to_prior(z: torch.Tensor) -> torch.Tensor:
    """The port's MMD between a batch of z and as many fresh prior samples, with its
    n (n - 1) bias correction."""
    prior = torch.randn_like(z)
    n = len(z)
    return (inverse_multiquadric_sum(prior, prior) + inverse_multiquadric_sum(z, z)
            - 2 * inverse_multiquadric_sum(prior, z)) / (n * (n - 1))


def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (1 + log_var - mu ** 2 - log_var.exp())).sum(1).mean()


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    alpha, lam = ALPHA_LAMBDA[variant]
    weights = {"KLD": 1.0 - alpha, "MMD": alpha + lam - 1.0}
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("mu")
    with probe:
        for _ in range(STEPS):
            x = x_tr[next(order)]
            logits, z, mu, log_var = model(x)
            probe.observe(mu=mu)
            losses = {"Reconstruction_Loss": F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x),
                      "KLD": kl_divergence(mu, log_var),
                      "MMD": mmd_to_prior(z)}
            opt.zero_grad()
            probe.backward(losses, weights=weights)
            opt.step()
    return posterior_truth(model, x_tr, x_te)


def posterior_truth(model: VAE, x_tr: torch.Tensor, x_te: torch.Tensor) -> dict:
    """Active units, KL per latent dimension and reconstruction against the mean image, on
    the test split."""
    model.eval()
    with torch.no_grad():
        mu, log_var = model.encoder(x_te).chunk(2, dim=1)
        kl_per_dim = (-0.5 * (1 + log_var - mu ** 2 - log_var.exp())).mean(0)
        return {"active_units": int((mu.var(0) > 0.01).sum()),
                "kl_per_dim": float(kl_per_dim.mean()),
                "recon_mse": float((torch.sigmoid(model.decoder(mu)) - x_te).pow(2).mean()),
                "mean_image_mse": float((x_tr.mean(0) - x_te).pow(2).mean())}


FAMILY = Family(
    name="info-vae",
    source="Zhao, Song & Ermon 2019 (InfoVAE, AAAI) sec. 3 eq. 6-7, MMD-VAE alpha 0 lambda 1000 "
           "(scaled to 64 pixels); "
           "AntixK/PyTorch-VAE models/info_vae.py InfoVAE.loss_function, compute_mmd",
    train=train,
    variants=(
        Variant("published", True,
                "MMD-VAE with alpha 0, lambda 82 (KL weight 1, MMD weight 81): the aggregate "
                "posterior is matched to the prior and the latent units carry the digit",
                must_not=("representation-collapse", "inert-loss", "gradient-swamping",
                          "gradient-conflict", "static-loss-weights")),
        Variant("unscaled-lambda", False,
                "lambda 1000 unscaled on a 64-pixel likelihood: MMD weight 999 drowns the "
                "likelihood, no unit is active and the decoder outputs the mean digit",
                expected=(Expect("representation-collapse", "mu"),),
                allowed=(Expect("gradient-swamping", "Reconstruction_Loss"),
                         Expect("static-loss-weights", "Reconstruction_Loss")),
                must_not=("inert-loss",)),
        Variant("strong-kl", False,
                "alpha -49: KL weight 50 drives every posterior to the prior, no unit is active "
                "and the decoder outputs the mean digit",
                expected=(Expect("representation-collapse", "mu"),),
                allowed=(Expect("gradient-swamping", "Reconstruction_Loss"),
                         Expect("static-loss-weights", "Reconstruction_Loss")),
                must_not=("inert-loss",)),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("strong-kl", 0)),
)
