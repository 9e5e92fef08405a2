"""Posterior collapse of a VAE with an autoregressive decoder, and KL cost annealing with word
dropout, after Bowman, Vilnis, Vinyals, Dai, Jozefowicz & Bengio 2016 ("Generating Sentences
from a Continuous Space", CoNLL, arXiv 1511.06349, sec. 3 and 3.1).

Published setup: an LSTM encoder reads the sentence; its last state gives the mean and
log-variance of a Gaussian latent z; z (through a linear map) is the initial state of an LSTM
decoder that predicts each word from the previous words (teacher forcing). The loss is the
negative ELBO, reconstruction cross-entropy plus KL(q(z|x) || N(0, I)). Sec. 3.1: trained as
is, the decoder (strong enough to model the data alone) makes the KL go to 0: the posterior
equals the prior and the latent is ignored. Two fixes: KL cost annealing (the KL's weight
grows from 0 to 1 during training, a sigmoid schedule) and word dropout (a share of the
decoder's previous-word inputs replaced by UNK, so that it must rely on z).

Here (CPU), read as sequences: each 8x8 digit of scikit-learn's digits (``common.digits_split``,
grey levels in [0, 1]) is a sequence of 8 rows of 8 pixels. Encoder: a GRU (hidden 64) over
the rows, its last state -> mean ``mu`` and log-variance of a 16-dimensional z. Decoder: a GRU
(hidden 128) whose initial state is a linear map of z and whose input at row t is row t - 1
(zeros at t = 0, teacher forcing); a linear head gives 8 logits per row, Bernoulli
cross-entropy summed over the pixels (as pytorch/examples' VAE does on grey levels). Batch 128,
Adam lr 1e-3, 500 steps (widths and steps cut to keep a run under 30 CPU-seconds). Losses
passed under the names ``recon`` and ``kl`` (per digit, averaged over the batch), the
posterior mean watched as the latent ``mu`` (docs/probe.md: ``watch_latent("mu",
model.fc_mu)``).

Truth, measured on the test split without gradprobe: active units (Burda, Grosse &
Salakhutdinov 2016: Var_x(E_q[z_u]) > 0.01, of 16), the mean KL per digit, the reconstruction
cross-entropy per digit, and the accuracy of a logistic-regression probe of ``mu`` on the digit
label (``common.linear_probe_accuracy``; it standardises the features, so even a nearly
collapsed ``mu`` may keep some label information).

Variants (truth by construction):
- ``annealed``: healthy, Bowman's recipe: the KL weight rises linearly from 0 to 1 over the
  first 300 steps (the paper's schedule is a sigmoid; linear is its common variant), and
  each previous row fed to the decoder is replaced by zeros with probability 0.75.
- ``plain``: the ELBO as is, weight 1 from the start, no row dropout: the decoder predicts
  each row from the rows before and the KL drives the posterior onto the prior.
Measured (seeds 0 / 1, one thread, 12-15 CPU-seconds a run):
  annealed: 8 / 12 of 16 units active, test KL 0.27 / 0.25 nats a digit, reconstruction
            24.65 / 24.67 nats a digit, probe of mu 0.789 / 0.729.
  plain:    0 / 0 units active, test KL 0.0023 / 0.0020 nats (the posterior is the prior),
            reconstruction 22.78 / 22.86 (the decoder alone models the rows better than the
            annealed model with its dropped context), probe of mu 0.844 / 0.849.
The probe of mu does not separate the variants: it standardises mu, and a collapsed encoder's
mean still varies (by less than 0.01, below the active-unit threshold) with the digit; the
decoder ignores it (KL ~0). Active units and the KL are the truth here.
Construction changed while measuring: with row dropout 0.5 the annealed model collapsed too
(1 / 8 units active, KL 0.02 / 0.10 nats: the row decoder is strong); dropout 0.75 keeps
units active on both seeds (1.0, no context at all, did as well: 8 / 11 units, KL 0.36 /
0.34). The annealed latent stays weak (a fraction of a nat), as Bowman et al. report for
their language model; it is used, the plain one is not.
Expected on ``plain``: ``representation-collapse`` on ``mu`` (no unit of the posterior mean
varies with the input). Must not (both): ``gradient-conflict`` (reconstruction and KL oppose
each other by the ELBO's design), ``inert-loss``; on ``annealed`` also
``representation-collapse``, ``gradient-swamping``, ``static-loss-weights`` (its KL weight is
annealed, not fixed). A fixed KL weight of 1 is what annealing fixes, so
``static-loss-weights`` is not forbidden on ``plain``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, digits_split, linear_probe_accuracy
from ..harness import Expect, Family, Variant

STEPS, BATCH, LR, LATENT, ANNEAL, ROW_DROP = 500, 128, 1e-3, 16, 300, 0.75
ENC, DEC = 64, 128  # GRU widths
ROWS = COLS = 8


class RowVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.GRU(COLS, ENC, batch_first=True)
        self.fc_mu = nn.Linear(ENC, LATENT)
        self.fc_logvar = nn.Linear(ENC, LATENT)
        self.fc_init = nn.Linear(LATENT, DEC)
        self.decoder = nn.GRU(COLS, DEC, batch_first=True)
        self.head = nn.Linear(DEC, COLS)

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, last = self.encoder(rows)
        return self.fc_mu(last[0]), self.fc_logvar(last[0])

    def decode(self, z: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        out, _ = self.decoder(previous, torch.tanh(self.fc_init(z))[None])
        return self.head(out)

    def forward(self, rows: torch.Tensor, drop: float, gen: torch.Generator):
        mu, logvar = self.encode(rows)
        z = mu + torch.randn(mu.shape, generator=gen) * (0.5 * logvar).exp()
        previous = F.pad(rows[:, :-1], (0, 0, 1, 0))
        if drop > 0:  # word dropout: the decoder loses some of its context and must use z
            keep = torch.rand(previous.shape[:2], generator=gen) >= drop
            previous = previous * keep[..., None]
        return self.decode(z, previous), mu, logvar


def elbo_terms(logits, rows, mu, logvar) -> dict[str, torch.Tensor]:
    n = rows.shape[0]
    recon = F.binary_cross_entropy_with_logits(logits, rows, reduction="sum") / n
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / n
    return {"recon": recon, "kl": kl}


def kl_weight(variant: str, step: int) -> float:
    return min(1.0, step / ANNEAL) if variant == "annealed" else 1.0


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    rows_tr, rows_te = x_tr.view(-1, ROWS, COLS), x_te.view(-1, ROWS, COLS)
    model = RowVAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    drop = ROW_DROP if variant == "annealed" else 0.0
    probe = gradprobe.Probe(model, run_file=log)
    probe.watch_latent("mu", model.fc_mu)
    with probe:
        for step, idx in zip(range(STEPS), batches(len(x_tr), BATCH, gen)):
            logits, mu, logvar = model(rows_tr[idx], drop, gen)
            probe.backward(elbo_terms(logits, rows_tr[idx], mu, logvar),
                           weights={"recon": 1.0, "kl": kl_weight(variant, step)})
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        mu_tr, _ = model.encode(rows_tr)
        logits, mu, logvar = model(rows_te, 0.0, gen)
        terms = elbo_terms(logits, rows_te, mu, logvar)
    return {"active_units": int((mu.var(0) > 0.01).sum()), "test_kl": float(terms["kl"]),
            "test_recon": float(terms["recon"]),
            "mu_probe_acc": linear_probe_accuracy(mu_tr.numpy(), y_tr.numpy(), mu.numpy(),
                                                  y_te.numpy())}


MUST_NOT = ("gradient-conflict", "inert-loss")
MUST_NOT_HEALTHY = MUST_NOT + ("representation-collapse", "gradient-swamping",
                               "static-loss-weights")

FAMILY = Family(
    name="kl_annealing_vae",
    source="Bowman et al. 2016, Generating Sentences from a Continuous Space (CoNLL, arXiv "
           "1511.06349) sec. 3.1: KL cost annealing and word dropout against posterior collapse",
    train=train,
    variants=(
        Variant("annealed", True, "KL weight annealed 0 -> 1 and 3/4 of the decoder's "
                "previous rows dropped: the latent stays in use",
                must_not=MUST_NOT_HEALTHY),
        Variant("plain", False,
                "the ELBO at KL weight 1 from the start, no row dropout: the autoregressive "
                "decoder models the rows alone and the posterior collapses onto the prior",
                expected=(Expect("representation-collapse", "mu"),), must_not=MUST_NOT),
    ),
    seeds=(0, 1),
    quick=(("annealed", 1), ("plain", 1)),
)
