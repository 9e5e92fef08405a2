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
    anchors: Tensor, positives: Tensor, temperature: float = 0.1, groups: Tensor | None = None,
    negatives: Tensor | None = None, negative_groups: Tensor | None = None,
    mask_same_group: bool = False,
) -> dict[str, float]:
    r"""How much signal an InfoNCE batch carries (van den Oord et al. 2018; SimCLR).

    ``logits = normalize(anchors) @ normalize(positives)^T / temperature``; the
    positive of anchor i is column i, the other n - 1 columns are its in-batch negatives.
    ``negatives`` (m, d), when given, are extra negatives shared by every anchor (a
    cross-batch memory bank, MoCo-style queue): their logits are appended as m more
    columns, so each anchor has K = n - 1 + m negatives.

    ``mask_same_group`` (needs ``groups``; and ``negative_groups`` for the extra
    negatives): negatives from the anchor's own group are *removed*, as
    ``gradprobe.remedies.info_nce(..., groups=...)`` does -- the statistics then describe
    the negatives the loss actually uses. K_i (the number of negatives of anchor i) may
    then differ between anchors; an anchor left without any negative is skipped.

    * ``loss``: ``mean_i [logsumexp_j logits_ij - logits_ii]`` over the kept candidates (the
      InfoNCE loss; equal to ``info_nce`` with the same negatives and masking);
    * ``loss_ratio``: ``mean_i loss_i / log(K_i + 1)``; ~1 means the batch tells positives
      and negatives apart no better than chance (also the value of random embeddings
      at a high temperature), ~0 means solved;
    * ``gap``: ``mean_i [logits_ii - max_{j != i} logits_ij]`` (> 0: positive beats the
      hardest negative);
    * ``effective_negatives``: ``mean_i 1 / sum_{j != i} r_ij^2`` with ``r_i`` the softmax
      of anchor i's negative logits - how many negatives actually carry gradient
      (Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021);
      range [1, K];
    * ``top1_accuracy`` (extra): share of anchors whose positive has the largest logit;
    * ``num_negatives`` (extra): mean K_i (n - 1 + m without masking);
    * ``same_group_negative_share``: only when ``groups`` (n integer ids) is given:
      ``mean_i #{negatives j of i with group_j = group_i} / K_i`` over the negatives used -
      1.0 for single-group batches without extra negatives (every negative comes from the
      anchor's own cell line), 0.0 when same-group negatives are masked out. Extra
      negatives without ``negative_groups`` count as unknown: the share is then computed
      over the in-batch negatives only when ``mask_same_group`` is off, and the key is
      absent when no negative of known group remains. The key is absent when ``groups``
      is None.

    Zero rows stay zero after normalisation. Requires at least one negative for some
    anchor, else ``ValueError``. Cost O(n (n + m) d).
    """
    temperature = check_positive_float(temperature, "temperature")
    a = as_matrix(anchors, "anchors")
    p = as_matrix(positives, "positives").to(a.device)
    if a.shape != p.shape:
        raise ValueError(f"anchors and positives must have the same shape (n, d), got {tuple(a.shape)} and {tuple(p.shape)}")
    n = a.shape[0]
    extra = None
    if negatives is not None:
        extra = as_matrix(negatives, "negatives").to(a.device, a.dtype) if len(negatives) else None
        if extra is not None and extra.shape[1] != a.shape[1]:
            raise ValueError(f"negatives must have {a.shape[1]} columns like the anchors, got {tuple(extra.shape)}")
    m = 0 if extra is None else extra.shape[0]
    if n < 2 and m == 0:
        raise ValueError(f"contrastive_signal needs at least 2 rows (one positive and >= 1 negative), got n = {n}")
    if mask_same_group and groups is None:
        raise ValueError("mask_same_group needs groups")
    g = as_labels(groups, "groups", n).to(a.device) if groups is not None else None
    ng = None
    if negative_groups is not None and m > 0:
        ng = as_labels(negative_groups, "negative_groups", m).to(a.device)
    if mask_same_group and m > 0 and ng is None:
        raise ValueError("mask_same_group with extra negatives needs negative_groups")

    an = l2_normalize_rows(a)
    logits = (an @ l2_normalize_rows(p).T) / temperature                         # [n, n]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    is_neg = ~eye                                                                # candidate j is a negative of i
    same = (g[:, None] == g[None, :]) & ~eye if g is not None else None          # same-group negatives
    known = torch.ones_like(is_neg)                                              # group of the negative known
    if m > 0:
        logits = torch.cat([logits, (an @ l2_normalize_rows(extra).T) / temperature], dim=1)
        is_neg = torch.cat([is_neg, torch.ones(n, m, dtype=torch.bool, device=a.device)], dim=1)
        if g is not None:
            extra_same = (g[:, None] == ng[None, :]) if ng is not None else \
                torch.zeros(n, m, dtype=torch.bool, device=a.device)
            same = torch.cat([same, extra_same], dim=1)
            known = torch.cat([known, torch.full((n, m), ng is not None, dtype=torch.bool,
                                                 device=a.device)], dim=1)
    if mask_same_group:
        is_neg = is_neg & ~same
    k_i = is_neg.sum(dim=1)                                                      # negatives per anchor
    keep = k_i > 0
    if not bool(keep.any()):
        raise ValueError("contrastive_signal: no anchor has a negative (all were masked as same-group)")
    pos = torch.diagonal(logits[:, :n])
    cand = logits.masked_fill(~(is_neg | torch.cat(
        [eye, torch.zeros(n, m, dtype=torch.bool, device=a.device)], dim=1)), -math.inf)
    loss_i = torch.logsumexp(cand, dim=1) - pos
    neg = logits.masked_fill(~is_neg, -math.inf)
    hardest = neg.max(dim=1).values
    r = torch.softmax(neg[keep], dim=1)
    eff = 1.0 / (r * r).sum(dim=1)
    kf = k_i[keep].to(loss_i.dtype)
    out: dict[str, Any] = {
        "loss": float(loss_i[keep].mean()),
        "loss_ratio": float((loss_i[keep] / torch.log(kf + 1)).mean()),
        "gap": float((pos - hardest)[keep].mean()),
        "effective_negatives": float(eff.mean()),
        "top1_accuracy": float((pos > hardest)[keep].double().mean()),
        "num_negatives": float(kf.mean()),
    }
    if g is not None:
        counted = is_neg & known
        c_i = counted.sum(dim=1)
        ok = keep & (c_i > 0)
        if bool(ok.any()):
            share = (same & counted).sum(dim=1)[ok].double() / c_i[ok].double()
            out["same_group_negative_share"] = float(share.mean())
    return out
