"""MDD, Margin Disparity Discrepancy (Zhang, Liu, Long & Jordan 2019, "Bridging Theory and
Algorithm for Domain Adaptation", ICML, sec. 4-5, eqs. 28-29), as Transfer-Learning-Library
writes it (thuml/Transfer-Learning-Library tllib/alignment/mdd.py
``ClassificationMarginDisparityDiscrepancy``, ``ImageClassifier`` and
examples/domain_adaptation/image_classification/mdd.py).

Published method: a feature extractor psi, a classifier f and an adversarial auxiliary
classifier f' reading psi through a gradient reversal layer (TLL's
``WarmStartGradientReverseLayer``, coefficient 0 -> 0.1 over 1,000 iterations). The loss is
``cls_loss + trade_off * transfer_loss`` with ``transfer_loss = -mdd = gamma * CE(f'(x_s),
argmax f(x_s)) - log(1 - softmax(f'(x_t))[argmax f(x_t)])`` (margin gamma = 4, trade_off 1):
f' minimises it (disagreeing with f on the target, agreeing on the source), psi gets its
reversed gradient and f gets none (the pseudo-labels are argmax, no gradient).

Here (CPU budget): the digits and rotated-digits domains of heldout10/adda.py (source = even
training digits, target = odd ones rotated 35 degrees), its MLP encoder and linear head,
an adversarial head 64-64-10; Adam lr 1e-3, batch 64, 300 source-only pretraining steps
(unprobed) then 600 probed steps, the warm start spread over those 600. ``Probe(model)``
with the losses named as the example names them, ``cls_loss`` and ``transfer_loss``.

Truth, measured without gradprobe: as heldout10/adda.py (source and target test accuracy
against source-only training of the same length, and the domain separability of the test
features by a fresh logistic regression); and, every 25 probed steps, on the encoder,
cls_loss's weighted gradient norm over transfer_loss's (``cls_over_transfer``) and their
cosine (``cos_cls_transfer``): medians, with the share of negative cosines; and each
loss's last 10 samples over samples 1-5 (``*_loss_end_over_start``, medians).

Variants (truth by construction):
- ``published``: healthy. Measured, seeds 0 / 1: target accuracy 0.591 / 0.587 against
  source-only 0.449 / 0.433 (+14.2 / +15.3 points), source 0.964 / 0.956 (source-only
  0.978 / 0.978), domain separability 0.992 / 0.992 (source-only 0.999 / 0.997); on the
  encoder cls_over_transfer 1.20 / 1.27, cosine -0.73 / -0.69 (negative on every check);
  cls_loss rises from its pretrained floor (end over start 6.4 / 8.2, transfer_loss 4.3 /
  3.8) while source accuracy stays at 0.96:
  the reversed adversary opposes the classifier by design (the minimax), and that is the
  method. Must not: ``inert-loss``, ``gradient-conflict``, ``gradient-swamping``,
  ``static-loss-weights``.
- ``trade-off-100``: broken. trade_off 100 instead of 1, fixed: the reversed adversarial
  gradient overpowers the source classifier. Measured, seeds 0 / 1: source accuracy
  0.378 / 0.402 (source-only 0.978 / 0.978), target 0.162 / 0.202 (source-only
  0.449 / 0.433; -28.7 / -23.1 points); on the encoder cls_over_transfer 0.29 / 0.32 (not
  below 0.1: not swamped by that measure), cosine -0.39 / -0.49, negative on 96% / 100% of
  the checks; cls_loss end over start 1.70 / 1.82 while transfer_loss holds (0.95 / 1.00):
  the classifier is held off its fit. Expected: ``gradient-conflict`` on ``cls_loss|transfer_loss`` and
  ``static-loss-weights`` naming ``cls_loss`` (the suffering loss, as the rule names it).
  Must not: ``inert-loss``.

CPU: about 5-8 seconds a run (probed fit plus the unprobed source-only reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, fit_classifier, loss_end_over_start
from ..harness import Expect, Family, Variant
from .adda import Classifier, domains, evaluate

PRETRAIN_STEPS, ADAPT_STEPS, BATCH, LR, MARGIN, TRADE_OFF, GRL_HI = 300, 600, 64, 1e-3, 4.0, 1.0, 0.1


class WarmStartReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def grl_coeff(step: int, hi: float = GRL_HI, alpha: float = 1.0) -> float:
    """TLL's WarmStartGradientReverseLayer schedule from 0 to ``hi`` (lo = 0)."""
    return float(2.0 * hi / (1.0 + np.exp(-alpha * step / ADAPT_STEPS)) - hi)


class MDDNet(Classifier):
    def __init__(self):
        super().__init__()
        self.adv_head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def adversarial(self, f, coeff: float):
        return self.adv_head(WarmStartReverse.apply(f, coeff))


def transfer_loss_of(y_s, y_s_adv, y_t, y_t_adv) -> torch.Tensor:
    """Minus TLL's ClassificationMarginDisparityDiscrepancy(margin=4) (mean reduction), as the
    example's ``transfer_loss = -mdd(y_s, y_s_adv, y_t, y_t_adv)``: f' agrees with f on the
    source and disagrees on the target."""
    source_disparity = F.cross_entropy(y_s_adv, y_s.argmax(1))
    p_t = F.softmax(y_t_adv, 1).gather(1, y_t.argmax(1, keepdim=True))
    target_disparity = torch.log((1.0 - p_t).clamp_min(1e-6)).mean()  # shift_log
    return MARGIN * source_disparity - target_disparity


def encoder_gradients(model: MDDNet, losses: dict, weights: dict) -> tuple[float, float]:
    """On the encoder: cls_loss's weighted gradient norm over transfer_loss's, and their cosine."""
    params = list(model.encoder.parameters())
    grads = {name: weights.get(name, 1.0) * torch.cat([g.flatten() for g in torch.autograd.grad(
        loss, params, retain_graph=True)]) for name, loss in losses.items()}
    cls, transfer = grads["cls_loss"], grads["transfer_loss"]
    return float(cls.norm() / transfer.norm()), float(F.cosine_similarity(cls, transfer, dim=0))


def fit(variant: str, seed: int, log: Path | None) -> tuple[MDDNet, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    src_x, src_y, tgt_x, _, _, _ = domains()
    model = MDDNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    src_batches, tgt_batches = batches(len(src_x), BATCH, gen), batches(len(tgt_x), BATCH, gen)
    fit_classifier(model, src_x, src_y, src_batches, PRETRAIN_STEPS, optimizer,
                   logits=lambda out: out[0])
    probe = gradprobe.Probe(model, run_file=log) if log is not None else None
    trade_off = TRADE_OFF_OF[variant]
    series: dict[str, list[float]] = {}
    for step in range(ADAPT_STEPS):
        s, t = next(src_batches), next(tgt_batches)
        y, f = model(torch.cat([src_x[s], tgt_x[t]]))
        cls_loss = F.cross_entropy(y[:BATCH], src_y[s])
        if probe is None:
            cls_loss.backward()
        else:
            y_adv = model.adversarial(f, grl_coeff(step))
            transfer_loss = transfer_loss_of(y[:BATCH], y_adv[:BATCH], y[BATCH:], y_adv[BATCH:])
            losses, weights = {"cls_loss": cls_loss, "transfer_loss": transfer_loss}, {
                "transfer_loss": trade_off}
            if step % TRUTH_EVERY == TRUTH_EVERY - 1:  # the reversal is 0 at step 0
                measured = zip(("cls_over_transfer", "cos_cls_transfer"),
                               encoder_gradients(model, losses, weights))
                for name, value in [*measured, *((n, float(v.detach())) for n, v in losses.items())]:
                    series.setdefault(name, []).append(value)
            probe.backward(losses, weights=weights)
        optimizer.step()
        optimizer.zero_grad()
    if probe is not None:
        probe.close()
    return model, series


TRUTH_EVERY = 25
TRADE_OFF_OF = {"published": TRADE_OFF, "source-only": 0.0, "trade-off-100": 100.0}


def train(variant: str, seed: int, log: Path) -> dict:
    model, series = fit(variant, seed, log)
    acc_source, acc_target, separable = evaluate(model)
    only_source, only_target, only_separable = evaluate(fit("source-only", seed, None)[0])
    return {"acc_source": acc_source, "acc_target": acc_target, "domain_separability": separable,
            "source_only_acc_source": only_source, "source_only_acc_target": only_target,
            "source_only_domain_separability": only_separable,
            "target_gain": acc_target - only_target} | {
                name: float(np.median(v)) for name, v in series.items()
                if not name.endswith("_loss")} | loss_end_over_start(series) | {
                "cos_negative_share": float(np.mean(np.array(series["cos_cls_transfer"]) < 0))}


FAMILY = Family(
    name="mdd",
    source="Zhang et al. 2019 (MDD, ICML, sec. 4-5); thuml/Transfer-Learning-Library "
           "tllib/alignment/mdd.py, examples/domain_adaptation/image_classification/mdd.py",
    train=train,
    variants=(
        Variant("published", True,
                "MDD as TLL writes it: margin 4, trade-off 1, reversal warm-started to 0.1",
                must_not=("inert-loss", "gradient-conflict", "gradient-swamping",
                          "static-loss-weights")),
        Variant("trade-off-100", False,
                "trade_off 100, fixed: the reversed adversarial gradient opposes and outweighs "
                "the classifier's on the encoder; source accuracy falls from 0.98 to 0.38-0.40, "
                "target 23-29 points below source-only (measured)",
                expected=(Expect("gradient-conflict", "cls_loss|transfer_loss"),
                          Expect("static-loss-weights", "cls_loss")),
                must_not=("inert-loss",)),
    ),
    seeds=(0, 1),
    quick=(("published", 1), ("trade-off-100", 1)),
)
