"""Usage of a set of prototypes from assignment counts, in numpy alone: the probe computes it
per batch, and the diagnosis pools the counts over a window of batches without torch."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["usage_entropy"]


def usage_entropy(counts) -> float:
    """``H(c / sum c) / log P`` of assignment counts over P prototypes: 1.0 all used
    equally, 0.0 one takes every assignment (also for P = 1 or no assignment). Range [0, 1]."""
    c = np.asarray(counts, dtype=np.float64).ravel()
    if c.size < 2 or c.sum() <= 0:
        return 0.0
    q = c[c > 0] / c.sum()
    return max(0.0, float(-(q * np.log(q)).sum() / math.log(c.size)))  # no -0.0
