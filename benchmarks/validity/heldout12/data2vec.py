"""data2vec, after Baevski, Hsu, Xu, Babu, Gu & Auli 2022 ("data2vec: A General Framework
for Self-supervised Learning in Speech, Vision and Language", ICML; sec. 3.2: the teacher is
an exponential moving average of the student, tau raised linearly from tau_0 to tau_e over
the first tau_n updates and then held, 0.999 to 0.9999 in the paper; sec. 3.3: the student
sees the masked input, the teacher the whole input, and the student regresses, at the
masked time steps, the average of the teacher's top K blocks' outputs, each block's output
(the FFN output before the last residual) instance-normalised over the time steps before
the average, with a smooth L1 loss) and the official code facebookresearch/fairseq:
``examples/data2vec/models/data2vec_audio.py`` (``Data2VecAudioModel.forward``: the
``layer_results`` of the EMA teacher, ``instance_norm_target_layer`` (``F.instance_norm``
on B x C x T), ``average_top_k_layers``, the regression loss ``smooth_l1_loss(...,
beta=loss_beta).sum(-1)`` scaled by 1 / sqrt(D), and ``compute_var`` with
``min_target_var`` / ``min_pred_var``, which stop a run whose targets or predictions lose
their spread), ``get_annealed_rate`` and ``fairseq/modules/ema_module.py`` (``EMAModule``).
Read with the find_string, read_file and search tools (the target code as in the fairseq
data2vec models and their forks).

Published (the audio model's code defaults): K = 8 (``average_top_k_layers``), tau 0.999 ->
0.9999 (``ema_decay``, ``ema_end_decay``, annealed over ``ema_anneal_end_step`` updates by
``get_annealed_rate``), the EMA over the transformer only (``ema_transformer_only``),
masked time steps replaced by ``mask_emb``, ``min_target_var`` 0.1 and ``min_pred_var``
0.01; instance norm of every target layer in the released configurations; one loss (the
regression). The audio configuration's ``loss_beta`` was not checked here (0 gives L2).

Here (CPU): scikit-learn's 8x8 digits (the fixed 75/25 split) as sequences of 16 tokens,
the 2 x 2 patches row by row; a 3-block pre-LN transformer of width 32 (4 heads, FFN 64,
learned positions, a final LayerNorm), K = 2 of 3 blocks (the code's 8 of 12, scaled);
10 of 16 tokens masked at random per image (~0.6), their
embeddings replaced by a learned mask embedding (as fairseq's ``mask_emb``); the teacher
an EMA copy of the whole encoder, tau 0.99 -> 0.999 over the first 200 of 800 steps (the
published rates, one decade faster: a teacher at 0.999 has a memory of 1,000 updates,
longer than this run); smooth L1 with beta 0.25 (chosen here), summed over the dimension,
/ sqrt(D), mean over the masked tokens, through a linear regression head; Adam lr 1e-3,
batch 64.
A second, supervised loss as a user with labels adds one beside the pretraining: the
digit's parity (odd / even) by a linear head on the student's mean-pooled output (on the
masked input it is trained on), cross-entropy at weight 0.1. Losses as passed: ``data2vec``
(first, weight 1) and ``parity`` (0.1). Watched latents: ``encoder`` (the student's
pooled output, labels the digit) and ``prediction`` (the regression head's outputs at the
masked tokens, the rows fairseq's ``pred_var`` watches; labels the digit of each row's
image).

Truth, measured without gradprobe on the test split: a logistic-regression probe on the
pooled output of the unmasked input (``common.linear_probe_accuracy``) and the same probe
on the initial encoder (``init_probe_acc``), the centred effective rank of those features;
on masked test digits fairseq's ``compute_var`` of the predictions and of the teacher's
targets, the predictions' centred effective rank, the parity head's accuracy; the
student's top-K block outputs on unmasked tokens (effective rank and spread); each loss's
level over the last 50 steps.

Variants (truth by construction):
- ``data2vec``: healthy, as published (scaled). Measured, seeds 0 / 1: probe 0.838 / 0.860
  (initial encoder 0.733 / 0.700), rank 14.7 / 14.6 of 32, pred_var 0.46 / 0.51,
  target_var 0.63 / 0.67, prediction rank 11.7 / 11.0, top-K output rank 14.8 / 14.9,
  data2vec loss 1.27 / 1.33, parity 0.68 / 0.69.
- ``no-target-norm``: ``instance_norm_target_layer`` off, the targets the plain average
  of the top-K block outputs. Nothing then fixes the targets' scale: student and teacher
  agree on shrinking the block outputs, the constant representation the paper's
  normalisation is there to prevent (sec. 3.3). Measured, seeds 0 / 1: target_var 0.042 /
  0.030 (below fairseq's ``min_target_var`` 0.1, where a fairseq run stops), pred_var
  0.028 / 0.019 (16-27x below the healthy runs'), prediction rank 7.3 / 8.4, top-K output
  rank 9.7 / 9.4 with spread 0.045 / 0.030 (0.47 / 0.28 of the healthy's), pooled rank
  9.5 / 9.8, probe 0.727 / 0.729 (11-13 points below the healthy runs, no better than the
  initial encoder), parity 0.54 / 0.52 (chance), data2vec loss 0.012 / 0.007 (the loss
  met by the collapse, 100-200x below the healthy runs').
Not a variant: the teacher set to the student (tau 0) with the instance norm kept did not
collapse here (an earlier configuration, parity weight 1, seed 0: probe 0.838 against
0.836, rank 10.2 against 10.2): the normalised targets keep their spread whatever the
teacher.

Runs take 13-17 CPU-seconds (one thread, on a shared machine).

Expected (broken): ``representation-collapse`` on ``prediction`` (its spread falls 16-27x
below the healthy runs' and its rank to 7-8, by the missing normalisation). Allowed:
``representation-collapse`` on ``encoder`` (rank 9.5-9.8 against 14.6-14.7, probe at the
initial encoder's: partly lost), ``gradient-swamping`` and ``static-loss-weights`` on
``data2vec`` (its loss and gradient fade as the collapse satisfies it, beside the parity
term at a fixed weight). Must not (both): ``non-finite``, ``inert-loss``; healthy also
``representation-collapse`` (probe 10-16 points above the initial encoder, ranks kept).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from ..common import batches, centred_effective_rank, digits_split, linear_probe_accuracy
from ..harness import Expect, Family, Variant

DIM, LAYERS, TOP_K, HEADS, PATCH = 32, 3, 2, 4, 2
TOKENS = (8 // PATCH) ** 2
MASKED = 10                      # of 16 patches (~0.6, as the image and audio masks)
STEPS, BATCH, LR = 800, 64, 1e-3
TAU_START, TAU_END, TAU_ANNEAL = 0.99, 0.999, STEPS // 4
LOSS_BETA, PARITY_WEIGHT = 0.25, 0.1
TARGET_NORM = {"data2vec": True, "no-target-norm": False}


def patches(x: torch.Tensor) -> torch.Tensor:
    """(B, 64) digits -> (B, 16, 4): the 2 x 2 patches of the 8 x 8 image, row by row."""
    img = x.view(-1, 8 // PATCH, PATCH, 8 // PATCH, PATCH)
    return img.permute(0, 1, 3, 2, 4).reshape(len(x), TOKENS, PATCH * PATCH)


class Block(nn.Module):
    """A pre-LN transformer block that also returns its FFN output before the residual
    (``fc_results``, the layer output data2vec averages into targets)."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        fc = self.ffn(self.ln2(x))
        return x + fc, fc


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(PATCH * PATCH, DIM)
        self.pos = nn.Parameter(0.02 * torch.randn(TOKENS, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(DIM)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                mask_emb: torch.Tensor | None = None):
        h = self.embed(tokens)
        if mask is not None:
            h = torch.where(mask[..., None], mask_emb, h)
        h = h + self.pos
        fc_results = []
        for block in self.blocks:
            h, fc = block(h)
            fc_results.append(fc)
        return self.ln(h), fc_results


class Data2Vec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.mask_emb = nn.Parameter(torch.empty(DIM).uniform_())
        self.regression_head = nn.Linear(DIM, DIM)
        self.parity_head = nn.Linear(DIM, 2)


def make_targets(fc_results: list[torch.Tensor], norm: bool) -> torch.Tensor:
    """The average of the top K layers' outputs, each instance-normalised over the time steps
    (``instance_norm_target_layer``) when ``norm``."""
    y = fc_results[-TOP_K:]
    if norm:
        y = [F.instance_norm(t.transpose(1, 2)).transpose(1, 2) for t in y]
    return sum(y) / len(y)


def d2v_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (beta 0.25) summed over the dimension, scaled by 1 / sqrt(D), mean over the
    masked time steps (``compute_d2v_loss`` with ``loss_scale`` None)."""
    loss = F.smooth_l1_loss(pred, target, reduction="none", beta=LOSS_BETA).sum(-1)
    return (loss / math.sqrt(pred.size(-1))).mean()


def ema_decay(step: int) -> float:
    if step >= TAU_ANNEAL:
        return TAU_END
    return TAU_START + (TAU_END - TAU_START) * step / TAU_ANNEAL


@torch.no_grad()
def ema_step(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(tau).add_(s.detach(), alpha=1 - tau)


def fairseq_var(z: torch.Tensor) -> float:
    """``Data2VecAudioModel.compute_var``: the per-dimension std over the rows, averaged
    (``min_target_var`` 0.1 and ``min_pred_var`` 0.01 stop a fairseq run below them)."""
    return float(torch.sqrt(z.var(0) + 1e-6).mean())


def random_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    order = torch.rand(n, TOKENS, generator=gen).argsort(1)
    return order < MASKED


@torch.no_grad()
def features(model: Data2Vec, x: torch.Tensor) -> np.ndarray:
    return model.encoder(patches(x))[0].mean(1).numpy()


@torch.no_grad()
def masked_truth(model: Data2Vec, teacher: Encoder, x: torch.Tensor, y: torch.Tensor,
                 norm: bool, gen: torch.Generator) -> dict[str, float]:
    """On masked test digits: the spread of the predictions and of the teacher's targets
    (fairseq's ``pred_var`` and ``target_var``), the predictions' centred effective rank, the
    parity head's accuracy (on the masked inputs it was trained on), and the student's
    top-K layer outputs on unmasked inputs (token rows)."""
    tokens, mask = patches(x), random_mask(len(x), gen)
    target = make_targets(teacher(tokens)[1], norm)[mask]
    out = model.encoder(tokens, mask, model.mask_emb)[0]
    pred = model.regression_head(out[mask])
    top = (sum(model.encoder(tokens)[1][-TOP_K:]) / TOP_K).reshape(-1, DIM)
    return {"pred_var": fairseq_var(pred), "target_var": fairseq_var(target),
            "pred_rank": centred_effective_rank(pred.numpy()),
            "parity_acc": float((model.parity_head(out.mean(1)).argmax(1) == y % 2)
                                .float().mean()),
            "top_layers_token_rank": centred_effective_rank(top.numpy()),
            "top_layers_std": fairseq_var(top)}


def train(variant: str, seed: int, log: Path) -> dict:
    norm = TARGET_NORM[variant]
    x_tr, y_tr, x_te, y_te = digits_split()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Data2Vec()
    teacher = copy.deepcopy(model.encoder).requires_grad_(False)
    init_tr, init_te = features(model, x_tr), features(model, x_te)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = batches(len(x_tr), BATCH, gen)
    weights = {"data2vec": 1.0, "parity": PARITY_WEIGHT}
    series = {k: [] for k in weights}
    with gradprobe.Probe(model, run_file=log) as probe:
        probe.watch_latent("encoder", labels="digit")
        probe.watch_latent("prediction", labels="digit_masked")
        for step in range(STEPS):
            idx = next(order)
            tokens = patches(x_tr[idx])
            mask = random_mask(len(idx), gen)
            with torch.no_grad():
                y = make_targets(teacher(tokens)[1], norm)
            out, _ = model.encoder(tokens, mask, model.mask_emb)
            pooled = out.mean(1)
            pred = model.regression_head(out[mask])
            probe.observe(encoder=pooled, digit=y_tr[idx], prediction=pred,
                          digit_masked=y_tr[idx][:, None].expand(-1, TOKENS)[mask])
            losses = {"data2vec": d2v_loss(pred, y[mask]),
                      "parity": F.cross_entropy(model.parity_head(pooled), y_tr[idx] % 2)}
            for k in losses:
                series[k].append(losses[k].item())
            probe.backward(losses, weights=weights)
            opt.step()
            opt.zero_grad()
            ema_step(teacher, model.encoder, ema_decay(step))
    f_tr, f_te = features(model, x_tr), features(model, x_te)
    return {"probe_acc": linear_probe_accuracy(f_tr, y_tr.numpy(), f_te, y_te.numpy()),
            "init_probe_acc": linear_probe_accuracy(init_tr, y_tr.numpy(), init_te,
                                                    y_te.numpy()),
            "effective_rank": centred_effective_rank(f_te),
            **masked_truth(model, teacher, x_te, y_te, norm, gen),
            **{f"{k}_loss_end": float(np.mean(v[-50:])) for k, v in series.items()}}


FAMILY = Family(
    name="data2vec",
    source="Baevski et al. 2022 (data2vec, ICML, sec. 3.2-3.3: EMA teacher, top-K "
           "instance-normalised targets, smooth L1); facebookresearch/fairseq "
           "examples/data2vec/models/data2vec_audio.py, fairseq/modules/ema_module.py",
    train=train,
    variants=(
        Variant("data2vec", True,
                "masked regression of the EMA teacher's instance-normalised top-K block "
                "outputs, with a parity head at 0.1: probe 0.84-0.86 against 0.70-0.73 for "
                "the initial encoder, prediction spread 0.46-0.51 (measured)",
                must_not=("non-finite", "inert-loss", "representation-collapse")),
        Variant("no-target-norm", False,
                "targets without the instance normalisation: the block outputs shrink in "
                "student and teacher alike, prediction spread 0.019-0.028 (16-27x less), "
                "probe back to the initial encoder's (measured)",
                expected=(Expect("representation-collapse", "prediction"),),
                allowed=(Expect("representation-collapse", "encoder"),
                         Expect("gradient-swamping", "data2vec"),
                         Expect("static-loss-weights", "data2vec")),
                must_not=("non-finite", "inert-loss")),
    ),
    seeds=(0, 1),
    quick=(("data2vec", 1), ("no-target-norm", 1)),
)
