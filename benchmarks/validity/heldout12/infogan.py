"""InfoGAN, after Chen, Duan, Houthooft, Schulman, Sutskever & Abbeel 2016 ("InfoGAN:
Interpretable Representation Learning by Information Maximizing Generative Adversarial Nets",
NeurIPS, arXiv:1606.03657, sec. 5, eq. 5-6, sec. 6 and appendix C) and the most-used PyTorch
port Natsu6767/InfoGAN-PyTorch: ``train.py`` (the training loop: ``optimD`` on
``discriminator`` + ``netD``, ``optimG`` on ``netG`` + ``netQ``; ``gen_loss``, ``dis_loss``,
``G_loss = gen_loss + dis_loss + con_loss``), ``mnist_model.py`` (``Discriminator``, ``DHead``,
``QHead``: D and Q share the discriminator body), ``utils.py`` (``noise_sample``); the
official openai/InfoGAN ``infogan/algos/infogan_trainer.py`` (``InfoGANTrainer.init_opt``:
``generator_loss -= self.info_reg_coeff * mi_est``, the same term added to the discriminator's
loss).

Published method: a GAN whose generator G(z, c) takes, besides the noise z, a latent code c
(for MNIST a categorical code of 10 values); an auxiliary distribution Q(c | x), a head on
the discriminator's body, gives the variational lower bound L_I(G, Q) = E[log Q(c | G(z, c))]
+ H(c) of the mutual information I(c; G(z, c)) (eq. 5); the minimax game is
min_{G,Q} max_D V(D, G) - lambda L_I(G, Q) (eq. 6), lambda 1 for discrete codes (sec. 6).
In the port: Adam lr 2e-4, betas (0.5, 0.999); the D step on real and detached fake samples;
the G/Q step on the non-saturating generator loss BCE(D(G(z, c)), real) plus the
cross-entropy of Q's logits against the sampled code (weight 1), Q reading the
discriminator body's features of the *non-detached* fake batch, so that the information
term reaches the generator. The paper's result (sec. 7.1, Fig. 2): the categorical code
captures the digit class (5% error), i.e. the discrete factor of the data.

Here (CPU budget): 2-D data, a mixture of 8 Gaussians (std 0.05) evenly spaced on a circle of
radius 2 (the toy of the GAN mode-coverage literature); its discrete factor is the mixture
component. Categorical code of 8 values, noise z of 4 dimensions; generator MLP
(4 + 8) -> 128 -> 128 -> 2 (ReLU); discriminator body 2 -> 128 -> 128 (LeakyReLU 0.1), D head
128 -> 1, Q head 128 -> 64 -> 8; Adam lr 1e-3, betas (0.5, 0.999) (the
port's lr 2e-4 gave the same healthy outcome, seed 0: code_mode_match 1.000), batch 128,
2000 steps; the information term in the G/Q step only, as the port has it (the official code
also adds it to the discriminator's loss). Probed: ``Probe`` on the modules ``optimG``
trains (generator and Q head), the G/Q step's backward as ``probe.backward({"gen_loss": ...,
"mi_loss": ...}, weights={"gen_loss": 1, "mi_loss": lambda})``; the D step is a plain
backward of its own optimiser, as in the port.

Truth, measured without gradprobe (seeds 0 / 1): for each code value 256 samples (fresh z)
are assigned to their nearest mixture component; ``code_mode_match`` is the share of samples
in the component matched to their code by the best one-to-one matching (Hungarian), 1 when
each code picks its own component, ~1/8 when the code is ignored; ``code_mode_nmi`` the
normalised mutual information between code and component; ``modes_covered`` (components
holding at least 1/32 of the samples), ``on_mode_share`` (samples within 4 std of their
component) and ``q_acc`` (Q's accuracy on the codes of generated samples).

Variants (truth by construction):
- ``infogan``: healthy, as published (lambda 1, Q on the shared body of the fake batch).
- ``detached-q``: Q reads the body's features of ``fake.detach()``: the information term
  trains Q alone and never reaches the generator, so nothing ties the code to the sample
  (the information term's gradient on the generator is exactly 0).
- ``code-weight-0.1``: the port's continuous-code weight (``con_loss * 0.1`` in train.py)
  given to the categorical code, lambda 0.1 instead of the paper's 1 for discrete codes: the
  information term is too weak against the adversarial one to make the generator use the
  code before the generator settles, and Q, reading samples the code does not shape, gives
  it little gradient after that.
Measured, seeds 0 / 1 (also, every 25 steps, the medians over the run of the cosine between
the two weighted losses' gradients on the generator and of ``mi_loss``'s weighted gradient
norm there over ``gen_loss``'s):
  infogan:         code_mode_match 1.000 / 1.000, code_mode_nmi 1.000 / 1.000, modes 8 / 8,
                   on_mode_share 0.999 / 0.964, q_acc 1.000 / 1.000; cosine -0.19 / +0.14,
                   mi over gen 0.48 / 0.29;
  detached-q:      code_mode_match 0.164 / 0.158, code_mode_nmi 0.010 / 0.008, modes 8 / 7,
                   on_mode_share 0.882 / 0.818, q_acc 0.149 / 0.137 (chance 0.125); mi over
                   gen 0 / 0 (no gradient on the generator);
  code-weight-0.1: code_mode_match 0.404 / 0.177, code_mode_nmi 0.466 / 0.020, modes 8 / 8,
                   on_mode_share 0.896 / 0.735, q_acc 0.504 / 0.168; cosine +0.18 / +0.13,
                   mi over gen 0.067 / 0.004.
At lambda 0.02 and 0.005 the code was ignored on both seeds too (code_mode_match 0.155-0.165).
The healthy run reproduces the paper qualitatively: each categorical value picks its own
mixture component (the discrete factor), every component covered; both broken runs leave
the code (almost) unused while the generator still covers 7-8 of the 8 components.
Runs take 7-8 CPU-seconds at 1 thread.
Expected: ``detached-q``: ``inert-loss`` on ``mi_loss`` (among the probed parameters its
graph reaches only the Q head: the detach cut it off from the generator, and the code goes
unused); ``code-weight-0.1``: ``gradient-swamping`` on ``mi_loss`` (its weighted gradient on
the generator 0.4-7% of the adversarial loss's while its cross-entropy stays far above 0 and
the code goes unused), ``static-loss-weights`` on ``mi_loss`` allowed (the fixed lambda 0.1
is the cause). Must not (all): ``non-finite``; healthy also ``inert-loss``,
``gradient-swamping``, ``gradient-conflict`` (the cosine is -0.19 / +0.14 and the code is
learnt perfectly), ``static-loss-weights``; ``detached-q`` also ``gradient-swamping``,
``gradient-conflict`` (the term has no gradient on the shared generator at all);
``code-weight-0.1`` also ``inert-loss`` (its gradient is small, not zero) and
``gradient-conflict`` (cosines positive).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import gradprobe

from ..harness import Expect, Family, Variant

MODES, RADIUS, STD = 8, 2.0, 0.05
NOISE, BATCH, STEPS, LR, BETAS = 4, 128, 2000, 1e-3, (0.5, 0.999)
# variant -> (lambda of the categorical code, Q reads detached fake features)
VARIANTS = {"infogan": (1.0, False), "detached-q": (1.0, True),
            "code-weight-0.1": (0.1, False)}
EVAL_PER_CODE, GRAD_EVERY = 256, 25


def mode_centres() -> torch.Tensor:
    angles = torch.arange(MODES) * (2 * math.pi / MODES)
    return RADIUS * torch.stack([angles.cos(), angles.sin()], 1)


def real_batch(gen: torch.Generator) -> torch.Tensor:
    component = torch.randint(0, MODES, (BATCH,), generator=gen)
    return mode_centres()[component] + STD * torch.randn(BATCH, 2, generator=gen)


def noise_sample(n: int, gen: torch.Generator, codes: torch.Tensor | None = None):
    """Noise z and a uniform categorical code (``noise_sample`` in utils.py): the generator's
    input (z, one-hot c) and the code indices Q must recover."""
    if codes is None:
        codes = torch.randint(0, MODES, (n,), generator=gen)
    z = torch.randn(n, NOISE, generator=gen)
    return torch.cat([z, F.one_hot(codes, MODES).float()], 1), codes


class Discriminator(nn.Module):
    """The body D and Q share, as mnist_model.Discriminator."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.1), nn.Linear(128, 128),
                                 nn.LeakyReLU(0.1))

    def forward(self, x):
        return self.net(x)


def networks():
    generator = nn.Sequential(nn.Linear(NOISE + MODES, 128), nn.ReLU(), nn.Linear(128, 128),
                              nn.ReLU(), nn.Linear(128, 2))
    d_head = nn.Linear(128, 1)
    q_head = nn.Sequential(nn.Linear(128, 64), nn.LeakyReLU(0.1), nn.Linear(64, MODES))
    return generator, Discriminator(), d_head, q_head


def generator_grads(generator: nn.Module, gen_loss: torch.Tensor,
                    weighted_mi: torch.Tensor) -> tuple[float, float]:
    """Cosine between the two weighted losses' gradients on the generator, and the norm of
    the information term's over the adversarial one's (0 when it does not reach it)."""
    params = list(generator.parameters())
    g = [torch.cat([p.flatten() for p in torch.autograd.grad(
        loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)])
        for loss in (gen_loss, weighted_mi)]
    return (float(F.cosine_similarity(g[0], g[1], 0)),
            float(g[1].norm() / g[0].norm().clamp(min=1e-12)))


def measure(generator, body, q_head, gen: torch.Generator) -> dict:
    codes = torch.arange(MODES).repeat_interleave(EVAL_PER_CODE)
    with torch.no_grad():
        inputs, _ = noise_sample(len(codes), gen, codes)
        samples = generator(inputs)
        q_acc = float((q_head(body(samples)).argmax(1) == codes).float().mean())
    dist = torch.cdist(samples, mode_centres())
    nearest = dist.argmin(1).numpy()
    counts = np.zeros((MODES, MODES))
    np.add.at(counts, (codes.numpy(), nearest), 1)
    rows, cols = linear_sum_assignment(-counts)
    share = np.bincount(nearest, minlength=MODES) / len(nearest)
    return {"code_mode_match": float(counts[rows, cols].sum() / len(nearest)),
            "code_mode_nmi": float(normalized_mutual_info_score(codes.numpy(), nearest)),
            "modes_covered": float((share >= 1 / (4 * MODES)).sum()),
            "on_mode_share": float((dist.min(1).values < 4 * STD).float().mean()),
            "q_acc": q_acc}


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    info_weight, detach_q = VARIANTS[variant]
    generator, body, d_head, q_head = networks()
    opt_d = torch.optim.Adam([*body.parameters(), *d_head.parameters()], lr=LR, betas=BETAS)
    opt_g = torch.optim.Adam([*generator.parameters(), *q_head.parameters()], lr=LR,
                             betas=BETAS)
    ones, zeros = torch.ones(BATCH, 1), torch.zeros(BATCH, 1)
    measured = []
    with gradprobe.Probe(nn.ModuleDict({"generator": generator, "q_head": q_head}),
                         run_file=log) as probe:
        for step in range(STEPS):
            # D step: real against detached fake (loss_real + loss_fake in train.py).
            opt_d.zero_grad()
            inputs, codes = noise_sample(BATCH, gen)
            fake = generator(inputs)
            d_loss = (F.binary_cross_entropy_with_logits(d_head(body(real_batch(gen))), ones)
                      + F.binary_cross_entropy_with_logits(d_head(body(fake.detach())), zeros))
            d_loss.backward()
            opt_d.step()
            # G/Q step: non-saturating generator loss + lambda * the code's cross-entropy.
            opt_g.zero_grad()
            features = body(fake)
            gen_loss = F.binary_cross_entropy_with_logits(d_head(features), ones)
            q_features = body(fake.detach()) if detach_q else features
            mi_loss = F.cross_entropy(q_head(q_features), codes)
            if step % GRAD_EVERY == 0:
                measured.append(generator_grads(generator, gen_loss, info_weight * mi_loss))
            probe.backward({"gen_loss": gen_loss, "mi_loss": mi_loss},
                           weights={"gen_loss": 1.0, "mi_loss": info_weight})
            opt_g.step()
    cosine, ratio = np.median(np.array(measured), 0)
    return {**measure(generator, body, q_head, torch.Generator().manual_seed(seed + 1000)),
            "gen_mi_cosine": float(cosine), "mi_over_gen_grad": float(ratio)}


FAMILY = Family(
    name="infogan",
    source="Chen, Duan, Houthooft, Schulman, Sutskever & Abbeel 2016 (InfoGAN, NeurIPS, eq. "
           "5-6, lambda 1 for discrete codes); Natsu6767/InfoGAN-PyTorch train.py, "
           "mnist_model.py; openai/InfoGAN infogan/algos/infogan_trainer.py",
    train=train,
    variants=(
        Variant("infogan", True,
                "as published: non-saturating generator loss plus the categorical code's "
                "cross-entropy (lambda 1) through Q on the shared discriminator body; each "
                "code value picks its own mixture component",
                must_not=("non-finite", "inert-loss", "gradient-swamping", "gradient-conflict",
                          "static-loss-weights")),
        Variant("detached-q", False,
                "Q reads the features of the detached fake batch: the information term never "
                "reaches the generator and the code is ignored (code/component match 0.16 "
                "against 1.00)",
                expected=(Expect("inert-loss", "mi_loss"),),
                must_not=("non-finite", "gradient-swamping", "gradient-conflict")),
        Variant("code-weight-0.1", False,
                "lambda 0.1 (the port's continuous-code weight) on the categorical code: the "
                "information term's gradient on the generator is 0.4-7% of the adversarial "
                "one's and the code goes (almost) unused (match 0.40 / 0.18 against 1.00)",
                expected=(Expect("gradient-swamping", "mi_loss"),),
                allowed=(Expect("static-loss-weights", "mi_loss"),),
                must_not=("non-finite", "inert-loss", "gradient-conflict")),
    ),
    seeds=(0, 1),
    quick=(("infogan", 1), ("detached-q", 1)),
)
