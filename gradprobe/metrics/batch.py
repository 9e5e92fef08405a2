"""Batch-composition metrics (single-cell-line batches, sampler checks)."""

from __future__ import annotations


from typing import Any

import torch
from torch import Tensor

from ._common import as_labels

__all__ = ["group_diversity", "batch_summary"]


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
    summary = _diversity(as_labels(groups, "groups"))
    return {
        "distinct": int(summary["distinct"]),
        "entropy": float(summary["entropy"]),
        "same_group_pair_share": float(summary["same_group_pair_share"]),
        "largest_group_share": float(summary["largest_group_share"]),
    }


def _diversity(g: Tensor) -> dict[str, Tensor]:
    """From each element's group size c_i (sorted ids and a binary search, no ``unique``:
    its output size depends on the data): sums over groups become sums over elements,
    ``sum_g f(n_g) = sum_i f(c_i) / c_i``."""
    n = g.numel()
    ordered = torch.sort(g).values
    c = (torch.searchsorted(ordered, g, right=True) - torch.searchsorted(ordered, g)).to(torch.float64)
    share = ((c - 1.0).sum() / (n * (n - 1))) if n > 1 else c.new_ones(())
    return {
        "distinct": torch.round((1.0 / c).sum()),
        "entropy": (-torch.log(c / n).mean()).clamp_min(0.0),
        "same_group_pair_share": share,
        "largest_group_share": c.max() / n,
        "batch_size": c.new_full((), float(n)),
    }


@torch.no_grad()
def batch_summary(groups: Tensor) -> dict[str, Tensor]:
    """:func:`group_diversity` of integer group ids (any shape, flattened) as float64 0-dim
    tensors on their device, computed without reading a value on the host, plus
    ``batch_size``. ``ValueError`` for an empty or non-integer tensor (dtype and shape only).
    """
    if not isinstance(groups, Tensor) or groups.numel() == 0 or groups.is_floating_point() \
            or groups.is_complex():
        raise ValueError("groups must be a non-empty tensor of integer ids")
    return _diversity(groups.detach().reshape(-1).to(torch.int64))
