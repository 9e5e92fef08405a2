"""The rotation trick for VQ-VAEs (Fifty et al. 2024, "Restructuring Vector Quantization with
the Rotation Trick", arXiv 2410.06424), sec. 4: instead of the straight-through copy q = e +
sg(q - e), the encoder output e is carried onto its code q by a rotation and rescaling treated
as constants, q~ = sg(||q|| / ||e||) sg(R) e with R the rotation taking e/||e|| to q/||q||,
computed as two Householder reflections without forming R: R e = e - 2 (e.w) w + 2 (e.u) q^, u
= e/||e||, q^ = q/||q||, w = (u + q^)/||u + q^||. The forward value is q; the decoder's
gradient reaches e rotated by R^T and scaled, so the angle between the gradient and the code is
carried over to e, and points of one code region move apart or together by where they sit in it
(sec. 4-5: higher codebook usage and lower reconstruction error than the STE). The losses are
those of the VQ-VAE (van den Oord et al. 2017, eq. 3): reconstruction, the codebook loss
||sg(e) - q||^2 and the commitment loss beta ||e - sg(q)||^2, beta 0.25.

Official code: cfifty/rotation_trick ``src/models/vq_vae.py``,
``VQVAE.get_very_efficient_rotation`` (``w = ((u + q) / ||u + q||).detach()``,
``e - 2 (e w) w^T + 2 (e u.detach()) q.detach()^T``) and
``VQVAE.forward(rot=True)`` (the rotated vector times ``(||q|| / ||x||).detach()``, then the
decoder and ``rec_loss = F.mse_loss``, plus the quantiser's ``commit_loss``,
``commitment_weight=args.commit_weight``). That release learns the codebook by EMA (the local
copy of lucidrains' ``VectorQuantize``, decay 0.8); the paper's sec. 4 states the trick on
the VQ-VAE objective, whose codebook loss learns the codebook here (an EMA codebook is
another family, vq-ema).

Published setup: convolutional VQ-VAEs and VQGANs on ImageNet (the release's taming ``Encoder``
/ ``Decoder``), rotation trick against the STE. Here (CPU): scikit-learn's 8x8 digits, the MLP
VQ-VAE of benchmarks/validity/vqvae.py (encoder 64-128-4x16, four 16-d latents per digit,
decoder 4x16-128-64, K = 128 codes, Euclidean nearest code), imported; the codebook drawn
U(-1/K, 1/K) (the VQ-VAE default of the public ports), Adam lr 1e-3, batch 128, 800 steps.
Losses ``reconstruction`` (MSE, first), ``codebook`` and ``commitment`` (weight beta). The
codebook is watched as a codebook user would: ``watch_latent("z_e")``,
``watch_prototypes("codebook", codebook.weight, latent="z_e")`` and ``observe(z_e=...,
groups=codes)``. Probe at its defaults.

Truth, measured without gradprobe on the test digits: codes used, usage perplexity (exp of the
entropy), reconstruction MSE; beside each probed run an unprobed straight-through run of the
same variant (same seed, init, batches, losses): the paper's comparison; and every 20 steps
||beta grad_enc(commitment)|| / ||grad_enc(reconstruction)|| on the encoder's weights by
``torch.autograd.grad`` (first, and median over the second half).

Variants (truth by construction):
- ``published``: healthy, as published (rotation trick, beta 0.25). Measured seeds 0 / 1: 128
  / 128 codes used, perplexity 114.8 / 113.1, reconstruction MSE 0.0199 / 0.0196; the
  straight-through twin 44 / 43 codes, perplexity 33.2 / 32.1, MSE 0.0244 / 0.0275: the
  paper's result (more codes in use, lower error) reproduced. Commitment/reconstruction
  gradient ratio on the encoder 7.1 / 7.8 at step 0 (codes start near 0), median 0.069 /
  0.060 late.
- ``far-codebook``: broken. The codebook drawn N(0, 1) and shifted by +3 in every coordinate
  (norm ~12.6, far from the encoder's outputs): one code is nearest to every encoder
  output, only it is ever moved by the codebook loss, the other 127 never; the rotation cannot
  help a code that is never chosen. Measured seeds 0 / 1: 1 / 1 code used, perplexity 1.0 /
  1.0, reconstruction MSE 0.0742 / 0.0742 (the mean digit's error; published 0.020); the
  straight-through twin the same; the commitment/reconstruction gradient ratio on the
  encoder 0.14 / 0.15 at step 0, median 1.23 / 1.02 late. Expected: ``prototype-collapse``
  on ``codebook``. Allowed: ``prototype-stale`` on ``codebook`` (127 rows never move),
  ``representation-collapse`` on ``z_e`` (every latent pulled to the one code).
A heavier commitment weight was tried as a second broken variant and left out: with this
start, beta 25 / 250 / 2,500 (100-10,000x) still used 116-119 / 108 / 95 codes (seed 0 /
1, seed 0, seed 0) at reconstruction MSE 0.024-0.025 / 0.037 / 0.051: a slower
reconstruction, not a broken codebook.

The healthy run must not raise ``prototype-collapse``, ``prototype-stale``,
``gradient-swamping``, ``gradient-conflict``, ``inert-loss`` or ``static-loss-weights``: the
codebook loss reaches only the codebook (the probe's step-0 note on it is the VQ-VAE's
structure, not a fault), and the large commitment share at step 0 is the near-zero start.

CPU, one thread: 3.3-4.8 s a run (the probed run plus its unprobed straight-through twin).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split, weighted_backward
from ..harness import Expect, Family, Variant
from ..vqvae import CODES, VQVAE, usage_truth

STEPS, BATCH, LR, BETA = 800, 128, 1e-3, 0.25
FAR_OFFSET, RATIO_EVERY = 3.0, 20


def rotate_to(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, sec. 4, as Householder reflections): each
    row of ``e`` rotated onto the direction of its code ``q`` and rescaled to its norm, R and
    the scale treated as constants; forward value ``q``, backward R^T scale grad."""
    e_norm = e.norm(dim=1, keepdim=True).clamp_min(1e-6)
    q_norm = q.norm(dim=1, keepdim=True).clamp_min(1e-6)
    u = (e / e_norm).detach()
    q_hat = (q / q_norm).detach()
    w = F.normalize(u + q_hat, dim=1, eps=1e-6).detach()
    rotated = (e - 2 * (e * w).sum(1, keepdim=True) * w
               + 2 * (e * u).sum(1, keepdim=True) * q_hat)
    return rotated * (q_norm / e_norm).detach()


class RotationVQVAE(VQVAE):
    def forward(self, x):
        z_e = self.encode(x)
        z_q, codes = self.quantise(z_e)
        recon = self.decoder(rotate_to(z_e, z_q).view(len(x), -1))
        return recon, z_e, z_q, codes


def encoder_ratio(model: VQVAE, losses: dict, beta: float) -> float:
    """||beta grad_enc(commitment)|| / ||grad_enc(reconstruction)|| on the encoder's weights,
    by torch.autograd.grad, independently of the probe."""
    params = list(model.encoder.parameters())
    g_rec = torch.autograd.grad(losses["reconstruction"], params, retain_graph=True)
    g_com = torch.autograd.grad(losses["commitment"], params, retain_graph=True)
    norm = lambda grads: torch.sqrt(sum((g ** 2).sum() for g in grads))
    return float(beta * norm(g_com) / norm(g_rec).clamp_min(1e-30))


def fit(variant: str, seed: int, log: Path | None, rotation: bool = True) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, _ = digits_split()
    model = RotationVQVAE() if rotation else VQVAE()
    order = batches(len(x_tr), BATCH, gen)
    with torch.no_grad():
        if variant == "far-codebook":  # N(0, 1) (nn.Embedding's draw) shifted far away
            model.codebook.weight.add_(FAR_OFFSET)
        else:  # the VQ-VAE ports' U(-1/K, 1/K)
            nn.init.uniform_(model.codebook.weight, -1.0 / CODES, 1.0 / CODES)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    probe = gradprobe.Probe(model, run_file=log) if log is not None else None
    if probe is not None:
        probe.watch_latent("z_e")
        probe.watch_prototypes("codebook", model.codebook.weight, latent="z_e")
    ratios = []
    for step, idx in zip(range(STEPS), order):
        x = x_tr[idx]
        recon, z_e, z_q, codes = model(x)
        if probe is not None:
            probe.observe(z_e=z_e, groups=codes)
        losses = {"reconstruction": F.mse_loss(recon, x),
                  "codebook": F.mse_loss(z_q, z_e.detach()),
                  "commitment": F.mse_loss(z_e, z_q.detach())}
        if probe is not None and step % RATIO_EVERY == 0:
            ratios.append(encoder_ratio(model, losses, BETA))
        weighted_backward(losses, {"commitment": BETA}, probe)
        opt.step()
        opt.zero_grad()
    truth = usage_truth(model, x_te)
    if probe is not None:
        probe.close()
        late = ratios[len(ratios) // 2:]
        truth |= {"commit_over_recon_encoder_grad_first": ratios[0],
                  "commit_over_recon_encoder_grad_late_median": float(np.median(late))}
    return truth


def train(variant: str, seed: int, log: Path) -> dict:
    """The probed rotation-trick run, beside an unprobed straight-through run of the same
    variant (same seed, init, batches and losses): the paper's comparison."""
    truth = fit(variant, seed, log)
    reference = fit(variant, seed, None, rotation=False)
    return truth | {f"straight_through_{k}": float(v) for k, v in reference.items()}


FAMILY = Family(
    name="rotation-trick-vq",
    source="Fifty et al. 2024 (Restructuring Vector Quantization with the Rotation Trick, arXiv "
           "2410.06424, sec. 4, VQ-VAE codebook and commitment losses, beta 0.25); "
           "cfifty/rotation_trick src/models/vq_vae.py VQVAE.get_very_efficient_rotation, "
           "VQVAE.forward",
    train=train,
    variants=(
        Variant("published", True,
                "rotation trick as published: all 128 codes in use (perplexity ~114) and a lower "
                "reconstruction error than the straight-through twin's 43-44 codes (measured)",
                must_not=("prototype-collapse", "prototype-stale", "gradient-swamping",
                          "gradient-conflict", "inert-loss", "static-loss-weights")),
        Variant("far-codebook", False,
                "codebook drawn N(0, 1) + 3, far from the encoder outputs: one code takes every "
                "latent, the other 127 never move, reconstruction at the mean digit's error "
                "(measured)",
                expected=(Expect("prototype-collapse", "codebook"),),
                allowed=(Expect("prototype-stale", "codebook"),
                         Expect("representation-collapse", "z_e")),
                must_not=("inert-loss", "non-finite")),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("far-codebook", 1)),
)
