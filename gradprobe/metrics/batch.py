"""Batch-composition metrics (single-cell-line batches, sampler checks)."""

from __future__ import annotations


from typing import Any

import torch
from torch import Tensor

from ._common import as_labels

__all__ = ["group_diversity"]


@torch.no_grad()
def group_diversity(groups: Tensor) -> dict[str, Any]:
    r"""Diversity of the group ids (cell lines) of one batch.

    * ``distinct``: number of distinct groups (int);
    * ``entropy``: ``-sum_g q_g log q_g`` in nats of the batch's group shares q_g;
    * ``same_group_pair_share``: ``sum_g n_g (n_g - 1) / (n (n - 1))``, the share of
      ordered pairs (i != j) from the same group - the share of InfoNCE negatives
      that come from the anchor's own group. 1.0 for a single-group batch; for G
      equally likely groups ~1/G. n = 1 -> 1.0 (one group, by convention);
    * ``largest_group_share`` (extra): ``max_g q_g``.

    ``groups``: 1-D integer ids (any values), else ``ValueError``.
    """
    g = as_labels(groups, "groups")
    n = g.numel()
    _, counts = torch.unique(g, return_counts=True)
    c = counts.double()
    q = c / n
    entropy = float(-(q * torch.log(q)).sum())
    share = 1.0 if n < 2 else float((c * (c - 1)).sum() / (n * (n - 1)))
    return {
        "distinct": int(counts.numel()),
        "entropy": max(entropy, 0.0),
        "same_group_pair_share": share,
        "largest_group_share": float(q.max()),
    }



