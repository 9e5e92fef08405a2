"""Strength of an InfoNCE batch's learning signal."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._common import as_labels, as_matrix, check_positive_float, l2_normalize_rows

__all__ = ["contrastive_signal"]


@torch.no_grad()
def contrastive_signal(
    anchors: Tensor, positives: Tensor, temperature: float = 0.1, groups: Tensor | None = None
) -> dict[str, float]:
    r"""How much signal an InfoNCE batch carries (van den Oord et al. 2018; SimCLR).

    ``logits = normalize(anchors) @ normalize(positives)^T / temperature``; the
    positive of anchor i is column i, the other K = n - 1 columns are its negatives.

    * ``loss``: ``mean_i [logsumexp_j logits_ij - logits_ii]`` (the InfoNCE loss);
    * ``loss_ratio``: ``loss / log(K + 1)``; ~1 means the batch tells positives and
      negatives apart no better than chance (also the value of random embeddings
      at a high temperature), ~0 means solved;
    * ``gap``: ``mean_i [logits_ii - max_{j != i} logits_ij]`` (> 0: positive beats the
      hardest negative);
    * ``effective_negatives``: ``mean_i 1 / sum_{j != i} r_ij^2`` with ``r_i`` the softmax
      of anchor i's negative logits - how many negatives actually carry gradient
      (Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021);
      range [1, K];
    * ``top1_accuracy`` (extra): share of anchors whose positive has the largest logit;
    * ``num_negatives`` (extra): K;
    * ``same_group_negative_share``: only when ``groups`` (n integer ids) is given:
      ``mean_i #{j != i: groups_j = groups_i} / K`` - 1.0 for single-group batches
      (every negative comes from the anchor's own cell line). The key is absent when
      ``groups`` is None.

    Zero rows stay zero after normalisation. Requires n >= 2 (at least one
    negative), else ``ValueError``. Cost O(n^2 d).
    """
    temperature = check_positive_float(temperature, "temperature")
    a = as_matrix(anchors, "anchors")
    p = as_matrix(positives, "positives").to(a.device)
    if a.shape != p.shape:
        raise ValueError(f"anchors and positives must have the same shape (n, d), got {tuple(a.shape)} and {tuple(p.shape)}")
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"contrastive_signal needs at least 2 rows (one positive and >= 1 negative), got n = {n}")
    k = n - 1
    logits = (l2_normalize_rows(a) @ l2_normalize_rows(p).T) / temperature
    pos = torch.diagonal(logits)
    loss = float((torch.logsumexp(logits, dim=1) - pos).mean())
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    neg = logits.masked_fill(eye, -math.inf)
    hardest = neg.max(dim=1).values
    r = torch.softmax(neg, dim=1)
    eff = 1.0 / (r * r).sum(dim=1)
    out: dict[str, Any] = {
        "loss": loss,
        "loss_ratio": loss / math.log(k + 1),
        "gap": float((pos - hardest).mean()),
        "effective_negatives": float(eff.mean()),
        "top1_accuracy": float((pos > hardest).double().mean()),
        "num_negatives": float(k),
    }
    if groups is not None:
        g = as_labels(groups, "groups", n).to(a.device)
        same = (g[:, None] == g[None, :]) & ~eye
        out["same_group_negative_share"] = float(same.double().sum(dim=1).mean() / k)
    return out
