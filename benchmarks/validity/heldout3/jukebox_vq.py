"""A VQ-VAE bottleneck with random restarts of dead codes, after Dhariwal et al. 2020
("Jukebox: A Generative Model for Music", arXiv 2005.00341: the VQ-VAE with an EMA codebook
and "random restarts for embeddings" against codebook collapse, where a few codes take every
encoding; the paper's wording and section number are from memory, not re-read here: what is
ported is the code), the official code openai/jukebox ``jukebox/vqvae/bottleneck.py``
(``BottleneckBlock``) and ``jukebox/hparams.py`` (``l_mu = 0.99``, ``commit = 0.02``,
``revival_threshold = 1.0``), read with the repository tools.

Published bottleneck (``BottleneckBlock``): encoder outputs NCT flattened to (N*T, w); on
the first training forward the codebook k is set to random encoder outputs of the batch
(``init_k``, tiled with noise when the batch has fewer vectors than codes) with EMA sums
k_sum = k and counts k_elem = 1; nearest-code quantisation; ``update_k``: k_sum and k_elem
are EMAs (mu 0.99) of the per-code sums and counts of the batch, and a code whose k_elem is
below the threshold 1.0 restarts at a random encoder output of the batch, the others become
k_sum / k_elem (no smoothing); ``commit_loss = ||sg(x_d) - x||^2 / numel``;
straight-through; the codebook has no loss. The model's loss is
``recons_loss + commit * commit_loss`` (the spectral terms are for audio); Adam lr 3e-4.

Here: scikit-learn's 8x8 digits, read as sequences of T = 8 rows of 8 channels (NCT, as
Jukebox's 1-D convolutions read audio); encoder Conv1d 8 -> 32 (3), Conv1d 32 -> 32 (4,
stride 2), Conv1d 32 -> 16 (1), so w = 16 and T = 4 vectors per image; decoder the mirror
(ConvTranspose1d to T = 8); K = 64 codes; batch 64, Adam lr 1e-3 (in place of the source's
3e-4 over far more steps; not tried at 3e-4), 800 steps; ``recons_loss`` = MSE / var(x) (the
source's l2 loss divided by the data's bandwidth), ``commit_loss`` weight 0.02. Watched as
docs/probe.md says a prototype table is watched: the encoder output ``z_e`` as a latent, the
codebook k (K x w, a row per code) as prototypes ``codebook`` of ``z_e``, each vector's code
index observed as its group.

Variants (truth by construction):
- ``restarts``: healthy, the source's bottleneck (data init, EMA, restarts below 1.0).
- ``far-init-no-restarts``: broken: the threshold set to 0 (no restart) and the initial
  codebook (random encoder outputs, as ``init_k``) shifted by +4 in every dimension, far
  from all encoder outputs. On the first step the vectors go to the few codes nearest the
  data; those move to the data, while an unused code's k_sum and k_elem decay together, so
  it stays where it started and never wins: codebook collapse.
Measured on the test split (450 digits, 1800 vectors), independently of gradprobe (seeds 0
and 1): distinct codes used of 64, codebook perplexity (exp of the usage entropy), MSE:
  restarts:             63 and 62 codes used, perplexity 45.9 and 43.9, MSE 0.025 and 0.022;
  far-init-no-restarts:  2 and  3 codes used, perplexity  2.0 and  3.0, MSE 0.051 and 0.043.
About 8-12 CPU-seconds a run (800 steps, probe included).
Expected on ``far-init-no-restarts``: ``prototype-collapse`` on ``codebook`` (a few codes take
every vector). Must not (both): ``inert-loss`` (the commitment loss trains the encoder),
``static-loss-weights``, ``gradient-conflict`` (the commitment term pulls the encoder
towards its codes by design); on the healthy variant also ``prototype-collapse``,
``prototype-stale``, ``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split, perplexity
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 800, 64, 1e-3
CODES, WIDTH, MU, COMMIT = 64, 16, 0.99, 0.02
THRESHOLD = {"restarts": 1.0, "far-init-no-restarts": 0.0}
INIT_SHIFT = {"restarts": 0.0, "far-init-no-restarts": 4.0}


class BottleneckBlock(nn.Module):
    """Jukebox's bottleneck: codebook from encoder outputs, EMA updates, random restarts of
    codes whose EMA count is below ``threshold``."""

    def __init__(self, threshold: float, init_shift: float, gen: torch.Generator):
        super().__init__()
        self.threshold, self.init_shift, self.gen = threshold, init_shift, gen
        self.register_buffer("k", torch.zeros(CODES, WIDTH))
        self.register_buffer("k_sum", torch.zeros(CODES, WIDTH))
        self.register_buffer("k_elem", torch.ones(CODES))
        self.initialised = False

    def _random_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """K random encoder outputs of the batch (``_tile``: repeated with noise of std
        0.01 / sqrt(w) when the batch is smaller than the codebook)."""
        if len(x) < CODES:
            x = x.repeat((CODES + len(x) - 1) // len(x), 1)
            x = x + torch.randn(x.shape, generator=self.gen) * 0.01 / WIDTH ** 0.5
        return x[torch.randperm(len(x), generator=self.gen)[:CODES]]

    def _update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, CODES).to(x.dtype)
        restart = self._random_outputs(x)
        self.k_sum.mul_(MU).add_(onehot.t() @ x, alpha=1 - MU)
        self.k_elem.mul_(MU).add_(onehot.sum(0), alpha=1 - MU)
        usage = (self.k_elem >= self.threshold).to(x.dtype)[:, None]
        self.k.copy_(usage * self.k_sum / self.k_elem[:, None] + (1 - usage) * restart)

    def forward(self, x: torch.Tensor):
        if self.training and not self.initialised:
            with torch.no_grad():
                self.k.copy_(self._random_outputs(x) + self.init_shift)
                self.k_sum.copy_(self.k)
                self.initialised = True
        distances = (x.pow(2).sum(1, keepdim=True) - 2 * x @ self.k.t()
                     + self.k.pow(2).sum(1)[None, :])
        codes = distances.argmin(1)
        quantised = self.k[codes]
        if self.training:
            with torch.no_grad():
                self._update(x, codes)
        commit_loss = (quantised.detach() - x).pow(2).mean()
        return x + (quantised - x).detach(), codes, commit_loss


class VQVAE(nn.Module):
    def __init__(self, bottleneck: BottleneckBlock):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv1d(8, 32, 3, padding=1), nn.ReLU(),
            nn.Conv1d(32, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Conv1d(32, WIDTH, 1))
        self.decoder = nn.Sequential(
            nn.Conv1d(WIDTH, 32, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose1d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(32, 8, 3, padding=1))
        self.bottleneck = bottleneck

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 64) digits as NCT (8 channels, T = 8 rows) -> (n * 4, w), one row per time."""
        z = self.encoder(x.view(-1, 8, 8).transpose(1, 2))
        return z.transpose(1, 2).reshape(-1, WIDTH)

    def decode(self, flat: torch.Tensor) -> torch.Tensor:
        out = self.decoder(flat.view(-1, 4, WIDTH).transpose(1, 2))
        return out.transpose(1, 2).reshape(-1, 64)


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    variance = float(x_tr.var())
    model = VQVAE(BottleneckBlock(THRESHOLD[variant], INIT_SHIFT[variant], gen))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z_e")
    probe.watch_prototypes("codebook", lambda: model.bottleneck.k, latent="z_e")
    with probe:
        for _ in range(STEPS):
            x = x_tr[next(order)]
            z_e = model.encode(x)
            quantised, codes, commit_loss = model.bottleneck(z_e)
            probe.observe(z_e=z_e, groups=codes)
            recons_loss = (model.decode(quantised) - x).pow(2).mean() / variance
            probe.backward({"recons_loss": recons_loss, "commit_loss": commit_loss},
                           weights={"commit_loss": COMMIT})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        z_e = model.encode(x_te)
        quantised, codes, _ = model.bottleneck(z_e)
        mse = float((model.decode(quantised) - x_te).pow(2).mean())
    return {"codes_used": int(codes.unique().numel()), "codes": CODES,
            "perplexity": perplexity(codes, CODES), "test_mse": mse}


_MUST_NOT = ("inert-loss", "static-loss-weights", "gradient-conflict")

FAMILY = Family(
    name="jukebox-vq",
    source="Dhariwal et al. 2020 (Jukebox, random restarts of dead codes); openai/jukebox "
           "jukebox/vqvae/bottleneck.py BottleneckBlock",
    train=train,
    variants=(
        Variant("restarts", True,
                "the source's bottleneck: codebook from encoder outputs, EMA updates, codes "
                "whose EMA count falls below 1 restarted at encoder outputs",
                must_not=_MUST_NOT + ("prototype-collapse", "prototype-stale",
                                      "representation-collapse")),
        Variant("far-init-no-restarts", False,
                "no restarts and a codebook started 4 units from every encoder output: the "
                "few codes nearest the data take every vector, the others never move",
                expected=(Expect("prototype-collapse", "codebook"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("restarts", 1), ("far-init-no-restarts", 1)),
)
