"""A VAE with an autoregressive decoder trained with the free-bits objective, after Kingma,
Salimans, Jozefowicz, Chen, Sutskever & Welling 2016 ("Improved Variational Inference with
Inverse Autoregressive Flow", NeurIPS), appendix C ("free bits"): the latent dimensions are
divided into K groups and the KL term is replaced by sum_j max(lambda, E_x~M[KL(q(z_j|x) ||
p(z_j))]), the KL of each group averaged over the mini-batch M, so that a group's first
lambda nats cost nothing and the encoder is not pushed to switch it off. Official code
openai/iaf ``tf_train.py``: ``IAFLayer.down`` averages the KL of each latent channel over the
batch (``kl_ave``), takes ``tf.maximum(kl_ave, hps.kl_min)`` and sums (``kl_obj``), with
``kl_min = 0.25`` nats per channel by default (``get_default_hparams``); with ``kl_min = 0``
``kl_obj`` is the plain KL. The paper's motivation is the one built here: a decoder strong
enough to model the data alone lets plain training switch the latent off (posterior
collapse; Bowman et al. 2016, Chen et al. 2017).

Here: scikit-learn's 8x8 digits binarised at 0.5, a diagonal Gaussian posterior with d = 16
latent dimensions, each its own group (the code's per-channel groups), lambda = 0.25 nats as
in the code; the encoder an MLP 64-256-2x16. The decoder is strong on two counts: it is
autoregressive over the 64 pixels in raster order (MADE, Germain et al. 2015: masked
64-256-256-64 with direct masked connections, each pixel's Bernoulli logit conditioned on the
pixels before it; the paper's IAF-VAE decodes with a ResNet/PixelCNN-like stack) and it is
given the previous input, the frame before x: x with 5% of its pixels flipped at random,
through unmasked linear maps (as a sequence model's decoder sees x_{t-1}). z and the
previous frame enter the hidden layer and the output biases. With the autoregressive part
alone the plain KL kept 3.1-3.6 nats and all 16 units active (hidden 256 or 512, 1200-3000
steps, seed 0): the collapse was not solid, so the decoder was made stronger, not the KL
weight larger. Adam lr 1e-3 (Adamax 0.01 in the code), batch 64, 1500 steps. Losses
``recon`` (-log p(x | x_prev, z) per image, the code's ``log_pxz`` negated) and ``kl_obj``
(the code's name for the free-bits KL, the plain KL when ``kl_min`` is 0). Watched as
docs/probe.md says a VAE is: the posterior mean ``mu`` as the latent.

Variants (truth by construction):
- ``free-bits``: healthy, as published (lambda = 0.25 nats per dimension).
- ``plain-kl``: broken. ``kl_min = 0``: the plain KL. The decoder predicts each pixel from
  the pixels before it and from the previous frame, so no nat of z is worth its KL: the
  posterior collapses to the prior and the latent carries nothing of x.
Measured on the test split without gradprobe (seeds 0 and 1): active units (Burda et al.
2016: Var_x E_q[z_j] > 0.01), the mutual information I(x; z) under q (the aggregate-posterior
estimate of He et al. 2019, nats), the KL per image, the dimensions whose test KL exceeds
0.25 nats, the accuracy of a logistic-regression probe from standardised mu to the digit
label (chance 0.1) and the negative ELBO in nats:
  free-bits: active 16 / 16 of 16, MI 3.24 / 3.11, KL 3.64 / 3.69 (2 / 3 dimensions above
             0.25), probe 0.39 / 0.42, -ELBO 7.59 / 7.93;
  plain-kl:  active  0 /  0 of 16, MI 0.016 / 0.035, KL 0.014 / 0.022, probe 0.44 / 0.42,
             -ELBO 5.61 / 6.03.
What free bits keep is the latent in use (16 active units, 3.1-3.2 nats of information
against none). The label probe does not tell the variants apart: the healthy z carries what
the decoder lacks (where the previous frame's flips are, the pixels it cannot predict), not
the class, and the collapsed mu, standardised, keeps a deterministic trace of x below 0.01
variance. The collapsed model has the better bound (-ELBO lower by 1.9-2.0 nats) but the
worse reconstruction (-log p(x | x_prev, z) 5.59 / 6.01 against 3.95 / 4.24): the plain KL
bought its 3.6 nats of KL with 1.6-1.8 nats of reconstruction, and the harm is the unused
latent, which is what the free bits are published to prevent, not the likelihood.
Expected on ``plain-kl``: ``representation-collapse`` on ``mu`` (posterior collapse: no
active unit). Allowed on ``plain-kl``: ``gradient-conflict`` on ``recon|kl_obj`` (the KL
pulls mu to the prior against the reconstruction, and won: the quantity it trades against,
the latent in use, failed). Must not (both): ``static-loss-weights``, ``gradient-swamping``
(the KL falls to ~0.01 nats, satisfied); on the healthy variant also ``gradient-conflict``
(the KL against the reconstruction is the trade-off the objective makes, at an equilibrium
that keeps the latent in use) and ``representation-collapse``. Note for the reader: under
free bits most dimensions sit at or below lambda, where ``kl_obj`` sends no gradient
(max(lambda, KL_j) is flat there) by design.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split, linear_probe_accuracy
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, LATENT, HIDDEN, PIXELS = 1500, 64, 1e-3, 16, 256, 64
FLIP = 0.05  # share of the pixels the previous frame has flipped
KL_MIN = {"free-bits": 0.25, "plain-kl": 0.0}  # openai/iaf hps.kl_min, nats per group


class MaskedLinear(nn.Linear):
    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class AutoregressiveVAE(nn.Module):
    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.ReLU())
        self.mu = nn.Linear(HIDDEN, LATENT)
        self.logvar = nn.Linear(HIDDEN, LATENT)
        pixel_order = torch.arange(1, PIXELS + 1)
        hidden_order = torch.randint(1, PIXELS, (HIDDEN,), generator=gen)  # MADE's degrees
        self.into_hidden = MaskedLinear((hidden_order[:, None] >= pixel_order[None, :]).float())
        self.hidden = MaskedLinear((hidden_order[:, None] >= hidden_order[None, :]).float())
        self.out_of_hidden = MaskedLinear((pixel_order[:, None] > hidden_order[None, :]).float())
        self.direct = MaskedLinear((pixel_order[:, None] > pixel_order[None, :]).float())
        self.previous_to_hidden = nn.Linear(PIXELS, HIDDEN)
        self.previous_to_pixels = nn.Linear(PIXELS, PIXELS)
        self.z_to_hidden = nn.Linear(LATENT, HIDDEN)
        self.z_to_pixels = nn.Linear(LATENT, PIXELS)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def decode_logits(self, x: torch.Tensor, previous: torch.Tensor,
                      z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of each pixel given the pixels before it (teacher forcing), the
        previous input and z."""
        h = F.relu(self.into_hidden(x) + self.previous_to_hidden(previous) + self.z_to_hidden(z))
        h = F.relu(self.hidden(h))
        return (self.out_of_hidden(h) + self.direct(x) + self.previous_to_pixels(previous)
                + self.z_to_pixels(z))


def previous_input(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The frame before x: x with each pixel flipped with probability FLIP."""
    return torch.where(torch.rand(x.shape, generator=gen) < FLIP, 1 - x, x)


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per row and dimension, in nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, gen: torch.Generator) -> float:
    """I(x; z) under q: E[log q(z|x)] - E[log q(z)], q(z) the mixture of the posteriors of the
    given inputs (He et al. 2019, ``calc_mi``), one sample z per input."""
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen)
    log_density = -0.5 * ((z[:, None] - mu[None]) ** 2 / logvar.exp()[None]
                          + logvar[None] + math.log(2 * math.pi)).sum(2)  # (sample i, post. j)
    own = log_density.diagonal()
    aggregate = torch.logsumexp(log_density, 1) - math.log(len(mu))
    return float((own - aggregate).mean())


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    x_tr, x_te = (x_tr > 0.5).float(), (x_te > 0.5).float()
    model = AutoregressiveVAE(gen)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("mu", model.mu)
    with probe:
        for _ in range(STEPS):
            x = x_tr[next(order)]
            mu, logvar = model.encode(x)
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen)
            logits = model.decode_logits(x, previous_input(x, gen), z)
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1).mean()
            kl_groups = kl_per_dimension(mu, logvar).mean(0)  # openai/iaf's kl_ave
            kl_obj = kl_groups.clamp(min=KL_MIN[variant]).sum()
            probe.backward({"recon": recon, "kl_obj": kl_obj})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        mu_tr, _ = model.encode(x_tr)
        mu, logvar = model.encode(x_te)
        kl_dims = kl_per_dimension(mu, logvar)
        kl = kl_dims.sum(1)
        logits = model.decode_logits(x_te, previous_input(x_te, gen), mu)
        recon = F.binary_cross_entropy_with_logits(logits, x_te, reduction="none").sum(1)
        mi = mutual_information(mu, logvar, gen)
    active = int((mu.var(0) > 0.01).sum())
    return {"active_units": active, "latent_dim": LATENT, "mutual_information": mi,
            "probe_acc": linear_probe_accuracy(mu_tr.numpy(), y_tr.numpy(), mu.numpy(),
                                               y_te.numpy()),
            "kl": float(kl.mean()), "neg_elbo": float((recon + kl).mean()),
            "dims_above_free_bits": int((kl_dims.mean(0) > KL_MIN["free-bits"]).sum())}


_MUST_NOT = ("static-loss-weights", "gradient-swamping")

FAMILY = Family(
    name="free-bits-vae",
    source="Kingma et al. 2016 (inverse autoregressive flow, NeurIPS) appendix C, free bits; "
           "openai/iaf tf_train.py IAFLayer.down kl_min",
    train=train,
    variants=(
        Variant("free-bits", True,
                "KL per latent dimension floored at 0.25 nats (free bits), as published: the "
                "autoregressive decoder is made to use the latent",
                must_not=_MUST_NOT + ("gradient-conflict", "representation-collapse")),
        Variant("plain-kl", False,
                "plain KL with a decoder autoregressive over the pixels and given the previous "
                "frame: the posterior collapses to the prior, no active unit",
                expected=(Expect("representation-collapse", "mu"),),
                allowed=(Expect("gradient-conflict", "recon|kl_obj"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("free-bits", 0), ("plain-kl", 0)),
)
