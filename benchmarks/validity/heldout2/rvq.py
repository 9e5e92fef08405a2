"""Residual vector quantisation (RVQ) in a small autoencoder, after Zeghidour et al. 2021
("SoundStream: An End-to-End Neural Audio Codec", IEEE/ACM TASLP, sec. 3.3 and Algorithm 1)
and its widely used PyTorch implementation lucidrains/vector-quantize-pytorch
(``vector_quantize_pytorch/residual_vq.py`` ``ResidualVQ``, "Follows Algorithm 1", and
``vector_quantize_pytorch/vector_quantize_pytorch.py`` ``EuclideanCodebook``, ``kmeans``,
``expire_codes_``).

Published setup: N_q quantisers in a row; quantiser i quantises the residual r_i left by the
ones before it (r_0 = the encoder output, r_{i+1} = r_i - Q_i(r_i)) and the decoder reads the
sum of the Q_i(r_i) (Algorithm 1). Each codebook is learnt by exponential moving averages as
in VQ-VAE-2 (EMA of the per-code counts and sums, Laplace smoothing eps 1e-5, code = sum /
count; the PyTorch implementation starts the counts at 0, no zero-debiasing); each codebook is
initialised by the k-means centroids of its residual on the first batch (lucidrains: 10 Lloyd
iterations from a random sample of the batch, ``kmeans_init=True``), and a code that no input
has been assigned to for several batches is replaced by an input vector drawn at random from
the current batch (lucidrains: a code whose EMA count falls below ``threshold_ema_dead_code =
2`` restarts at a random vector of the batch with count 2). Straight-through estimator per
quantiser (lucidrains: the residual chain is detached, so the encoder receives N_q times the
decoder's gradient). Losses: the reconstruction and the commitment loss ``commit_loss`` = sum
over quantisers of mse(r_i, sg(Q_i(r_i))) with lucidrains' ``commitment_weight = 1``
(``ResidualVQ`` returns one commitment loss per quantiser; the user sums them). EMA decay 0.99
(SoundStream follows VQ-VAE-2's EMA; the EnCodec-derived ``ResidualVectorQuantizer`` of
espnet2 ``gan_codec`` defaults to decay 0.99, k-means init and dead-code threshold 2;
lucidrains' default decay is 0.8). Without k-means the codebook starts at lucidrains'
``uniform_init`` (``kaiming_uniform_`` of the (1, K, D) table).

Here (CPU): scikit-learn's 8x8 digits; encoder conv 3x3 x32 -> conv 4x4 stride 2 x32 ->
conv 1x1 to D = 8 (a 4x4 grid of 8-dim vectors per image, 1,024 vectors a batch), N_q = 3
quantisers of K = 32 codes, decoder conv 3x3 x32 -> transposed conv 4x4 stride 2 x32 ->
conv 3x3 to 1 channel; batch 64, Adam lr 1e-3, 500 steps. Losses ``recon`` (mean squared
error) and ``commit_loss`` (weight 1). The codebooks are watched as docs/probe.md says a
prototype table is: each quantiser's input residual as a latent (``residual0``..``2``) and its
codebook (K x D, one row per code) as prototypes of it (``codebook0``..``2``). One
``observe(groups=...)`` cannot index three codebooks, so no groups are passed: the
assignment counts that the usage is read from are each residual row's nearest code, which is
the quantiser's own choice (Euclidean nearest code).

Variants (truth by construction):
- ``kmeans-expiry``: healthy, as published: k-means initialisation on the first batch and
  dead-code expiry (threshold 2).
- ``uniform-init``: broken: lucidrains' defaults (``kmeans_init=False``,
  ``threshold_ema_dead_code=0``): every codebook starts at the uniform init near the origin,
  without expiry. On the first step the codes nearest the residuals take them all; every
  other code is divided by an EMA count of ~eps and flung away (the EMA count starts at 0,
  no debiasing) to ~1e4; its EMA sum decays by 0.99 a step, so it is still ~1e2 away after
  500 steps and never wins again: a few codes of each stage stay in use.
- ``far-init``: broken. Every codebook starts at lucidrains' uniform init shifted by +3 in
  every dimension, far from every residual, without k-means and without expiry: on the first
  step each quantiser maps its residuals to the code nearest them; every code that got no
  vector is divided by an EMA count of ~eps, flung ~3e5 away and never wins again. Each
  stage's codebook collapses to one code.
Measured on the test split, independently of gradprobe (seeds 0 and 1): per stage the
distinct codes used of 32 and the perplexity (exp of the entropy of code usage), and the
reconstruction MSE (stages 0 / 1 / 2):
  kmeans-expiry: s0 32 / 32 / 32 codes, perplexity 23.3 / 28.0 / 26.7, MSE 0.0021;
                 s1 32 / 32 / 32 codes, perplexity 28.0 / 28.7 / 27.3, MSE 0.0027;
  uniform-init:  s0  4 /  5 /  5 codes, perplexity  3.8 /  4.6 /  4.9, MSE 0.0066;
                 s1  4 /  4 /  5 codes, perplexity  3.9 /  4.0 /  4.8, MSE 0.0075;
  far-init:      s0  1 /  1 /  1 codes, perplexity  1.0 /  1.0 /  1.0, MSE 0.077;
                 s1  1 /  1 /  1 codes, perplexity  1.0 /  1.0 /  1.0, MSE 0.075.
A codebook of 4-5 used codes of 32 (perplexity ~4, normalised entropy ~0.4) has lost 85% of
its codes: a codebook collapse in the VQ sense, though less complete than far-init's one code.
The encoder's output keeps its spread in every variant (total variance over the batch, median
of the last five of every 10th step over its peak: 0.72 / 0.88 healthy, 0.96 / 0.97
uniform-init, 0.76 / 0.85 far-init): what collapses is the codebooks' use, not the latent.
CPU ~9-13 s a run (one thread, shared machine).
Expected on ``uniform-init`` and ``far-init``: ``prototype-collapse`` on ``codebook0``,
``codebook1`` and ``codebook2`` (each codebook's assignments collapse to a few codes).
Must not (all):
``gradient-conflict``, ``inert-loss``, ``static-loss-weights``; on the healthy variant also
``prototype-collapse``, ``prototype-stale``, ``representation-collapse``.
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

STEPS, BATCH, LR = 500, 64, 1e-3
STAGES, CODES, DIM = 3, 32, 8
DECAY, EPS, KMEANS_ITERS, DEAD_BELOW = 0.99, 1e-5, 10, 2.0
FAR_SHIFT = 3.0
SPREAD_EVERY = 10


def kmeans(samples: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm from CODES random samples, as lucidrains' ``kmeans``: a cluster left
    empty keeps its previous mean. Returns the means and the last assignment counts."""
    means = samples[torch.randperm(len(samples))[:CODES]]
    for _ in range(iters):
        nearest = torch.cdist(samples, means).argmin(1)
        counts = torch.bincount(nearest, minlength=CODES).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, nearest, samples)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], means)
    return means, counts


class EMACodebook(nn.Module):
    """One quantiser: nearest code, EMA update of counts and sums without debiasing,
    optional k-means initialisation on the first batch and dead-code expiry."""

    def __init__(self, kmeans_init: bool, expire: bool):
        super().__init__()
        # lucidrains' uniform_init: kaiming_uniform_ of a (1, K, D) table, fan_in = K * D
        bound = math.sqrt(6.0 / (CODES * DIM))
        init = torch.empty(CODES, DIM).uniform_(-bound, bound)
        self.register_buffer("embed", init)
        self.register_buffer("embed_avg", init.clone())
        self.register_buffer("cluster_size", torch.zeros(CODES))
        self.needs_kmeans, self.expire = kmeans_init, expire

    def forward(self, residual: torch.Tensor):
        if self.training and self.needs_kmeans:
            with torch.no_grad():
                means, counts = kmeans(residual, KMEANS_ITERS)
                self.embed.copy_(means)
                self.embed_avg.copy_(means * counts[:, None])
                self.cluster_size.copy_(counts)
            self.needs_kmeans = False
        codes = torch.cdist(residual, self.embed).argmin(1)
        quantized = self.embed[codes]
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(codes, CODES).to(residual.dtype)
                self.cluster_size.lerp_(onehot.sum(0), 1 - DECAY)
                self.embed_avg.lerp_(onehot.t() @ residual, 1 - DECAY)
                n = self.cluster_size.sum()
                smoothed = (self.cluster_size + EPS) / (n + CODES * EPS) * n
                self.embed.copy_(self.embed_avg / smoothed[:, None])
                if self.expire:
                    self._expire(residual)
        commit = F.mse_loss(residual, quantized.detach())
        return residual + (quantized - residual).detach(), codes, commit

    def _expire(self, residual: torch.Tensor) -> None:
        """lucidrains' ``expire_codes_``: codes whose EMA count fell below the threshold
        restart at random vectors of the batch, with that count."""
        dead = self.cluster_size < DEAD_BELOW
        if dead.any():
            picks = residual[torch.randperm(len(residual))[:int(dead.sum())]]
            self.embed[dead] = picks
            self.embed_avg[dead] = picks * DEAD_BELOW
            self.cluster_size[dead] = DEAD_BELOW


class ResidualVQ(nn.Module):
    """Algorithm 1: each quantiser reads what the ones before it left (detached chain)."""

    def __init__(self, kmeans_init: bool, expire: bool):
        super().__init__()
        self.layers = nn.ModuleList(EMACodebook(kmeans_init, expire) for _ in range(STAGES))

    def forward(self, flat: torch.Tensor):
        residual, out = flat, 0.0
        residuals, codes, commits = [], [], []
        for layer in self.layers:
            residuals.append(residual)
            quantized, index, commit = layer(residual)
            residual = residual - quantized.detach()
            out = out + quantized
            codes.append(index)
            commits.append(commit)
        return out, residuals, codes, torch.stack(commits)


class RVQAutoencoder(nn.Module):
    def __init__(self, kmeans_init: bool, expire: bool):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 4, stride=2, padding=1),
            nn.ReLU(), nn.Conv2d(32, DIM, 1))
        self.rvq = ResidualVQ(kmeans_init, expire)
        self.decoder = nn.Sequential(
            nn.Conv2d(DIM, 32, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 3, padding=1))

    def forward(self, x: torch.Tensor):
        z = self.encoder(x.view(-1, 1, 8, 8)).permute(0, 2, 3, 1).reshape(-1, DIM)
        quantized, residuals, codes, commits = self.rvq(z)
        recon = self.decoder(quantized.view(-1, 4, 4, DIM).permute(0, 3, 1, 2)).view(-1, 64)
        return recon, residuals, codes, commits


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    published = variant == "kmeans-expiry"
    model = RVQAutoencoder(kmeans_init=published, expire=published)
    if variant == "far-init":
        with torch.no_grad():
            for layer in model.rvq.layers:
                layer.embed.add_(FAR_SHIFT)
                layer.embed_avg.copy_(layer.embed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    for i, layer in enumerate(model.rvq.layers):
        probe.watch_latent(f"residual{i}")
        probe.watch_prototypes(f"codebook{i}", lambda layer=layer: layer.embed,
                               latent=f"residual{i}")
    spread = []  # total variance of the encoder's output, every SPREAD_EVERY steps
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            x = x_tr[idx]
            recon, residuals, _, commits = model(x)
            if step % SPREAD_EVERY == 0:
                spread.append(float(residuals[0].detach().var(0).sum()))
            probe.observe(**{f"residual{i}": r for i, r in enumerate(residuals)})
            probe.backward({"recon": F.mse_loss(recon, x), "commit_loss": commits.sum()})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        recon, _, codes, _ = model(x_te)
    end_spread = float(torch.tensor(spread[-5:]).median())
    truth = {"test_mse": float(F.mse_loss(recon, x_te)), "codes": CODES,
             "encoder_variance_end_over_peak": end_spread / max(spread)}
    for i, c in enumerate(codes):
        truth[f"codes_used{i}"] = int(c.unique().numel())
        truth[f"perplexity{i}"] = perplexity(c, CODES)
    return truth


_MUST_NOT = ("gradient-conflict", "inert-loss", "static-loss-weights")
_CODEBOOKS = tuple(f"codebook{i}" for i in range(STAGES))

FAMILY = Family(
    name="residual-vq",
    source="Zeghidour et al. 2021 (SoundStream, sec. 3.3, Algorithm 1: residual VQ, k-means "
           "init, dead-code replacement, EMA codebooks); lucidrains/vector-quantize-pytorch "
           "residual_vq.py ResidualVQ (kmeans_init, threshold_ema_dead_code)",
    train=train,
    variants=(
        Variant("kmeans-expiry", True,
                "every codebook initialised by k-means on its first residuals, dead codes "
                "replaced by batch vectors: the codes of every stage stay in use",
                must_not=_MUST_NOT + ("prototype-collapse", "prototype-stale",
                                      "representation-collapse")),
        Variant("uniform-init", False,
                "lucidrains' defaults, no k-means and no dead-code expiry: the codes that got "
                "no vector on the first step are flung away, a few codes per stage stay in use",
                expected=tuple(Expect("prototype-collapse", name) for name in _CODEBOOKS),
                must_not=_MUST_NOT),
        Variant("far-init", False,
                "every codebook started 3 units from every residual, no k-means, no expiry: "
                "each stage's residuals go to a few codes",
                expected=tuple(Expect("prototype-collapse", name) for name in _CODEBOOKS),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("kmeans-expiry", 1), ("uniform-init", 1)),
)
