"""The discrete VAE of DALL-E, after Ramesh et al. 2021 ("Zero-Shot Text-to-Image
Generation", ICML; sec. 2.1 and appendix A.2: the dVAE trained with the gumbel-softmax
relaxation, the relaxation temperature annealed from 1 to 1/16 and the KL weight beta
raised from 0 to 6.6 over the first updates, against a uniform prior over the 8192 codes;
read from memory of the paper, not re-read here) and the public port lucidrains/DALLE-pytorch
``dalle_pytorch/dalle_pytorch.py`` (``DiscreteVAE``: ``temperature``, ``straight_through``,
``kl_div_loss_weight``) with ``train_vae.py`` (``KL_LOSS_WEIGHT``, the exponential
temperature annealing ``temp = max(temp * exp(-ANNEAL_RATE * step), TEMP_MIN)``), found with
the repository tools (the ``DiscreteVAE`` signature and train_vae.py's call).

Published model (``DiscreteVAE.forward``): strided convolutions give per-position logits
over the codebook; ``soft_one_hot = gumbel_softmax(logits, tau=temperature, dim=1)``; the
decoder reads ``soft_one_hot`` times the codebook embedding (``nn.Embedding(num_tokens,
codebook_dim)``); ``recon_loss`` is the MSE of the reconstruction; ``kl_div`` is the KL of
the per-position code distribution softmax(logits) to the uniform prior (``F.kl_div(
log_uniform, log_qy, reduction='batchmean', log_target=True)``: summed over positions,
averaged over the batch); the loss is ``recon_loss + kl_div * kl_div_loss_weight``; the
codes of an image are the argmax of the logits (``get_codebook_indices``).

Here: scikit-learn's 8x8 digits; encoder Conv2d 1 -> 32 (4, stride 2) -> 32 (4, stride 2)
-> 1x1 to K = 32 logits on a 2x2 grid (4 positions per image, as DALL-E's 32x32 grid on
256x256 images, scaled down); codebook 32 x 16; decoder the mirror (ConvTranspose2d);
``recon_loss`` = MSE / var(x); batch 64, Adam lr 1e-3, 1500 steps. Healthy schedule as the
paper's: temperature annealed exponentially from 1 to 1/16 over the run, the KL weight raised
linearly from 0 to beta = 0.1 over the first quarter (the paper's 6.6 weighs a KL summed over
1024 positions against a reconstruction summed over 256x256x3 pixels; here the
reconstruction is a per-pixel mean, so beta was scaled down and set by measurement).
Watched as docs/probe.md says a prototype table is watched: the sampled embedding
(``soft_one_hot`` times the codebook, one 16-d row per position) as the latent ``sampled``,
the codebook embedding as prototypes ``codebook`` of ``sampled``, each position's code index
(argmax of its logits) observed as its group.

Variants (truth by construction):
- ``annealed``: healthy, the paper's schedule (temperature 1 -> 1/16, KL weight 0 -> 0.1).
- ``cold-no-kl``: broken: the temperature fixed at 1/16 from the first step and
  ``kl_div_loss_weight = 0`` (DALLE-pytorch's default; the KL is still computed and passed
  with weight 0). The relaxation is near one-hot from the start, so only the code each
  position happens to take gets a gradient, and nothing pushes the encoder towards the
  uniform prior: the positions settle on a few codes and the rest of the codebook is dead.
Measured on the test split (450 digits, 1800 positions), independently of gradprobe (seeds 0
and 1): distinct codes used of 32, codebook perplexity (exp of the usage entropy), MSE of the
hard (argmax) reconstruction:
  annealed:   27 and 26 codes used, perplexity 10.2 and 10.7, MSE 0.050 and 0.048;
  cold-no-kl:  3 and  4 codes used, perplexity  3.0 and  3.5, MSE 0.039 and 0.041.
The harm is the codebook's: 3-4 codes left of 32. The hard reconstruction of these digits
is no worse (the KL term costs the healthy run some reconstruction, and 4 positions of 3-4
codes still tell most digits apart), so no reconstruction alarm is expected.
About 18-21 CPU-seconds a run (1500 steps, probe included, on a loaded machine).
Expected on ``cold-no-kl``: ``prototype-collapse`` on ``codebook``. Allowed there:
``inert-loss`` on ``kl_div`` (weighted 0, it trains nothing). Must not (both):
``static-loss-weights``, ``gradient-conflict``; on the healthy variant also ``inert-loss``,
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

STEPS, BATCH, LR = 1500, 64, 1e-3
TOKENS, CODE_DIM, HIDDEN = 32, 16, 32
TEMP_START, TEMP_END, BETA = 1.0, 1 / 16, 0.1
SCHEDULE = {"annealed": True, "cold-no-kl": False}


class DiscreteVAE(nn.Module):
    """DALLE-pytorch's ``DiscreteVAE`` at digit scale: logits on a 2x2 grid, gumbel-softmax
    over the codebook, decoder from the mixed code embeddings."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, HIDDEN, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(HIDDEN, HIDDEN, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(HIDDEN, TOKENS, 1))
        self.codebook = nn.Embedding(TOKENS, CODE_DIM)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(CODE_DIM, HIDDEN, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(HIDDEN, HIDDEN, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(HIDDEN, 1, 1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.view(-1, 1, 8, 8))

    def decode(self, one_hot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, K, 2, 2) code weights -> (n, 64) image and the (n * 4, d) embeddings read."""
        sampled = torch.einsum("bnhw,nd->bdhw", one_hot, self.codebook.weight)
        rows = sampled.permute(0, 2, 3, 1).reshape(-1, CODE_DIM)
        return self.decoder(sampled).view(-1, 64), rows


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || uniform) summed over positions, averaged over the batch."""
    log_qy = F.log_softmax(logits.flatten(2).transpose(1, 2), dim=-1)
    log_uniform = torch.full_like(log_qy, -math.log(TOKENS))
    return F.kl_div(log_uniform, log_qy, reduction="batchmean", log_target=True)


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    variance = float(x_tr.var())
    model = DiscreteVAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    annealed = SCHEDULE[variant]
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("sampled")
    probe.watch_prototypes("codebook", model.codebook.weight, latent="sampled")
    with probe:
        for step in range(STEPS):
            progress = step / (STEPS - 1)
            temperature = TEMP_START * (TEMP_END / TEMP_START) ** progress if annealed else TEMP_END
            kl_weight = BETA * min(1.0, 4 * progress) if annealed else 0.0
            x = x_tr[next(order)]
            logits = model.logits(x)
            soft_one_hot = F.gumbel_softmax(logits, tau=temperature, dim=1)
            out, sampled = model.decode(soft_one_hot)
            probe.observe(sampled=sampled, groups=logits.argmax(1).flatten())
            recon_loss = (out - x).pow(2).mean() / variance
            probe.backward({"recon_loss": recon_loss, "kl_div": kl_to_uniform(logits)},
                           weights={"kl_div": kl_weight})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model.logits(x_te)
        codes = logits.argmax(1)
        out, _ = model.decode(F.one_hot(codes, TOKENS).permute(0, 3, 1, 2).float())
        mse = float((out - x_te).pow(2).mean())
    codes = codes.flatten()
    return {"codes_used": int(codes.unique().numel()), "codes": TOKENS,
            "perplexity": perplexity(codes, TOKENS), "test_mse": mse}


_MUST_NOT = ("static-loss-weights", "gradient-conflict")

FAMILY = Family(
    name="gumbel-dvae",
    source="Ramesh et al. 2021 (DALL-E dVAE, gumbel-softmax, annealed temperature, KL to a "
           "uniform prior); lucidrains/DALLE-pytorch dalle_pytorch/dalle_pytorch.py DiscreteVAE",
    train=train,
    variants=(
        Variant("annealed", True,
                "the paper's schedule: gumbel-softmax temperature annealed from 1 to 1/16, KL "
                "to the uniform prior weighted from 0 up to beta",
                must_not=_MUST_NOT + ("inert-loss", "prototype-collapse", "prototype-stale",
                                      "representation-collapse")),
        Variant("cold-no-kl", False,
                "temperature fixed at 1/16 from the start and KL weight 0: near one-hot "
                "samples give gradient only to the code taken, nothing pulls towards the "
                "uniform prior, and a few codes take every position",
                expected=(Expect("prototype-collapse", "codebook"),),
                allowed=(Expect("inert-loss", "kl_div"),), must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("annealed", 1), ("cold-no-kl", 1)),
)
