"""The factorised, l2-normalised codebook of ViT-VQGAN (Yu, Li, Koh, Zhang, Pang, Qin, Ku,
Xu, Baldridge & Wu 2022, "Vector-quantized Image Modeling with Improved VQGAN", ICLR; arXiv
2110.04627), sec. 3.2 "Codebook learning": the encoder output is mapped by a linear
projection to a low-dimensional lookup space (768 -> 32 dims; 8 to 32 dims reported to work
best) and both the projected vector and every code are l2-normalised before the nearest-code
lookup, so that the lookup compares directions (a cosine distance); the code is projected
back to the decoder's width. The loss (sec. 3.1-3.2) is the VQ loss of van den Oord et al.,
L_VQ = ||sg[l2(z_e)] - l2(e)||^2 + beta ||sg[l2(e)] - l2(z_e)||^2, beta 0.25, plus the
reconstruction terms (L2, logit-Laplace, perceptual, adversarial); the paper reports that
the factorised, normalised lookup raises the codebook usage and the reconstruction quality
over the plain VQGAN quantiser (Euclidean lookup of unnormalised vectors in the encoder's
own width), which leaves most codes unused.

No official code was released; the most-used port, read with the repository tools:
thuanz123/enhancing-transformers ``enhancing/modules/stage1/quantizers.py``
``BaseQuantizer`` (``self.norm = F.normalize(x, dim=-1) if use_norm``; straight-through
``z + (z_q - z).detach()``) and ``VectorQuantizer.quantize`` (normalised z and codebook,
squared Euclidean distance, argmin, the two VQ terms on the normalised vectors, codebook
``uniform_(-1/n_embed, 1/n_embed)``), and ``enhancing/modules/stage1/vitvqgan.py`` ``ViTVQ``
(``pre_quant = nn.Linear(dim, embed_dim)`` before the quantiser, ``post_quant`` after it;
embed_dim 32, n_embed 8192 in its configs). That port puts beta on the codebook term; this
one follows the paper (and taming's VQGAN): beta on the commitment term. ``use_norm=False``
is taming's plain quantiser, the broken lookup below.

Here (CPU budget): scikit-learn's 8x8 digits in [-1, 1], the thirteenth set's convolutional
VQ autoencoder (imported from heldout13/cvq_vae.py: encoder to a 4x4 grid of 16-dim latents,
mirror decoder, ``fit_vq``: Adam lr 1e-3, batch 64 images = 1,024 latent vectors, 800 steps,
reconstruction MSE over the pixel variance), the ViT encoder and the GAN/perceptual terms
left out (the codebook's behaviour is the quantiser's); K = 128 codes; the factorised lookup
in 8 dims (``project_in`` 16 -> 8, ``project_out`` 8 -> 16, the paper's lower end). Losses
given to the probe: ``recons_loss`` (first), ``codebook_loss`` (weight 1: trains only the
codebook) and ``commitment_loss`` (weight beta: trains the encoder). Watched as a user of a
codebook watches it: the vectors the lookup compares (the normalised projections, or the
raw latents) as latent ``z_e``, the codes the lookup compares them with (normalised rows) as
prototypes ``codebook`` of ``z_e``, each vector's code observed as its group.

Variants (truth by construction):
- ``factorised-l2``: healthy, as published: 8-dim factorised lookup, l2-normalised, beta
  0.25.
- ``plain-codes``: broken. No factorisation and no l2 normalisation: the plain VQGAN lookup
  by Euclidean distance in the encoder's 16 dims, with the same small uniform(-1/K, 1/K)
  codebook start that the normalised lookup tolerates. The encoder outputs grow far from the
  codes (norm 7.7-9.2 against 0.2), the few codes first chosen are pulled to them and win
  every later lookup, the rest are never chosen and never move: dead codes.
- ``heavy-commitment``: broken. The published codebook with beta 25 (100 times 0.25): the
  commitment term pulls the encoder's normalised outputs onto the codes they first chose
  much faster than the codebook and the reconstruction can spread them, the encoder
  collapses onto a handful of codes and reconstruction suffers.

Measured on the test split (450 digits, 7,200 vectors), without gradprobe, seeds 0 / 1:
codes used of 128, codebook perplexity (exp of the usage entropy), share of codebook rows
that never moved, test reconstruction MSE (on [-1, 1] pixels):
  factorised-l2:     98 / 76 codes, perplexity 84.9 / 67.4, never moved 0.21 / 0.40,
                     MSE 0.0225 / 0.0232;
  plain-codes:       14 / 12 codes, perplexity  7.4 /  7.2, never moved 0.88 / 0.85,
                     MSE 0.063 / 0.074 (2.8 / 3.2 times the healthy);
  heavy-commitment:   4 /  4 codes, perplexity  4.0 /  3.9, never moved 0.95 / 0.95,
                     MSE 0.062 / 0.069 (2.8 / 3.0 times the healthy).
The probe's usage (Euclidean nearest row of the watched latent) is the lookup's own here
(the same counts: ``euclid_codes_used``).

Alarms. Expected on both broken variants: ``prototype-collapse`` on ``codebook`` (a pooled
usage of 7 of 128 codes or fewer by perplexity: ln 7 / ln 128 = 0.40, ln 4 / ln 128 = 0.29).
Allowed on both: ``prototype-stale`` on ``codebook`` (85-95% of the rows never move: true,
though the few live codes carry the table's drift) and ``representation-collapse`` on
``z_e`` (the vectors sit on the few live codes); on ``heavy-commitment`` also
``gradient-swamping`` on ``recons_loss`` (the commitment term's pull on the encoder, 100
times its published weight, dominates the reconstruction's: the cause as an engineer would
name it, though not measured here) and ``static-loss-weights`` on ``commitment_loss`` and
``recons_loss`` (beta is fixed). Must not (all): ``inert-loss`` (the codebook loss trains
only the codebook by design), ``gradient-conflict`` (the commitment term pulls the encoder
towards its codes by design), ``non-finite``; on the healthy variant also
``prototype-collapse``, ``prototype-stale``, ``representation-collapse``,
``gradient-swamping`` and ``static-loss-weights`` (published weights, usage high).

CPU: about 6.7-8.4 seconds a run (800 steps, probe included, one thread).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..common import perplexity
from ..harness import Expect, Family, Variant
from ..heldout13.cvq_vae import CVQVAE, WIDTH, fit_vq, test_vq, vq_digits

CODES, CODE_DIM, BETA, HEAVY_BETA = 128, 8, 0.25, 25.0
# variant -> (factorised l2-normalised lookup, commitment weight beta)
SETUP = {"factorised-l2": (True, BETA),
         "plain-codes": (False, BETA),
         "heavy-commitment": (True, HEAVY_BETA)}


class CodebookQuantiser(nn.Module):
    """The quantiser of Yu et al. 2022 sec. 3.2 as thuanz123/enhancing-transformers writes it
    (enhancing/modules/stage1/quantizers.py VectorQuantizer, use_norm=True): the encoder
    output and the codebook rows l2-normalised, the nearest code by Euclidean distance between
    the normalised vectors, the loss ||sg[z] - e||^2 (codebook) + beta ||z - sg[e]||^2
    (commitment) on the normalised vectors, straight-through to the encoder. ``normalise``
    False is taming's plain VQGAN quantiser (the same code, use_norm=False). Codebook drawn
    uniform(-1/K, 1/K) as both write it."""

    def __init__(self, dim: int, normalise: bool):
        super().__init__()
        self.normalise = normalise
        self.embedding = nn.Embedding(CODES, dim)
        self.embedding.weight.data.uniform_(-1.0 / CODES, 1.0 / CODES)

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=-1) if self.normalise else v

    def codebook(self) -> torch.Tensor:
        """The codes the lookup compares with (l2-normalised rows when normalise)."""
        return self.norm(self.embedding.weight)

    def forward(self, z: torch.Tensor):
        z = self.norm(z)
        code = self.codebook()
        zd = z.detach()
        d = zd.pow(2).sum(1, keepdim=True) + code.pow(2).sum(1) - 2 * zd @ code.t()
        codes = d.argmin(1)
        z_q = F.embedding(codes, code)
        codebook_loss = (z_q - z.detach()).pow(2).mean()
        commitment_loss = (z_q.detach() - z).pow(2).mean()
        return z + (z_q - z).detach(), codes, codebook_loss, commitment_loss


class FactorisedVQ(CVQVAE):
    """The thirteenth set's convolutional VQ autoencoder on 8x8 digits (a 4x4 grid of WIDTH=16
    latents), with ViT-VQGAN's factorised codes: a linear projection of each latent to
    CODE_DIM=8 dimensions before the lookup and one back to WIDTH after it (sec. 3.2); the
    encoder output the codes are compared with is the projected, l2-normalised vector."""

    def __init__(self, factorised: bool):
        super().__init__(CodebookQuantiser(CODE_DIM if factorised else WIDTH, factorised))
        self.factorised = factorised
        if factorised:
            self.project_in = nn.Linear(WIDTH, CODE_DIM)
            self.project_out = nn.Linear(CODE_DIM, WIDTH)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = super().encode(x)
        return F.normalize(self.project_in(z), dim=1) if self.factorised else z

    def decode(self, flat: torch.Tensor) -> torch.Tensor:
        return super().decode(self.project_out(flat) if self.factorised else flat)


def train(variant: str, seed: int, log: Path) -> dict:
    factorised, beta = SETUP[variant]
    gen, x_tr, x_te, variance = vq_digits(seed)
    model = FactorisedVQ(factorised)
    with torch.no_grad():
        start = model.quantiser.codebook().clone()

    def codebook() -> torch.Tensor:
        with torch.no_grad():
            return model.quantiser.codebook().detach()

    fit_vq(model, codebook, {"commitment_loss": beta}, gen, x_tr, variance, log)
    code = codebook()
    outcome, z_e = test_vq(model, code, x_te)
    moved = (code - start).norm(dim=1) / start.norm(dim=1)
    euclid = torch.cdist(z_e, code).argmin(1)
    return {**outcome, "frozen_code_share": float((moved < 1e-3).float().mean()),
            "euclid_codes_used": int(euclid.unique().numel()),
            "euclid_perplexity": perplexity(euclid, CODES)}


_MUST_NOT = ("inert-loss", "gradient-conflict", "non-finite")
_DEAD = (Expect("prototype-stale", "codebook"), Expect("representation-collapse", "z_e"))

FAMILY = Family(
    name="vit-vqgan-codes",
    source="Yu et al. 2022 (Vector-quantized Image Modeling with Improved VQGAN, ICLR, sec. "
           "3.2: factorised codes in a low-dimensional lookup space, l2-normalised, L_VQ with "
           "beta 0.25); thuanz123/enhancing-transformers enhancing/modules/stage1/"
           "quantizers.py VectorQuantizer (use_norm), vitvqgan.py ViTVQ (pre_quant, "
           "post_quant)",
    train=train,
    variants=(
        Variant("factorised-l2", True,
                "ViT-VQGAN's codebook as published: 8-dim factorised, l2-normalised lookup, "
                "beta 0.25: most codes in use (measured: 76-98 of 128, perplexity 67-85)",
                must_not=_MUST_NOT + ("prototype-collapse", "prototype-stale",
                                      "representation-collapse", "gradient-swamping",
                                      "static-loss-weights")),
        Variant("plain-codes", False,
                "no factorisation and no l2 normalisation (plain Euclidean VQGAN lookup in 16 "
                "dims) from the small uniform start: the encoder outputs grow away from the "
                "codes, a few codes take every vector, the rest die (measured: 12-14 of 128 "
                "codes used, perplexity 7.2-7.4, reconstruction 2.8-3.2x worse)",
                expected=(Expect("prototype-collapse", "codebook"),),
                allowed=_DEAD,
                must_not=_MUST_NOT + ("static-loss-weights",)),
        Variant("heavy-commitment", False,
                "the published codebook with beta 25 (100x 0.25): the commitment term pins "
                "the encoder's outputs onto the codes they first chose (measured: 4 of 128 "
                "codes used, perplexity 3.9-4.0, reconstruction 2.8-3.0x worse)",
                expected=(Expect("prototype-collapse", "codebook"),),
                allowed=_DEAD + (Expect("gradient-swamping", "recons_loss"),
                                 Expect("static-loss-weights", "commitment_loss"),
                                 Expect("static-loss-weights", "recons_loss")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("factorised-l2", 1), ("plain-codes", 1)),
)
