"""Adversarial autoencoder, after Makhzani, Shlens, Jaitly, Goodfellow & Frey 2016
("Adversarial Autoencoders", ICLR 2016 workshop; arXiv 1511.05644, sec. 2: an autoencoder
whose latent code q(z) is matched to a prior p(z) by a GAN played on the latent; each
mini-batch a *reconstruction phase* (encoder and decoder minimise the reconstruction error)
and a *regularisation phase* (the discriminator learns to tell prior samples from encoded
ones, then the encoder, as the generator, learns to fool it); sec. 2.1: a Gaussian prior),
as the most-used PyTorch port writes it: eriklindernoren/PyTorch-GAN
``implementations/aae/aae.py`` (``Encoder``, ``Decoder``, ``Discriminator``; the training
loop: ``g_loss = 0.001 * adversarial_loss(discriminator(encoded_imgs), valid) + 0.999 *
pixelwise_loss(decoded_imgs, real_imgs)`` with ``adversarial_loss = BCELoss()`` and
``pixelwise_loss = L1Loss()``, one Adam ``optimizer_G`` over encoder and decoder; then
``d_loss = 0.5 * (BCE(D(z ~ N(0, I)), valid) + BCE(D(encoded_imgs.detach()), fake))`` with
its own ``optimizer_D``; Adam lr 2e-4, betas (0.5, 0.999), batch 64, images normalised to
[-1, 1], tanh output, latent 100, hidden 512). The port joins the paper's two phases in one
generator step (reconstruction + adversarial term, one backward); the discriminator step
follows. neale/Adversarial-Autoencoder (``train.py``) was read too: it trains a WGAN-GP on
images beside an autoencoder, not the latent game of the paper, so it is not the source.

Here (CPU budget): scikit-learn's 8x8 digits (common.digits_split) in [-1, 1]; the port's
MLPs scaled to 64 inputs (encoder 64 -> 256 -> 256 (batch norm) -> 8, LeakyReLU 0.2; decoder
mirrored with tanh; discriminator 8 -> 128 -> 64 -> 1, sigmoid), latent 8, prior N(0, I);
batch 64, Adam betas (0.5, 0.999), lr 1e-3 (the port's 2e-4 over 200 MNIST epochs; 3000
steps here), the port's weights 0.999 / 0.001. ``Probe(autoencoder)`` (encoder and decoder,
the port's ``optimizer_G`` parameters) with ``pixelwise`` (first, the task) and
``adversarial`` (the generator's BCE against ``valid``), the port's names; the discriminator
is outside the probed model and trains on its own plain backward, as in the port. The
latent ``z`` is watched.

Truth, measured without gradprobe on the test split (450 images) against 450 samples of the
prior: the norm of the latent's mean, its mean per-dimension std, the unbiased squared MMD
(sum of Gaussian kernels, numpy) to the prior (and between two prior samples: the noise
level), the mean Kolmogorov-Smirnov statistic of each dimension against N(0, 1), the
discriminator's mean output on the test latents (0.5: fooled), the test reconstruction L1
and MSE, a digit linear probe on the latent; every 50 steps, over the encoder's parameters
(the only ones both losses reach), |0.001 grad adversarial| / |0.999 grad pixelwise| and the
cosine of the two weighted gradients (``torch.autograd.grad``).

Variants (truth by construction):
- ``published``: healthy, the port's loop. Measured, seeds 0 / 1: latent mean norm 0.29 /
  0.26, std 1.02 / 1.01, MMD^2 to the prior 0.0093 / 0.0088 (prior vs prior 0.0008 /
  -0.0004), KS 0.061 / 0.055, discriminator on test latents 0.26 / 0.27; reconstruction L1
  0.115 / 0.118 (MSE 0.045 / 0.048), as good as without any prior matching (the detached
  variant below: 0.114 / 0.115); digit probe 0.95 / 0.92; centred effective rank 7.95 / 7.95
  of 8. The latent matches the prior and the reconstructions are kept. The adversarial term's
  weighted gradient is 4.3% / 4.2% of the pixelwise term's on the encoder (median), cosine
  -0.11 / -0.14; the generator's adversarial loss 1.28 / 1.25 (first 200 steps) -> 1.75 /
  1.73 (last 200), the discriminator's 0.39 (a game, not a win). Must not:
  ``gradient-swamping`` (the small weight is the port's balance, and the latent matches the
  prior), ``static-loss-weights``, ``inert-loss``, ``gradient-conflict``,
  ``representation-collapse``, ``non-finite``.
- ``detached-latent``: broken. The generator's term reads ``discriminator(encoded.detach())``
  (the detach of the discriminator step copied into the generator step): its gradient
  reaches only the discriminator, outside the probed model, and the encoder never gets the
  regularisation; the run is a plain autoencoder beside a discriminator that wins. Measured,
  seeds 0 / 1: latent mean norm 1.13 / 0.88, std 2.39 / 2.21, MMD^2 to the prior 0.573 /
  0.477 (60 / 54 times published), KS 0.251 / 0.231, discriminator on test latents 0.04 /
  0.05 (it tells them from the prior), generator adversarial loss 1.73 / 1.70 -> 10.9 / 9.0;
  reconstruction L1 0.114 / 0.115, digit probe 0.96 / 0.93, rank 7.84 / 7.85 of 8 (the
  latent keeps its information: the harm is the prior mismatch). Weighted gradient of the
  adversarial term on the encoder: exactly 0. Expected: ``inert-loss`` on ``adversarial``
  (meant to shape the encoder, it reaches no parameter of the probed model). Allowed:
  ``gradient-swamping`` on ``adversarial`` (true by the numbers: 0 of the pixelwise
  gradient). Must not: ``static-loss-weights``, ``gradient-conflict``,
  ``representation-collapse``, ``non-finite``.
- ``adv-weight-1e-6``: broken. The adversarial weight 1e-6 (the pixelwise 1 - 1e-6), a
  thousandth of the port's: the term still reaches the encoder, but its gradient is a
  fraction 2e-4 of the reconstruction's there (median, seeds 0 / 1: 0.0002 / 0.0002, cosine
  -0.03 / -0.04) and the encoder ignores it. Measured, seeds 0 / 1: latent mean norm 1.19 /
  0.79, std 2.38 / 2.20, MMD^2 to the prior 0.572 / 0.473, KS 0.256 / 0.228, discriminator
  on test latents 0.04 / 0.05, generator adversarial loss 1.75 / 1.70 -> 10.8 / 9.2 (the
  discriminator wins: not at chance); reconstruction L1 0.113 / 0.113, digit probe 0.95 /
  0.94, rank 7.83 / 7.86 of 8: as unregularised as the detached latent. Expected:
  ``gradient-swamping`` on ``adversarial`` (drowned by the reconstruction on the encoder
  while its own loss rises sixfold) and ``static-loss-weights`` on ``adversarial`` (the
  fixed weight is the cause). Must not: ``inert-loss`` (it reaches the encoder),
  ``gradient-conflict``, ``representation-collapse``, ``non-finite``.

CPU: about 11-12.5 seconds a run (1 thread).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import gradprobe

from ..common import batches, centred_effective_rank, digits_split, linear_probe_accuracy
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, BETAS = 3000, 64, 1e-3, (0.5, 0.999)
LATENT, HIDDEN = 8, 256
TRUTH_EVERY = 50  # steps between the independent gradient measurements
ADV_WEIGHT = {"published": 0.001, "detached-latent": 0.001, "adv-weight-1e-6": 1e-6}


class Encoder(nn.Module):
    """aae.py ``Encoder``: Linear, LeakyReLU 0.2, Linear, BatchNorm, LeakyReLU 0.2, Linear."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(64, HIDDEN), nn.LeakyReLU(0.2),
                                   nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN),
                                   nn.LeakyReLU(0.2), nn.Linear(HIDDEN, LATENT))

    def forward(self, x):
        return self.model(x)


class Decoder(nn.Module):
    """aae.py ``Decoder``: the encoder's layers mirrored, a tanh output in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.LeakyReLU(0.2),
                                   nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN),
                                   nn.LeakyReLU(0.2), nn.Linear(HIDDEN, 64), nn.Tanh())

    def forward(self, z):
        return self.model(z)


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Encoder(), Decoder()


def discriminator() -> nn.Module:
    """aae.py ``Discriminator`` on the latent: 512 -> 256 -> 1 there, sigmoid output."""
    return nn.Sequential(nn.Linear(LATENT, 128), nn.LeakyReLU(0.2), nn.Linear(128, 64),
                         nn.LeakyReLU(0.2), nn.Linear(64, 1), nn.Sigmoid())


def encoder_ratio_and_cosine(ae: AutoEncoder, losses: dict, weights: dict
                             ) -> tuple[float, float]:
    """|w_adv grad adversarial| / |w_pix grad pixelwise| over the encoder's parameters (the
    only ones both reach), and the cosine of the two, by ``torch.autograd.grad`` (a loss that
    does not reach the encoder, the detached latent's, has gradient 0 there)."""
    params = list(ae.encoder.parameters())
    grads = {}
    for name, loss in losses.items():
        got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads[name] = weights[name] * torch.cat([
            (torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, got)])
    adv, pix = grads["adversarial"], grads["pixelwise"]
    cosine = F.cosine_similarity(adv, pix, dim=0) if adv.norm() > 0 else torch.tensor(0.0)
    return float(adv.norm() / pix.norm()), float(cosine)


def mmd_rbf(a: np.ndarray, b: np.ndarray, scales=(0.5, 1.0, 2.0, 4.0)) -> float:
    """Unbiased squared MMD between two samples with a sum of Gaussian kernels (numpy)."""
    def kernel(x, y):
        d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * s * s * x.shape[1])) for s in scales)
    kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
    n, m = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1))
                 + (kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2 * kab.mean())


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, d_tr, x_te, d_te = digits_split()
    x_tr, x_te = x_tr * 2 - 1, x_te * 2 - 1  # Normalize((0.5,), (0.5,)): images in [-1, 1]
    ae, dis = AutoEncoder(), discriminator()
    opt_g = torch.optim.Adam(ae.parameters(), lr=LR, betas=BETAS)
    opt_d = torch.optim.Adam(dis.parameters(), lr=LR, betas=BETAS)
    weight = ADV_WEIGHT[variant]
    order = batches(len(x_tr), BATCH, gen)
    valid, fake = torch.ones(BATCH, 1), torch.zeros(BATCH, 1)
    d_losses, g_adv, ratios, cosines = [], [], [], []
    probe = gradprobe.Probe(ae, run_file=log)
    probe.watch_latent("z")
    with probe:
        for step in range(STEPS):
            x = x_tr[next(order)]
            # generator step: reconstruction + the discriminator fooled by the encoded latent
            z = ae.encoder(x)
            probe.observe(z=z)
            seen = z.detach() if variant == "detached-latent" else z
            losses = {"pixelwise": F.l1_loss(ae.decoder(z), x),
                      "adversarial": F.binary_cross_entropy(dis(seen), valid)}
            weights = {"pixelwise": 1 - weight, "adversarial": weight}
            if step % TRUTH_EVERY == 0:
                ratio, cosine = encoder_ratio_and_cosine(ae, losses, weights)
                ratios.append(ratio)
                cosines.append(cosine)
            opt_g.zero_grad()
            probe.backward(losses, weights=weights)
            opt_g.step()
            # discriminator step: prior samples are real, the encoded latent (detached) fake
            opt_d.zero_grad()
            prior = torch.randn(BATCH, LATENT, generator=gen)
            d_loss = 0.5 * (F.binary_cross_entropy(dis(prior), valid)
                            + F.binary_cross_entropy(dis(z.detach()), fake))
            d_loss.backward()
            opt_d.step()
            d_losses.append(float(d_loss))
            g_adv.append(float(losses["adversarial"]))
    return latent_truth(ae, dis, x_tr, d_tr, x_te, d_te, seed) | {
        "disc_loss_last200": float(np.mean(d_losses[-200:])),
        "gen_adversarial_loss_first200": float(np.mean(g_adv[:200])),
        "gen_adversarial_loss_last200": float(np.mean(g_adv[-200:])),
        "median_adv_over_pixelwise_grad": float(np.median(ratios)),
        "median_cos_adv_pixelwise": float(np.median(cosines))}


def latent_truth(ae, dis, x_tr, d_tr, x_te, d_te, seed: int) -> dict:
    """How far the test latent is from the N(0, I) prior, and how well it reconstructs."""
    ae.eval()
    dis.eval()
    with torch.no_grad():
        z_tr, z_te = ae.encoder(x_tr), ae.encoder(x_te)
        recon = ae.decoder(z_te)
        d_on_latent = dis(z_te).mean()
    z = z_te.numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    prior, prior2 = rng.standard_normal(z.shape), rng.standard_normal(z.shape)
    ks = [stats.kstest(z[:, k], "norm").statistic for k in range(LATENT)]
    return {"latent_mean_norm": float(np.linalg.norm(z.mean(0))),
            "latent_std_mean": float(z.std(0).mean()),
            "latent_std_max_over_min": float(z.std(0).max() / z.std(0).min()),
            "latent_effective_rank": centred_effective_rank(z),
            "latent_max_abs_corr": float(np.abs(np.corrcoef(z.T) - np.eye(LATENT)).max()),
            "mmd2_to_prior": mmd_rbf(z, prior),
            "mmd2_prior_vs_prior": mmd_rbf(prior2, prior),
            "ks_mean_to_normal": float(np.mean(ks)),
            "disc_on_test_latent": float(d_on_latent),
            "test_recon_l1": float((recon - x_te).abs().mean()),
            "test_recon_mse": float((recon - x_te).pow(2).mean()),
            "latent_digit_linear_acc": linear_probe_accuracy(z_tr.numpy(), d_tr.numpy(),
                                                             z_te.numpy(), d_te.numpy())}


_MUST_NOT = ("gradient-conflict", "representation-collapse", "non-finite")

FAMILY = Family(
    name="adversarial-ae",
    source="Makhzani et al. 2016 (Adversarial Autoencoders, ICLR workshop, sec. 2: "
           "reconstruction and regularisation phases, a latent discriminator against a "
           "Gaussian prior); eriklindernoren/PyTorch-GAN implementations/aae/aae.py "
           "(g_loss 0.001 adversarial + 0.999 pixelwise L1, d_loss on detached codes)",
    train=train,
    variants=(
        Variant("published", True,
                "the port's loop (adversarial weight 0.001 beside the L1 reconstruction): the "
                "latent matches the N(0, I) prior (MMD^2 ~0.009) and reconstructs as well as "
                "a plain autoencoder (measured)",
                must_not=_MUST_NOT + ("gradient-swamping", "static-loss-weights",
                                      "inert-loss")),
        Variant("detached-latent", False,
                "the generator's adversarial term reads the detached latent: it reaches only "
                "the discriminator, the encoder is never regularised and the latent misses "
                "the prior (MMD^2 0.48-0.57, std 2.2-2.4) (measured)",
                expected=(Expect("inert-loss", "adversarial"),),
                allowed=(Expect("gradient-swamping", "adversarial"),),
                must_not=_MUST_NOT + ("static-loss-weights",)),
        Variant("adv-weight-1e-6", False,
                "adversarial weight 1e-6: its gradient is 2e-4 of the reconstruction's on "
                "the encoder and the latent misses the prior as if unregularised (measured)",
                expected=(Expect("gradient-swamping", "adversarial"),
                          Expect("static-loss-weights", "adversarial")),
                must_not=_MUST_NOT + ("inert-loss",)),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("detached-latent", 1)),
)
