"""SimVQ (Zhu, Li, Zhang, Cheng & Ji 2024, "Addressing Representation Collapse in Vector
Quantized Models with One Linear Layer", arXiv 2411.02038, sec. 4: the codebook reparameterised
as C W, C a frozen random basis (K x d, Gaussian, std d^-1/2) and W one learned linear layer
(d x d), so that every gradient the codebook loss gives to the chosen codes moves the whole
codebook through W, and no code is left behind; nearest code by Euclidean distance to the
rows of C W, straight-through estimator, the VQ losses ||sg[z_e] - q||^2 and ||z_e - sg[q]||^2;
Remark 1: training C and W together, or C alone (a plain VQ-VAE codebook), lets the codes that
are not chosen stay where they are and die).

Official code, read with the repository tools: youngsheen/SimVQ
``taming/modules/vqvae/quantize.py`` ``SimVQ.__init__`` (``self.embedding = nn.Embedding(n_e,
e_dim)``, ``nn.init.normal_(..., mean=0, std=e_dim**-0.5)``, ``requires_grad = False`` on it,
``self.embedding_proj = nn.Linear(e_dim, e_dim)``) and ``SimVQ.forward`` (``quant_codebook =
self.embedding_proj(self.embedding.weight)``, ``d = |z|^2 + |q|^2 - 2 z q^T``, ``argmin``,
``z_q = F.embedding(indices, quant_codebook)``; with the default ``legacy=True``:
``commit_loss = mean((z_q.detach() - z)**2) + beta * mean((z_q - z.detach())**2)``, beta
0.25, i.e. weight 1 on the term that trains the encoder and beta on the term that trains W;
``z_q = z + (z_q - z).detach()``); ``taming/models/vq.py`` adds it to the reconstruction loss.

Here (CPU budget): scikit-learn's 8x8 digits (common.digits_split, mapped to [-1, 1]); the
convolutional encoder/decoder of the thirteenth set's CVQ-VAE family (imported:
heldout13.cvq_vae.CVQVAE, a 4x4 grid of 16-dim latents per 8x8 image), the quantiser replaced
by SimVQ's; K = 128 codes of dim 16 (the paper's codebooks are 65,536 x 8 or larger: a
codebook twice the 64 of the CVQ family, for 1,024 vectors a batch); batch 64 images, Adam lr
1e-3 (the source's 1e-4 over far more steps; not tried at 1e-4), 800 steps. The source's
summed ``commit_loss`` is handed to the probe as its two terms: ``recons_loss`` (first, MSE
over the data variance), ``codebook_loss`` = mean((q - sg[z_e])^2) (weight beta 0.25, the
legacy default: it trains W only) and ``commitment_loss`` = mean((sg[q] - z_e)^2) (weight 1:
it trains the encoder). Watched as a user of a codebook watches it (docs/quickstart.md): the
encoder outputs ``z_e`` as a latent, the effective codebook C W (K x 16, a row per code, what
the lookup uses) as prototypes ``codebook`` of ``z_e``, each vector's code observed as its
group.

Variants (truth by construction):
- ``simvq``: healthy, as published: C frozen at N(0, 1/d), only W (and its bias) learned.
- ``plain-vq-far-init``: broken. The codebook learned directly (a plain VQ-VAE nn.Embedding
  with the same losses and weights, no projection) and started far from the encoder outputs:
  the taming VectorQuantizer's initial rows, uniform(-1/K, 1/K), shifted by +1 in every
  dimension, so that all 128 codes start nearly on one point, (1, ..., 1). The codes first
  chosen are pulled to the features and win every later lookup; the others are never chosen,
  get no gradient and never move: dead codes, the representation collapse SimVQ's linear
  layer removes.
Measured on the test split (450 digits, 7,200 vectors), without gradprobe, seeds 0 / 1: codes
used of 128 and codebook perplexity (exp of the usage entropy), test reconstruction MSE (on
[-1, 1] pixels), share of codebook rows that moved less than 1e-3 of their start norm
(``frozen_code_share``):
  simvq:              125 / 117 codes used, perplexity 51.6 / 45.3, MSE 0.027 / 0.026,
                      frozen codes 0.00 / 0.00;
  plain-vq-far-init:   36 /  44 codes used, perplexity 22.8 / 31.6, MSE 0.043 / 0.035,
                      frozen codes 0.73 / 0.65.
Two thirds or more of the plain codebook never moves and is never chosen (92 / 84 of 128
unused), the usage perplexity falls to a half / two thirds of SimVQ's and the reconstruction
error is 1.6 / 1.3 times SimVQ's; under SimVQ every row moves (through W) and 117-125 of 128
codes are in use. (A first try of the broken start with SimVQ's own Gaussian rows shifted
by +1, then +3, left 73 / 82 codes in use, perplexity 40 / 48 at seed 0: the encoder,
pulled by the commitment term of weight 1, followed the spread rows; the taming quantiser's
near-identical rows, uniform(-1/K, 1/K), are the start that a plain codebook dies from.)

Alarms. Expected on ``plain-vq-far-init``: ``prototype-collapse`` on ``codebook`` (a few codes
take every vector). Allowed there: ``prototype-stale`` on ``codebook`` (the dead rows never
move while the features do) and ``representation-collapse`` on ``z_e`` (the commitment term
pulls the features onto the few live codes: incidental). Must not (both): ``inert-loss`` (the
codebook loss trains only the codebook by design; the commitment loss trains the encoder),
``gradient-conflict`` (the commitment term pulls the encoder towards its codes by design),
``static-loss-weights``, ``non-finite``; on the healthy variant also ``prototype-collapse``,
``prototype-stale``, ``representation-collapse`` and ``gradient-swamping`` (published weights,
usage held).

CPU: about 8.1-9.4 seconds a run (800 steps, probe included, one thread).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..harness import Expect, Family, Variant
from ..heldout13.cvq_vae import CVQVAE, WIDTH, fit_vq, test_vq, vq_digits

CODES, BETA = 128, 0.25  # steps, batch and learning rate: cvq_vae's (800, 64, 1e-3)
# variant -> (SimVQ's frozen basis and linear layer, shift added to the initial rows)
SETUP = {"simvq": (True, 0.0), "plain-vq-far-init": (False, 1.0)}


class SimVQ(nn.Module):
    """SimVQ's quantiser (youngsheen/SimVQ quantize.py SimVQ): codebook = Linear(C), C frozen
    Gaussian; or, ``reparam=False``, a plain learned codebook C. Returns the straight-through
    output, the codes and the two VQ terms (codebook: trains the codebook; commitment: trains
    the encoder)."""

    def __init__(self, reparam: bool, shift: float):
        super().__init__()
        self.reparam = reparam
        self.embedding = nn.Embedding(CODES, WIDTH)
        if reparam:  # SimVQ's basis
            nn.init.normal_(self.embedding.weight, mean=0.0, std=WIDTH ** -0.5)
        else:  # taming's VectorQuantizer, the plain codebook SimVQ replaces
            self.embedding.weight.data.uniform_(-1.0 / CODES, 1.0 / CODES)
        self.embedding.weight.data.add_(shift)
        if reparam:
            self.embedding.weight.requires_grad_(False)
            self.embedding_proj = nn.Linear(WIDTH, WIDTH)

    def codebook(self) -> torch.Tensor:
        """The codebook the lookup uses: C W (+ b), or C."""
        if self.reparam:
            return self.embedding_proj(self.embedding.weight)
        return self.embedding.weight

    def forward(self, z: torch.Tensor):
        code = self.codebook()
        d = (z.detach().pow(2).sum(1, keepdim=True) + code.pow(2).sum(1)
             - 2 * z.detach() @ code.t())
        codes = d.argmin(1)
        z_q = F.embedding(codes, code)
        codebook_loss = (z_q - z.detach()).pow(2).mean()
        commitment_loss = (z_q.detach() - z).pow(2).mean()
        return z + (z_q - z).detach(), codes, codebook_loss, commitment_loss


def train(variant: str, seed: int, log: Path) -> dict:
    gen, x_tr, x_te, variance = vq_digits(seed)
    model = CVQVAE(SimVQ(*SETUP[variant]))
    with torch.no_grad():
        start = model.quantiser.codebook().clone()

    def effective_codebook() -> torch.Tensor:
        with torch.no_grad():
            return model.quantiser.codebook().detach()

    fit_vq(model, effective_codebook, {"codebook_loss": BETA}, gen, x_tr, variance, log)
    code = effective_codebook()
    outcome, _ = test_vq(model, code, x_te)
    moved = (code - start).norm(dim=1) / start.norm(dim=1)
    return {**outcome, "frozen_code_share": float((moved < 1e-3).float().mean())}


_MUST_NOT = ("inert-loss", "gradient-conflict", "static-loss-weights", "non-finite")

FAMILY = Family(
    name="simvq",
    source="Zhu, Li, Zhang, Cheng & Ji 2024 (SimVQ, Addressing Representation Collapse in "
           "Vector Quantized Models with One Linear Layer, arXiv 2411.02038, sec. 4: frozen "
           "random codebook C times one learned linear layer W); youngsheen/SimVQ "
           "taming/modules/vqvae/quantize.py SimVQ (legacy loss, beta 0.25)",
    train=train,
    variants=(
        Variant("simvq", True,
                "SimVQ as published: the codebook C W, C a frozen Gaussian basis, only the "
                "linear layer W learned, so every code moves with the chosen ones: most codes "
                "in use (measured: 117-125 of 128, perplexity 45-52)",
                must_not=_MUST_NOT + ("prototype-collapse", "prototype-stale",
                                      "representation-collapse", "gradient-swamping")),
        Variant("plain-vq-far-init", False,
                "a plain VQ-VAE codebook learned directly, started around (1, ..., 1), far "
                "from the features: the first codes chosen take every vector, the rest are "
                "never chosen and never move (measured: 36-44 of 128 codes used, 65-73% of "
                "the rows never moved, perplexity 23-32, reconstruction 1.3-1.6x worse)",
                expected=(Expect("prototype-collapse", "codebook"),),
                allowed=(Expect("prototype-stale", "codebook"),
                         Expect("representation-collapse", "z_e")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("simvq", 1), ("plain-vq-far-init", 1)),
)
