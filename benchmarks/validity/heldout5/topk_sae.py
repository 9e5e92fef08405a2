"""Sparse autoencoder with a TopK activation and the AuxK auxiliary loss, after Gao et al. 2024
("Scaling and evaluating sparse autoencoders", arXiv 2406.04093, sec. 2.1-2.4) and the
authors' reference code openai/sparse_autoencoder ``sparse_autoencoder/train.py``
(``FastAutoencoder``, ``init_from_data_``, ``Config``, the loss in ``main``).

Published setup: z = ReLU(TopK(W_enc (x - b_pre) + b_enc)), x_hat = W_dec z + b_pre (sec. 2.3);
the loss is the normalised MSE (the squared error divided by that of the mean activation,
the code's ``mse_scale``) plus alpha times the AuxK loss, alpha = 1/32 (``auxk_coef``): the
error e = x - x_hat is reconstructed by the top k_aux *dead* latents alone, e_hat =
W_dec z_aux, and L_aux = ||e - e_hat||^2 normalised (sec. 2.4, the code's
``normalized_mse`` of ``decode_sparse(auxk_inds, auxk_vals)`` against
``x - recons.detach() + pre_bias``); a latent is dead when it has not fired for
``dead_toks_threshold`` tokens (``stats_last_nonzero``); k_aux a power of two near d_model / 2
(sec. 2.4; 256 for k = 32 in ``Config``). Initialisation: b_pre at the geometric median of
the activations (``init_from_data_``), encoder tied to the decoder's transpose (sec. 2.4),
decoder columns of unit norm (kept so after every step, with the gradient parallel to them
projected out); Adam with eps 6.25e-10. The code names the two terms ``train_recons`` and
``train_maxk_recons``; they are passed here as ``recons`` and ``auxk`` (weight 1/32).

Here: the "model" is a fixed random MLP (64 -> 64 ReLU, seed 1234 for every run) read at its
hidden layer (d_model = 64, all non-negative: a mean far from 0) on augmented 8x8 digits
(benchmarks/validity/common.py ``augment``: fresh tokens every batch); SAE with 512 latents
(8x), k = 8, k_aux = 32 (d_model / 2), dead after 64 steps of 256 tokens without firing,
Adam lr 1e-3 (1e-4 published for far larger models), 1500 steps. b_pre starts at the
coordinate-wise median (a cheap stand-in for the geometric median). Watched as docs/probe.md
says: the sparse codes as a latent (``latents``) and the decoder's dictionary (one row per
latent) as prototypes of the centred activation x - b_pre (watched as ``centred``), each
token's strongest latent observed as its group.

Variants (truth by construction):
- ``auxk``: healthy, as published (tied init, b_pre at the median, AuxK on).
- ``no-auxk-zero-bias``: broken. AuxK off, b_pre started at 0 and the encoder at PyTorch's
  default initialisation (untied): every pre-activation reads the activations' large common
  mean, the few latents aligned with it win the top k on every token, the others never fire,
  and without AuxK a latent that never fires gets no gradient: dead latents pile up.
Measured independently of gradprobe (seeds 0 and 1): the share of dead latents (none firing
over the 1797 unaugmented digits, 14.4k latent slots) and the normalised MSE on them:
  auxk:              128 and 116 of 512 latents dead (25% and 23%), NMSE 0.162 and 0.158;
  no-auxk-zero-bias: 476 and 477 of 512 latents dead (93% and 93%), NMSE 0.280 and 0.275.
With the published initialisation and AuxK weighted 0 instead: 155 and 157 dead (30% and 31%),
NMSE 0.163 and 0.161: AuxK revives some latents, the initialisation decides most of the harm.
24-29 CPU-seconds a run.
Expected on ``no-auxk-zero-bias``: ``prototype-collapse`` on ``dictionary`` (35 and 36 of
512 directions ever fire, as a VQ codebook whose codes in use collapse to a few). Allowed there:
``representation-collapse`` on ``latents`` (the codes live in the few live dimensions) and
``prototype-stale`` on ``dictionary`` (the dead directions get no gradient and never move).
Must not (both): ``inert-loss``, ``non-finite``; on the healthy variant also
``prototype-collapse``, ``representation-collapse``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradprobe

from ..common import augment, batches, digits_split
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, EPS = 1500, 256, 1e-3, 6.25e-10
D_MODEL, LATENTS, K, K_AUX, AUXK_COEF = 64, 512, 8, 32, 1 / 32
DEAD_STEPS = 64  # the code's dead_toks_threshold // bs, scaled
SUBJECT_SEED = 1234  # the fixed network whose activations are decomposed


def subject_network() -> nn.Module:
    gen = torch.Generator().manual_seed(SUBJECT_SEED)
    layer = nn.Linear(64, D_MODEL)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(D_MODEL, 64, generator=gen) / 8)
        layer.bias.copy_(torch.randn(D_MODEL, generator=gen) * 0.1)
    return nn.Sequential(layer, nn.ReLU()).requires_grad_(False)


class TopKSAE(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.encoder = nn.Linear(D_MODEL, LATENTS, bias=False)
        self.decoder = nn.Linear(LATENTS, D_MODEL, bias=False)
        self.pre_bias = nn.Parameter(torch.zeros(D_MODEL))
        self.latent_bias = nn.Parameter(torch.zeros(LATENTS))
        self.register_buffer("steps_since_fired", torch.zeros(LATENTS, dtype=torch.long))
        with torch.no_grad():
            if tied:
                self.decoder.weight.copy_(self.encoder.weight.t())
            self.decoder.weight.div_(self.decoder.weight.norm(dim=0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The TopK code and the AuxK code (top k_aux of the dead latents, zero if none)."""
        pre = self.encoder(x - self.pre_bias) + self.latent_bias
        top = pre.topk(K, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        with torch.no_grad():
            fired = torch.zeros(LATENTS, dtype=torch.bool)
            fired[top.indices[top.values > 1e-3]] = True
            self.steps_since_fired.add_(1).masked_fill_(fired, 0)
        dead = self.steps_since_fired > DEAD_STEPS
        aux = pre.masked_fill(~dead, float("-inf")).topk(K_AUX, dim=1)
        aux_values = torch.where(aux.values.isfinite(), aux.values, 0.0).relu()
        aux_codes = torch.zeros_like(pre).scatter(1, aux.indices, aux_values)
        return codes, aux_codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes) + self.pre_bias


def normalized_mse(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The code's loss.normalized_mse: the squared error over that of the batch mean."""
    return ((recon - target).pow(2).mean(1) / (target.mean(0) - target).pow(2).mean(1)).mean()


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    subject = subject_network()
    published = variant == "auxk"
    sae = TopKSAE(tied=published)
    if published:
        with torch.no_grad():
            sae.pre_bias.copy_(subject(x_tr).median(0).values)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, eps=EPS)
    probe = gradprobe.Probe(sae, run_file=log)
    probe.watch_latent("latents")
    probe.watch_latent("centred")
    probe.watch_prototypes("dictionary", lambda: sae.decoder.weight.t(), latent="centred")
    order = batches(len(x_tr), BATCH, gen)
    with probe:
        for _ in range(STEPS):
            acts = subject(augment(x_tr[next(order)], gen))
            codes, aux_codes = sae(acts)
            probe.observe(latents=codes, centred=acts - sae.pre_bias.detach(),
                          groups=codes.argmax(1))
            recons = sae.decode(codes)
            losses = {"recons": normalized_mse(recons, acts)}
            if published:
                residual = acts - recons.detach() + sae.pre_bias.detach()
                losses["auxk"] = normalized_mse(sae.decode(aux_codes), residual)
            probe.backward(losses, weights={"auxk": AUXK_COEF} if published else None)
            with torch.no_grad():
                columns = sae.decoder.weight
                columns.grad -= (columns * columns.grad).sum(0) * columns
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                sae.decoder.weight.div_(sae.decoder.weight.norm(dim=0))
    with torch.no_grad():
        acts = subject(torch.cat([x_tr, x_te]))
        codes, _ = sae(acts)
        nmse = normalized_mse(sae.decode(codes), acts)
    dead = int(((codes > 1e-3).sum(0) == 0).sum())
    return {"dead_latents": dead, "latents": LATENTS, "dead_fraction": dead / LATENTS,
            "nmse": float(nmse)}


_MUST_NOT = ("inert-loss", "non-finite")

FAMILY = Family(
    name="topk-sae",
    source="Gao et al. 2024, TopK sparse autoencoders with AuxK (arXiv 2406.04093, sec. 2.3-2.4); "
           "openai/sparse_autoencoder sparse_autoencoder/train.py",
    train=train,
    variants=(
        Variant("auxk", True,
                "b_pre at the activations' median, tied encoder, AuxK 1/32 on the dead latents, "
                "as published: about three quarters of the latents fire",
                must_not=_MUST_NOT + ("prototype-collapse", "representation-collapse")),
        Variant("no-auxk-zero-bias", False,
                "no AuxK, b_pre at 0 and an untied default encoder: the latents aligned with the "
                "activations' mean take every top k, 93% of the dictionary never fires",
                expected=(Expect("prototype-collapse", "dictionary"),),
                allowed=(Expect("representation-collapse", "latents"),
                         Expect("prototype-stale", "dictionary")),
                must_not=_MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("auxk", 1), ("no-auxk-zero-bias", 1)),
)
