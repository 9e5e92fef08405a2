"""Vector-quantised VAE, after van den Oord, Vinyals & Kavukcuoglu 2017 ("Neural Discrete
Representation Learning", NeurIPS), eq. 3:

    L = log p(x | z_q(x)) + ||sg[z_e(x)] - e||^2 + beta ||z_e(x) - sg[e]||^2,  beta = 0.25,

with the straight-through estimator (the decoder's gradient copied from z_q to z_e) and the
nearest codebook vector as z_q. The three terms are the losses ``recon`` (mean squared error,
the Gaussian log-likelihood up to a constant), ``codebook`` and ``commit`` (weight 0.25);
only ``codebook`` trains the codebook.

Published setup: a convolutional encoder/decoder on 32x32 images with a grid of latents,
K = 512 codes, Adam lr 2e-4, batch 128. Here: scikit-learn's 8x8 digits, an MLP encoder
64->128->4x16 (four latent vectors of dimension 16 per image, the grid's analogue), an MLP
decoder 4x16->128->64, K = 128 codes, Adam lr 1e-3, batch 128, 800 steps. The codebook
is watched as docs/probe.md describes: ``watch_prototypes("codebook", ..., latent="z_e")``
with the encoder outputs observed as ``z_e`` and the code assignments as ``groups``.

Variants (truth by construction):
- ``data-init``: healthy. The codebook starts from 128 encoder outputs of the first batch
  (data initialisation, the usual cure for dead codes): most codes stay in use.
- ``dead-codebook``: the codebook drawn from N(0, 1) with no reset, far from the encoder's
  outputs (norm ~4 against ~0.5): only the few codes nearest to the encoder's outputs are
  ever assigned, the codebook loss moves only those, and the rest never move again.
Measured without gradprobe on the test split: the number of codes used and the perplexity of
their usage (exp of its entropy), and the reconstruction error. Expected on the dead
codebook: ``prototype-collapse`` on ``codebook``. The healthy run must stay quiet (issue 21,
row "VQ-VAE": today three false warnings, ``gradient-conflict`` recon/commit, ``inert-loss``
on the codebook loss, ``static-loss-weights``).

Measured (seeds 0 / 1, one thread): ``data-init`` 116 / 122 of 128 codes used, perplexity
92 / 96, reconstruction MSE 0.021 / 0.021; ``dead-codebook`` 2 / 3 codes used, perplexity
1.3 / 2.8, reconstruction MSE 0.067 / 0.074.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import batches, digits_split
from .harness import Expect, Family, Variant

STEPS, BATCH, LR, BETA = 800, 128, 1e-3, 0.25
CODES, DIM, PER_IMAGE = 128, 16, 4


class VQVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, PER_IMAGE * DIM))
        self.decoder = nn.Sequential(nn.Linear(PER_IMAGE * DIM, 128), nn.ReLU(), nn.Linear(128, 64))
        self.codebook = nn.Embedding(CODES, DIM)
        nn.init.normal_(self.codebook.weight)

    def encode(self, x):
        """The encoder's outputs, one row per latent vector (batch x PER_IMAGE rows)."""
        return self.encoder(x).view(-1, DIM)

    def quantise(self, z_e):
        codes = torch.cdist(z_e, self.codebook.weight).argmin(1)
        return self.codebook(codes), codes

    def forward(self, x):
        z_e = self.encode(x)
        z_q, codes = self.quantise(z_e)
        straight_through = z_e + (z_q - z_e).detach()
        recon = self.decoder(straight_through.view(len(x), -1))
        return recon, z_e, z_q, codes


def usage_truth(model: VQVAE, x: torch.Tensor) -> dict:
    with torch.no_grad():
        recon, _, _, codes = model(x)
    counts = torch.bincount(codes, minlength=CODES).double()
    p = counts[counts > 0] / counts.sum()
    return {"codes_used": int((counts > 0).sum()), "perplexity": float(torch.exp(-(p * p.log()).sum())),
            "recon_mse": float(F.mse_loss(recon, x))}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    model = VQVAE()
    order = batches(len(x_tr), BATCH, gen)
    if variant == "data-init":
        with torch.no_grad():
            z_e = model.encode(x_tr[next(order)])
            model.codebook.weight.copy_(z_e[torch.randperm(len(z_e), generator=gen)[:CODES]])
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z_e")
    probe.watch_prototypes("codebook", model.codebook.weight, latent="z_e")
    with probe:
        for _, idx in zip(range(STEPS), order):
            x = x_tr[idx]
            recon, z_e, z_q, codes = model(x)
            probe.observe(z_e=z_e, groups=codes)
            losses = {"recon": F.mse_loss(recon, x), "codebook": F.mse_loss(z_q, z_e.detach()),
                      "commit": F.mse_loss(z_e, z_q.detach())}
            probe.backward(losses, weights={"commit": BETA})
            opt.step()
            opt.zero_grad()
    return usage_truth(model, x_te)


FAMILY = Family(
    name="vqvae",
    source="van den Oord, Vinyals & Kavukcuoglu 2017 (NeurIPS), eq. 3, beta 0.25",
    train=train,
    variants=(
        Variant("data-init", True, "codebook started from encoder outputs: most codes stay in use",
                must_not=("prototype-collapse", "gradient-conflict", "inert-loss",
                          "static-loss-weights")),
        Variant("dead-codebook", False,
                "codebook drawn N(0, 1), far from the encoder outputs, no reset: few codes are "
                "ever assigned, the rest never move",
                expected=(Expect("prototype-collapse", "codebook"),),
                must_not=("gradient-conflict", "inert-loss")),
    ),
    quick=(("dead-codebook", 1),),
)
