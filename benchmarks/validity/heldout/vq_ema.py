"""VQ-VAE with exponential-moving-average codebook updates, after Razavi, van den Oord &
Vinyals 2019 ("Generating Diverse High-Fidelity Images with VQ-VAE-2", NeurIPS, sec. 3.1 and
appendix: codebook learnt by EMA, decay gamma = 0.99, commitment beta = 0.25), the
published implementation google-deepmind/sonnet ``sonnet/src/nets/vqvae.py``
(``VectorQuantizerEMA``), as ported to PyTorch by zalandoresearch/pytorch-vq-vae
(``VectorQuantizerEMA``, copied into many repositories).

Published setup: nearest-code assignment of each ``embedding_dim`` vector of the encoder
output; EMA (decay 0.99) of the per-code counts N_i and of the summed assigned encoder outputs
m_i, Laplace smoothing of the counts with epsilon 1e-5, codes e_i = m_i / N_i; in the PyTorch
port N_i starts at 0 and m_i at a random codebook, without sonnet's zero-debiasing (so a code
that gets no vector on the first step is divided by N_i ~ epsilon and flung far away); the
codebook is not trained by gradient; the only quantiser loss is the commitment
beta * ||z_e - sg(e)||^2 (beta 0.25); straight-through estimator; reconstruction error
mean((x_hat - x)^2) / var(x) (sonnet's VQ-VAE example); Adam. Codebook initialised by
``VarianceScaling(distribution='uniform')``.

Here: scikit-learn's 8x8 digits; encoder conv 3x3 x32 -> conv 4x4 stride 2 x32 -> conv 1x1
to D = 16 (a 4x4 grid of 16-dim vectors per image), K = 64 codes, decoder conv 3x3 x32 ->
transposed conv 4x4 stride 2 x32 -> conv 3x3 to 1 channel; batch 64, Adam lr 1e-3, 600
steps. Losses ``recon`` and ``commit`` (weight beta = 0.25). Watched as docs/probe.md says a
prototype table is watched: the encoder output ``z_e`` as a latent, the codebook
(K x D, one row per code) as prototypes of ``z_e``, with each vector's code index observed
as its group.

Variants (truth by construction):
- ``data-init-reset``: healthy. The codebook starts from K distinct encoder outputs of the
  training set, and a code whose EMA count falls below 1 restarts at a random encoder output
  of the batch: the two fixes of later VQ-VAE work (Jukebox, Dhariwal et al. 2020,
  openai/jukebox ``vqvae/bottleneck.py``, threshold 1). Without the reset, data
  initialisation alone is not enough here: the encoder's outputs grow from std 0.09 away
  from the codes within 10 steps, and 18-24 of 64 codes end in use (measured with sonnet's
  debiased EMA, seed 1).
- ``far-init``: broken. The codebook starts at the published initialiser shifted by +4 in
  every dimension, far from every encoder output, with no dead-code reset: on the first
  step the vectors map to the few codes nearest the data; every code that got no vector is
  divided by an EMA count of ~epsilon, flung ~1e5 away and never wins again. Codebook
  collapse: a few codes are ever used. (With sonnet's debiased EMA, the unused codes sit at
  the origin instead and are recruited one by one: 4 and 26 codes in use on seeds 1 and 3,
  not a clean collapse.)
Measured on the test split, independently of gradprobe (seeds 1 and 3): distinct codes used,
codebook perplexity (exp of the entropy of code usage), reconstruction MSE:
  data-init-reset: 64 and 64 of 64 codes used, perplexity 45.4 and 46.3, MSE 0.0069 and 0.0060;
  far-init:         8 and  5 of 64 codes used, perplexity  7.1 and  4.7, MSE 0.0257 and 0.0309.
Expected on ``far-init``: ``prototype-collapse`` on ``codebook`` (the codes in use collapse
to a few). Must not (both): ``gradient-conflict`` (the commitment term starts near 0 and
rises to its equilibrium by design), ``inert-loss``, ``static-loss-weights``; on the healthy
variant also ``prototype-collapse``, ``prototype-stale``, ``representation-collapse``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split, perplexity
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 600, 64, 1e-3
CODES, DIM, DECAY, BETA, EPS = 64, 16, 0.99, 0.25, 1e-5
FAR_SHIFT = 4.0
RESET_BELOW = 1.0  # Jukebox's threshold on a code's EMA count


class VectorQuantizerEMA(nn.Module):
    """The EMA quantiser as the widely copied PyTorch port computes it: EMA count started at
    0 and EMA sums at the codebook, no zero-debiasing."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.register_buffer("embeddings", init.clone())  # (K, D): one row per code
        self.register_buffer("ema_count", torch.zeros(CODES))
        self.register_buffer("ema_sum", init.clone())
        self.reset_dead: torch.Generator | None = None  # Jukebox's dead-code reset when set

    def forward(self, flat: torch.Tensor):
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embeddings.t()
                     + self.embeddings.pow(2).sum(1)[None, :])
        codes = distances.argmin(1)
        quantized = self.embeddings[codes]
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(codes, CODES).to(flat.dtype)
                count = self.ema_count * DECAY + (1 - DECAY) * onehot.sum(0)
                n = count.sum()
                self.ema_count.copy_((count + EPS) / (n + CODES * EPS) * n)  # Laplace smoothing
                self.ema_sum.mul_(DECAY).add_(onehot.t() @ flat, alpha=1 - DECAY)
                self.embeddings.copy_(self.ema_sum / self.ema_count[:, None])
                if self.reset_dead is not None:
                    self._reset(flat, self.ema_count < RESET_BELOW)
        commit = (flat - quantized.detach()).pow(2).mean()
        return flat + (quantized - flat).detach(), codes, commit

    def _reset(self, flat: torch.Tensor, dead: torch.Tensor) -> None:
        """Jukebox (Dhariwal et al. 2020, vqvae/bottleneck.py): a code whose EMA count fell
        below 1 restarts at a random encoder output of the batch, with an EMA count of 1."""
        picks = flat[torch.randint(len(flat), (int(dead.sum()),), generator=self.reset_dead)]
        self.embeddings[dead] = picks
        self.ema_sum[dead] = picks
        self.ema_count[dead] = 1.0


class VQVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 4, stride=2, padding=1),
            nn.ReLU(), nn.Conv2d(32, DIM, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(DIM, 32, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 3, padding=1))
        bound = math.sqrt(3.0 / DIM)  # VarianceScaling(uniform) of sonnet's [D, K] embeddings
        self.vq = VectorQuantizerEMA(torch.empty(CODES, DIM).uniform_(-bound, bound))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's vectors, one row per image position: (n * 16, D)."""
        z = self.encoder(x.view(-1, 1, 8, 8))
        return z.permute(0, 2, 3, 1).reshape(-1, DIM)

    def decode(self, flat: torch.Tensor) -> torch.Tensor:
        z = flat.view(-1, 4, 4, DIM).permute(0, 3, 1, 2)
        return self.decoder(z).view(-1, 64)


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    variance = float(x_tr.var())
    model = VQVAE()
    order = batches(len(x_tr), BATCH, gen)
    first = next(order)
    with torch.no_grad():
        if variant == "data-init-reset":
            distinct = model.encode(x_tr).unique(dim=0)
            pick = torch.randperm(len(distinct), generator=gen)[:CODES]
            model.vq.embeddings.copy_(distinct[pick])
            model.vq.reset_dead = gen
        elif variant == "far-init":
            model.vq.embeddings.add_(FAR_SHIFT)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z_e")
    probe.watch_prototypes("codebook", lambda: model.vq.embeddings, latent="z_e")
    with probe:
        idx = first
        for _ in range(STEPS):
            x = x_tr[idx]
            z_e = model.encode(x)
            quantized, codes, commit = model.vq(z_e)
            probe.observe(z_e=z_e, groups=codes)
            recon = model.decode(quantized)
            losses = {"recon": (recon - x).pow(2).mean() / variance, "commit": commit}
            probe.backward(losses, weights={"commit": BETA})
            opt.step()
            opt.zero_grad()
            idx = next(order)
    model.eval()
    with torch.no_grad():
        z_e = model.encode(x_te)
        quantized, codes, _ = model.vq(z_e)
        mse = float((model.decode(quantized) - x_te).pow(2).mean())
    return {"codes_used": int(codes.unique().numel()), "codes": CODES,
            "perplexity": perplexity(codes, CODES), "test_mse": mse}


_MUST_NOT = ("gradient-conflict", "inert-loss", "static-loss-weights")

FAMILY = Family(
    name="vq-ema",
    source="Razavi et al. 2019 (VQ-VAE-2, EMA codebook); google-deepmind/sonnet "
           "sonnet/src/nets/vqvae.py VectorQuantizerEMA, as ported by zalandoresearch/pytorch-vq-vae",
    train=train,
    variants=(
        Variant("data-init-reset", True,
                "codebook started from encoder outputs, dead codes restarted at encoder outputs: "
                "every code stays in use",
                must_not=_MUST_NOT + ("prototype-collapse", "prototype-stale",
                                      "representation-collapse")),
        Variant("far-init", False,
                "codebook started 4 units from every encoder output, no dead-code reset: "
                "a few codes take every vector",
                expected=(Expect("prototype-collapse", "codebook"),), must_not=_MUST_NOT),
    ),
    seeds=(1, 3),
    quick=(("data-init-reset", 1), ("far-init", 1)),
)
