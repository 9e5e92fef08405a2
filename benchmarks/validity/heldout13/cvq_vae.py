"""CVQ-VAE, the online clustered codebook of Zheng & Vedaldi 2023 ("Online Clustered
Codebook", ICCV; arXiv 2307.15139): a VQ-VAE (van den Oord et al. 2017: nearest code z_q of
the encoder output z_e, straight-through gradient, loss = reconstruction +
||sg[z_e] - e||^2 (codebook) + beta ||z_e - sg[e]||^2 (commitment), beta 0.25) whose
under-used ("dead") codes are re-initialised online at anchors drawn from the current
encoder features (sec. 3; the rule below as the official code writes it): an exponential
moving average N_k of each code's usage over the batches (decay gamma 0.99) gives a
per-code factor alpha_k = exp(-N_k K 10 / (1 - gamma) - epsilon), and each code moves to
(1 - alpha_k) e_k + alpha_k e_hat_k, e_hat_k the anchor, so that a code in use keeps its
place (alpha ~ 0) and a dead one jumps to the features (alpha ~ 1). The paper's optional
contrastive term is left out (off by default in the code).

Official code, read with the repository tools: lyndonzheng/CVQ-VAE ``quantise.py``
``VectorQuantiser.forward`` (``distance='cos'``: the nearest code by the cosine of the
detached, normalised features to the normalised codes; ``loss = beta * mean((z_q.detach() -
z)^2) + mean((z_q - z.detach())^2)``; ``embed_prob`` the usage EMA, decay 0.99, from zeros;
``decay = exp(-(embed_prob * num_embed * 10) / (1 - 0.99) - 1e-3)``; anchor ``'closest'``:
for each code the batch feature of largest cosine, ``d.sort(dim=0)``; the codebook
initialised ``uniform_(-1/num_embed, 1/num_embed)``) and ``main.py`` (defaults: distance
``cos``, anchor ``closest``, commitment_cost 0.25, Adam lr 3e-4, batch 1024, K 512, dim 64;
loss ``F.mse_loss(x, images) / data_variance + loss_vq``, images normalised to [-1, 1],
``data_variance`` the variance of the 0-1 pixels).

Here (CPU budget): scikit-learn's 8x8 digits (common.digits_split, mapped to [-1, 1] as the
source's Normalize(0.5, 0.5)); a convolutional encoder 1 -> 32 (3x3) -> 32 (4x4, stride 2)
-> 16 (1x1), a 4x4 grid of 16-dim latents per image, and its mirror as decoder (the source's
residual stacks left out); K = 64 codes of dim 16; batch 64 images (1,024 latent vectors, the
source's batch of vectors), Adam lr 1e-3 (in place of 3e-4 over far more steps; not tried at
3e-4), 800 steps. The source's combined ``loss_vq`` is handed to the probe as its two terms:
``recons_loss`` (first), ``codebook_loss`` (weight 1: trains the codebook only) and
``commitment_loss`` (weight beta 0.25: trains the encoder). Watched as a user of a codebook
watches it (docs/quickstart.md): the encoder outputs ``z_e`` as a latent, the codebook (K x
16, a row per code) as prototypes ``codebook`` of ``z_e``, each vector's code observed as its
group. The anchor update runs inside the quantiser's training forward, as in the source.

Variants (truth by construction):
- ``closest-anchors``: healthy, the source's defaults (cosine lookup, 'closest' anchors, the
  small uniform initialisation): every code that the batches leave unused is moved to the
  feature nearest it, so the codebook stays on the features and most codes are in use.
- ``no-anchors-far-init``: broken. The anchor re-initialisation off (a plain VQ-VAE
  quantiser) and the codebook initialised far from the encoder outputs: every row shifted by
  +1 in every dimension (the source's uniform(-1/K, 1/K) around (1, ..., 1) instead of 0), so
  that all 64 codes start pointing almost along one direction (pairwise cosine above 0.99).
  The few codes first chosen are pulled by the codebook loss towards the features and, once
  turned towards them, win every later lookup; the commitment term pulls the features onto
  them; the other codes are never chosen, get no gradient and never move again (apart from
  Adam's momentum of a first step): dead codes, which the anchors exist to revive.
Measured on the test split (450 digits, 7,200 vectors), without gradprobe, seeds 0 / 1: codes
used of 64, codebook perplexity (exp of the usage entropy, as the source logs it), test
reconstruction MSE (on [-1, 1] pixels):
  closest-anchors:      63 / 59 codes used, perplexity 40.6 / 27.2, MSE 0.038 / 0.045;
  no-anchors-far-init:  16 / 16 codes used, perplexity  8.5 /  5.8, MSE 0.063 / 0.082.
The usage that gradprobe counts is the Euclidean nearest row (docs/findings.md), not the
cosine argmax of the lookup; measured that way too: 54 / 58 codes, perplexity 28.1 / 26.7
(healthy), 20 / 24 codes, perplexity 9.1 / 6.9 (broken). Reference, unprobed and not a
variant (``no-anchors``: anchors off, the published initialisation), seeds 0 / 1: 38 / 38
codes used, perplexity 24.4 / 26.2, MSE 0.044 / 0.047, between the two: the anchors' own
gain over a plain quantiser.
Most of the broken run's codes are dead (48 of 64 unused on both seeds), reconstruction 1.6 /
1.8 times worse: the failure the paper's anchors address.

Alarms. Expected on ``no-anchors-far-init``: ``prototype-collapse`` on ``codebook`` (a
quarter of the codes take every vector, usage perplexity 6-9 of 64). Allowed there:
``prototype-stale`` on ``codebook`` (48 dead rows never move while the features do: true,
although the moving quarter carries the table's drift) and ``representation-collapse`` on
``z_e`` (the commitment term pulls the features onto 16 points: incidental to the codebook's
collapse). Must not (both): ``inert-loss`` (the codebook loss trains only the codebook by
design; the commitment loss trains the encoder), ``gradient-conflict`` (the commitment term
pulls the encoder towards its codes by design), ``static-loss-weights``, ``non-finite``; on
the healthy variant also ``prototype-collapse``, ``prototype-stale``,
``representation-collapse`` and ``gradient-swamping`` (published weights, usage held).

CPU: about 7.3-11 seconds a run (800 steps, probe included, one thread).
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
CODES, WIDTH, BETA, DECAY = 64, 16, 0.25, 0.99
# variant -> (anchor sampling, lookup distance, shift added to the codebook's initial rows)
SETUP = {"closest-anchors": ("closest", "cos", 0.0),
         "no-anchors-far-init": (None, "cos", 1.0),
         "no-anchors": (None, "cos", 0.0)}  # the unprobed reference of the docstring only


class VectorQuantiser(nn.Module):
    """CVQ-VAE's quantiser (lyndonzheng/CVQ-VAE quantise.py VectorQuantiser): nearest code by
    cosine (or l2), codebook + beta commitment, straight-through, and the online clustered
    re-initialisation: an EMA of each code's usage (decay 0.99) sets a per-code factor
    alpha = exp(-p_k K 10 / (1 - 0.99) - 1e-3) and the code moves to alpha * anchor +
    (1 - alpha) * code, the anchor the batch feature closest to it ('closest')."""

    def __init__(self, anchor: str | None, distance: str, shift: float):
        super().__init__()
        self.anchor, self.distance = anchor, distance
        self.embedding = nn.Embedding(CODES, WIDTH)
        self.embedding.weight.data.uniform_(-1.0 / CODES, 1.0 / CODES)
        self.embedding.weight.data.add_(shift)
        self.register_buffer("embed_prob", torch.zeros(CODES))

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        """(n, K) similarities of the (detached) features to the codes, larger is nearer."""
        code = self.embedding.weight
        if self.distance == "l2":
            return -(z.pow(2).sum(1, keepdim=True) + code.pow(2).sum(1) - 2 * z @ code.t())
        return F.normalize(z, dim=1) @ F.normalize(code, dim=1).t()

    def forward(self, z: torch.Tensor):
        d = self.similarity(z.detach())
        codes = d.argmax(1)
        z_q = self.embedding.weight[codes]
        codebook_loss = (z_q - z.detach()).pow(2).mean()
        commitment_loss = (z_q.detach() - z).pow(2).mean()
        if self.training:
            with torch.no_grad():
                avg_probs = torch.bincount(codes, minlength=CODES).to(z.dtype) / len(codes)
                self.embed_prob.mul_(DECAY).add_(avg_probs, alpha=1 - DECAY)
                if self.anchor == "closest":
                    anchors = z.detach()[d.argmax(0)]
                    alpha = torch.exp(-(self.embed_prob * CODES * 10) / (1 - DECAY)
                                      - 1e-3)[:, None]
                    self.embedding.weight.mul_(1 - alpha).add_(alpha * anchors)
        return z + (z_q - z).detach(), codes, codebook_loss, commitment_loss


class CVQVAE(nn.Module):
    """A convolutional VQ-VAE on 8x8 digits: a 4x4 grid of WIDTH-dim latents per image."""

    def __init__(self, quantiser: VectorQuantiser):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, WIDTH, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(WIDTH, 32, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 3, padding=1))
        self.quantiser = quantiser

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x.view(-1, 1, 8, 8))
        return z.permute(0, 2, 3, 1).reshape(-1, WIDTH)

    def decode(self, flat: torch.Tensor) -> torch.Tensor:
        return self.decoder(flat.view(-1, 4, 4, WIDTH).permute(0, 3, 1, 2)).reshape(-1, 64)


def vq_digits(seed: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, float]:
    """Seeds torch; the batch generator, the training and test digits in [-1, 1], and the
    training pixels' variance (the reconstruction loss's scale)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    return gen, x_tr * 2 - 1, x_te * 2 - 1, float(x_tr.var())


def fit_vq(model: CVQVAE, codebook, weights: dict[str, float], gen: torch.Generator,
           x_tr: torch.Tensor, variance: float, log: Path) -> None:
    """Train a VQ autoencoder whose quantiser returns ``(quantised, codes, codebook_loss,
    commitment_loss)``, recorded as a user would: the probe at its defaults, ``z_e`` watched,
    ``codebook()`` watched as its prototypes and each vector's code observed as its group."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z_e")
    probe.watch_prototypes("codebook", codebook, latent="z_e")
    with probe:
        for _ in range(STEPS):
            x = x_tr[next(order)]
            z_e = model.encode(x)
            quantised, codes, codebook_loss, commitment_loss = model.quantiser(z_e)
            probe.observe(z_e=z_e, groups=codes)
            recons_loss = F.mse_loss(model.decode(quantised), x) / variance
            probe.backward({"recons_loss": recons_loss, "codebook_loss": codebook_loss,
                            "commitment_loss": commitment_loss}, weights=weights)
            opt.step()
            opt.zero_grad()


def test_vq(model: CVQVAE, code: torch.Tensor, x_te: torch.Tensor
            ) -> tuple[dict, torch.Tensor]:
    """The test split's code usage (of the quantiser's own lookup), reconstruction error and
    norms against the codebook ``code``; and the test latents."""
    model.eval()
    with torch.no_grad():
        z_e = model.encode(x_te)
        quantised, codes, _, _ = model.quantiser(z_e)
        mse = float(F.mse_loss(model.decode(quantised), x_te))
    return {"codes_used": int(codes.unique().numel()), "codes": len(code),
            "perplexity": perplexity(codes, len(code)), "test_mse": mse,
            "z_norm": float(z_e.norm(dim=1).mean()),
            "code_norm": float(code.norm(dim=1).mean())}, z_e


def train(variant: str, seed: int, log: Path) -> dict:
    gen, x_tr, x_te, variance = vq_digits(seed)
    model = CVQVAE(VectorQuantiser(*SETUP[variant]))
    fit_vq(model, lambda: model.quantiser.embedding.weight, {"commitment_loss": BETA}, gen,
           x_tr, variance, log)
    code = model.quantiser.embedding.weight.detach()
    outcome, z_e = test_vq(model, code, x_te)
    euclid = torch.cdist(z_e, code).argmin(1)
    return {**outcome, "euclid_codes_used": int(euclid.unique().numel()),
            "euclid_perplexity": perplexity(euclid, CODES)}


_MUST_NOT = ("inert-loss", "gradient-conflict", "static-loss-weights", "non-finite")

FAMILY = Family(
    name="cvq-vae",
    source="Zheng & Vedaldi 2023 (Online Clustered Codebook, CVQ-VAE, ICCV, sec. 3: "
           "online anchor re-initialisation of under-used codes); lyndonzheng/CVQ-VAE "
           "quantise.py VectorQuantiser (distance cos, anchor closest), main.py",
    train=train,
    variants=(
        Variant("closest-anchors", True,
                "CVQ-VAE as published: cosine lookup, codebook + 0.25 commitment, dead codes "
                "re-initialised online at the closest batch features: most codes in use "
                "(measured: 59-63 of 64, perplexity 27-41)",
                must_not=_MUST_NOT + ("prototype-collapse", "prototype-stale",
                                      "representation-collapse", "gradient-swamping")),
        Variant("no-anchors-far-init", False,
                "anchors off and the codebook started around (1, ..., 1), far from the "
                "features: the first codes chosen take every vector, the rest never move "
                "(measured: 16 of 64 codes used, perplexity 6-9, reconstruction 1.6-1.8x "
                "worse)",
                expected=(Expect("prototype-collapse", "codebook"),),
                allowed=(Expect("prototype-stale", "codebook"),
                         Expect("representation-collapse", "z_e")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("closest-anchors", 1), ("no-anchors-far-init", 1)),
)
