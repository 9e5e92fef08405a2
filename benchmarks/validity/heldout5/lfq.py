"""Lookup-free quantisation (LFQ), after Yu et al. 2023 ("Language Model Beats Diffusion --
Tokenizer is Key to Visual Generation", MAGVIT-v2, arXiv 2310.05737, sec. 3.1), the entropy
loss of the official google-research/magvit (``videogvt/train_lib/losses.py``:
``entropy_loss`` and ``separated_entropy``, which return ``sample_entropy`` and
``avg_entropy`` apart) and the PyTorch LFQ most ports copy, lucidrains/vector-quantize-pytorch
(``vector_quantize_pytorch/lookup_free_quantization.py``: ``per_sample_entropy``,
``codebook_entropy``, ``commit_loss``).

Published setup (sec. 3.1): the latent z in R^{log2 K} is quantised per dimension,
q(z_i) = sign(z_i), the token index sum_i 2^(i-1) [z_i > 0]: the codebook is the fixed set
of the K = 2^d corners {-1, 1}^d, no lookup and no codebook parameters. To encourage code
utilisation an entropy penalty is added (Jansen et al. 2020):
L_entropy = E[H(q(z))] - H[E(q(z))], the per-sample entropy (each vector's distribution over
the K codes, driven low: confident assignments) minus the codebook entropy (of the batch-mean
distribution, driven high: every code used). The distribution is softmax over the codes of
-||z - c||^2 / T (up to a constant 2 z.c / T); magvit's ``entropy_loss`` defaults to T = 1
with both weights 1 inside; lucidrains' defaults: inverse temperature 100,
``entropy_loss_weight`` 0.1, ``diversity_gamma`` 1, ``commitment_loss_weight`` 0.25 on
mse(z, sg(q(z))); straight-through estimator.

Here (CPU): scikit-learn's 8x8 digits; encoder conv 3x3 x32 -> conv 4x4 stride 2 x32 ->
conv 1x1 to d = 8 (a 4x4 grid of 8-bit tokens per image, K = 256 codes), decoder conv 3x3
x32 -> transposed conv 4x4 stride 2 x32 -> conv 3x3 to 1 channel (the corpus's VQ-VAE
shapes); batch 64, Adam lr 1e-3, 600 steps; reconstruction mean((x_hat - x)^2) / var(x);
T = 1 (magvit's default), weights 0.1 / 0.25 (lucidrains'). At lucidrains' inverse
temperature 100 the code distribution is one-hot for these small latents and the entropy
terms carry no gradient: the run with the entropy term then used 32 and 128 codes (seeds 0
/ 1), each with a bit of one sign for every test vector (64 and 254 codes at inverse
temperature 10, seed 0 again with such a bit), so it could not serve as healthy.
The four terms are passed to the probe with the source's names and weights: ``recon``,
``commitment`` (0.25), ``per_sample_entropy`` (0.1) and ``codebook_entropy`` (-0.1 x
diversity_gamma). Watched as docs/probe.md says a code table is watched: the encoder output
``z`` as a latent, the fixed codebook buffer (K x d corners) as prototypes ``codebook`` of
``z``, each vector's token observed as its group.

Variants (truth by construction):
- ``published``: healthy, diversity_gamma 1: the penalty is per-sample entropy minus
  codebook entropy.
- ``no-codebook-entropy``: broken, diversity_gamma 0 (``codebook_entropy`` still computed
  and passed with weight 0): only the per-sample entropy is penalised, which any confident
  assignment satisfies; the cheapest is to push some bits to one sign for every input, so
  whole halves of the codebook go unused (codebook collapse, the failure the codebook
  entropy exists to prevent).
Measured on the test split without gradprobe (seeds 0 / 1, one thread, CPU 12-18 s a run):
distinct codes used of 256, codebook perplexity (``common.perplexity``), dead bits (one sign
for >= 99% of the test vectors), reconstruction MSE, centred effective rank of z (of 8):
  published:           252 / 232 codes, perplexity 162 / 120, 0 / 0 dead bits,
                       MSE 0.0106 / 0.0096, z rank 7.9 / 7.8;
  no-codebook-entropy:   4 /  16 codes, perplexity 3.7 / 8.8, 6 / 4 dead bits,
                       MSE 0.0226 / 0.0160, z rank 4.7 / 5.2.
Expected on ``no-codebook-entropy``: ``prototype-collapse`` on ``codebook`` (4-16 of 256
codes take every vector). Allowed: ``representation-collapse`` on ``z`` (its dead bits carry
no token information and its rank falls by a third, though the live dimensions still vary).
Must not (both): ``inert-loss``, ``prototype-stale`` (the LFQ codebook is fixed by design:
there is nothing to update); on ``published`` also ``prototype-collapse`` and
``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, centred_effective_rank, digits_split, perplexity
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR = 600, 64, 1e-3
BITS, TEMPERATURE = 8, 1.0
CODES = 2 ** BITS
COMMITMENT, ENTROPY = 0.25, 0.1
DIVERSITY_GAMMA = {"published": 1.0, "no-codebook-entropy": 0.0}


def entropy(prob: torch.Tensor) -> torch.Tensor:
    return -(prob * (prob + 1e-5).log()).sum(-1)


class LFQ(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bit_values", 2 ** torch.arange(BITS))
        corners = (torch.arange(CODES)[:, None] & self.bit_values) > 0
        self.register_buffer("codebook", corners.float() * 2 - 1)  # (K, d): row k is code k

    def forward(self, z: torch.Tensor):
        quantized = torch.where(z > 0, 1.0, -1.0)
        codes = ((z > 0).long() * self.bit_values).sum(-1)
        prob = F.softmax(2 * z @ self.codebook.t() / TEMPERATURE, -1)  # -||z - c||^2 + const
        terms = {"commitment": F.mse_loss(z, quantized),
                 "per_sample_entropy": entropy(prob).mean(),
                 "codebook_entropy": entropy(prob.mean(0))}
        return z + (quantized - z).detach(), codes, terms


class LFQAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 4, stride=2, padding=1),
            nn.ReLU(), nn.Conv2d(32, BITS, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(BITS, 32, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 3, padding=1))
        self.lfq = LFQ()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's vectors, one row per image position: (n * 16, d)."""
        return self.encoder(x.view(-1, 1, 8, 8)).permute(0, 2, 3, 1).reshape(-1, BITS)

    def decode(self, flat: torch.Tensor) -> torch.Tensor:
        return self.decoder(flat.view(-1, 4, 4, BITS).permute(0, 3, 1, 2)).view(-1, 64)


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    variance = float(x_tr.var())
    model = LFQAutoencoder()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("z")
    probe.watch_prototypes("codebook", model.lfq.codebook, latent="z")
    weights = {"commitment": COMMITMENT, "per_sample_entropy": ENTROPY,
               "codebook_entropy": -ENTROPY * DIVERSITY_GAMMA[variant]}
    with probe:
        for _, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            x = x_tr[idx]
            z = model.encode(x)
            quantized, codes, terms = model.lfq(z)
            probe.observe(z=z, groups=codes)
            recon = (model.decode(quantized) - x).pow(2).mean() / variance
            probe.backward({"recon": recon, **terms}, weights=weights)
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        z = model.encode(x_te)
        quantized, codes, _ = model.lfq(z)
        mse = float((model.decode(quantized) - x_te).pow(2).mean())
        positive_share = (z > 0).float().mean(0)
    return {"codes_used": int(codes.unique().numel()), "codes": CODES,
            "perplexity": perplexity(codes, CODES), "test_mse": mse,
            "z_rank": centred_effective_rank(z.numpy()),
            "dead_bits": int(((positive_share - 0.5).abs() >= 0.49).sum())}


FAMILY = Family(
    name="lfq",
    source="Yu et al. 2023 (MAGVIT-v2, arXiv 2310.05737, sec. 3.1 LFQ entropy penalty); "
           "google-research/magvit videogvt/train_lib/losses.py entropy_loss; "
           "lucidrains/vector-quantize-pytorch lookup_free_quantization.py",
    train=train,
    variants=(
        Variant("published", True, "entropy penalty as published: per-sample entropy minus "
                "codebook entropy, weight 0.1",
                must_not=("inert-loss", "prototype-stale", "prototype-collapse",
                          "representation-collapse")),
        Variant("no-codebook-entropy", False,
                "diversity_gamma 0: only the per-sample entropy is penalised; bits go to one "
                "sign for every input and a few codes take every vector",
                expected=(Expect("prototype-collapse", "codebook"),),
                allowed=(Expect("representation-collapse", "z"),),
                must_not=("inert-loss", "prototype-stale")),
    ),
    seeds=(0, 1),
    quick=(("published", 0), ("no-codebook-entropy", 0)),
)
