"""beta-TCVAE, after Chen, Li, Grosse & Duvenaud 2018 ("Isolating Sources of Disentanglement
in Variational Autoencoders", NeurIPS), sec. 2 eq. (2) and sec. 3 eq. (4), and the authors'
code rtqichen/beta-tcvae ``vae_quant.py`` (``VAE.elbo``, minibatch weighted sampling, the
default without ``--mss``).

Published setup: the ELBO's KL term averaged over the data splits into the index-code mutual
information I_q(z; n) = E[log q(z|n) - log q(z)], the total correlation
KL(q(z) || prod_j q(z_j)) = E[log q(z) - sum_j log q(z_j)] and the dimension-wise KL
sum_j KL(q(z_j) || p(z_j)); the beta-TCVAE objective (eq. 4) weights them alpha, beta,
gamma: E[log p(x|z)] - alpha MI - beta TC - gamma dimwise-KL, with alpha = gamma = 1 and beta
tuned (the paper's figures use beta up to 10; beta = 6 here). log q(z) and log q(z_j) are
estimated on the minibatch by minibatch weighted sampling (eq. S5): log q(z(n_i)) ~=
logsumexp_j log q(z(n_i)|n_j) - log(N M), with N the dataset size and M the batch size. The
code names the terms ``logpx``, ``information`` (logqz_condx - logqz), ``dependence``
(logqz - logqz_prodmarginals) and ``dimwise_kl`` (logqz_prodmarginals - logpz); Gaussian
posterior and prior, Bernoulli pixels, Adam lr 1e-3.

Here: scikit-learn's 8x8 digits in [0, 1] (pixel intensities read as Bernoulli means);
MLP encoder 64 -> 256 -> 256 -> (mu, logvar) of 10 latents, as the code's ``MLPEncoder``
(1200 units there, fewer here for CPU), MLP decoder 10 -> 256 -> 256 -> 64 logits; batch 128
(2048 there), N = 1347 training digits, 2000 steps (about 20 epochs; 22-27 CPU-seconds a run). The four terms are passed to the probe as
separate losses by the code's names: ``recon`` (-logpx, the code's ``logpx``), ``information``,
``dependence``, ``dimwise_kl``, per-sample means, with weights alpha, beta, gamma. Watched as
docs/probe.md says a VAE is watched: the posterior mean (the ``mu`` layer) as a latent.

Variants (truth by construction):
- ``beta-6``: healthy, as published (alpha = gamma = 1, beta = 6): the latent stays informative.
- ``kl-weight-100``: broken. alpha = gamma = 100 and beta = 600 (the whole KL weighted 100
  times over): every posterior is pressed onto the prior and the latent carries no
  information about the image, a posterior collapse; the decoder outputs about the mean image.
Measured on the test split, independently of gradprobe (seeds 0 and 1): active units (Burda
et al. 2016: dimensions whose posterior mean varies over the inputs with variance > 0.01),
the analytic KL(q(z|x) || p(z)) per image, the reconstruction MSE of the decoded posterior
mean against the MSE of the mean training image (0.0740):
  beta-6:         2 and 3 of 10 units active, KL 2.07 and 2.21 nats, MSE 0.0391 and 0.0337;
  kl-weight-100:  0 and 0 of 10 units active, KL 0.0006 and 0.0009 nats, MSE 0.0740 and 0.0741.
The healthy latent is informative (it halves the mean image's error) in few units: these 8x8
digits need about 2 nats (beta = 1, the plain ELBO, keeps 6 of 10 units active at the same KL,
seed 0, 800 steps), and the total-correlation penalty concentrates them in fewer dimensions;
a few active units at a comparable reconstruction is the method working, not a collapse.
Expected on ``kl-weight-100``: ``representation-collapse`` on ``mu`` (posterior collapse).
Allowed there: ``gradient-swamping`` on ``recon`` with ``static-loss-weights`` on ``recon``
(the fixed 100-fold KL weights drown the reconstruction while it is still at the mean image).
Must not (both): ``inert-loss``, ``non-finite``; on the healthy variant also
``representation-collapse``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, LATENTS, HIDDEN = 2000, 128, 1e-3, 10, 256
WEIGHTS = {  # (alpha on information, beta on dependence, gamma on dimwise_kl)
    "beta-6": (1.0, 6.0, 1.0),
    "kl-weight-100": (100.0, 600.0, 100.0),
}
LOG_2PI = math.log(2 * math.pi)


class TCVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN),
                                     nn.ReLU())
        self.mu = nn.Linear(HIDDEN, LATENTS)
        self.logvar = nn.Linear(HIDDEN, LATENTS)
        self.decoder = nn.Sequential(nn.Linear(LATENTS, HIDDEN), nn.ReLU(),
                                     nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 64))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def decomposed_losses(model: TCVAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                      dataset_size: int) -> dict[str, torch.Tensor]:
    """The code's ``VAE.elbo`` terms with minibatch weighted sampling, as per-sample means."""
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    logpx = -F.binary_cross_entropy_with_logits(model.decoder(z), x, reduction="none").sum(1)
    logpz = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    logqz_condx = gaussian_log_density(z, mu, logvar).sum(1)
    # _logqz[i, j, d] = log q(z_i[d] | x_j)
    _logqz = gaussian_log_density(z[:, None, :], mu[None], logvar[None])
    log_nm = math.log(len(x) * dataset_size)
    logqz_prodmarginals = (torch.logsumexp(_logqz, dim=1) - log_nm).sum(1)
    logqz = torch.logsumexp(_logqz.sum(2), dim=1) - log_nm
    return {"recon": -logpx.mean(), "information": (logqz_condx - logqz).mean(),
            "dependence": (logqz - logqz_prodmarginals).mean(),
            "dimwise_kl": (logqz_prodmarginals - logpz).mean()}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    alpha, beta, gamma = WEIGHTS[variant]
    model = TCVAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("mu", model.mu)
    order = batches(len(x_tr), BATCH, gen)
    with probe:
        for _ in range(STEPS):
            x = x_tr[next(order)]
            mu, logvar = model.encode(x)
            losses = decomposed_losses(model, x, mu, logvar, len(x_tr))
            probe.backward(losses, weights={"information": alpha, "dependence": beta,
                                            "dimwise_kl": gamma})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        mu, logvar = model.encode(x_te)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        mse = (torch.sigmoid(model.decoder(mu)) - x_te).pow(2).mean()
        mean_image_mse = (x_tr.mean(0) - x_te).pow(2).mean()
    return {"active_units": int((mu.var(0) > 0.01).sum()), "latent_dim": LATENTS,
            "test_kl": float(kl), "test_mse": float(mse), "mean_image_mse": float(mean_image_mse)}


_MUST_NOT = ("inert-loss", "non-finite")

FAMILY = Family(
    name="beta-tcvae",
    source="Chen et al. 2018, beta-TCVAE (NeurIPS, eq. 4, minibatch weighted sampling); "
           "rtqichen/beta-tcvae vae_quant.py",
    train=train,
    variants=(
        Variant("beta-6", True,
                "alpha = gamma = 1, beta = 6 on the total correlation, as published: the "
                "posterior mean stays informative",
                must_not=_MUST_NOT + ("representation-collapse",)),
        Variant("kl-weight-100", False,
                "every KL term weighted 100 times over (beta 600): the posterior collapses "
                "onto the prior, no active unit, reconstruction no better than the mean image",
                expected=(Expect("representation-collapse", "mu"),),
                allowed=(Expect("gradient-swamping", "recon"),
                         Expect("static-loss-weights", "recon")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("beta-6", 1), ("kl-weight-100", 1)),
)
