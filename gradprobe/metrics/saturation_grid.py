"""The fixed numbers of the saturation measures, without torch: the report draws what the probe
recorded with them (the cut-off of the flat regions, the histogram's bins)."""

from __future__ import annotations

import numpy as np

# sigmoid'(x) = s(1 - s) < 0.01  <=>  |x| > 2 acosh(1 / (2 sqrt(0.01))) = 4.5951...
SATURATION_THRESHOLD = 4.6


def histogram_edges(bins: int = 41, limit: float = 20.0) -> np.ndarray:
    """The ``bins + 1`` equal-width float64 edges on [-limit, limit] of
    :func:`gradprobe.metrics.saturation_histogram`'s bins."""
    return np.linspace(-limit, limit, bins + 1)
