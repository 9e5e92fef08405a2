"""What the report reads from a run: cached series, decimation for long runs, snapshots.

Plotting never computes a metric again: it reads the recorded series and arrays of a
:class:`gradprobe.record.Run` (and the findings), so any run can be re-plotted later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradprobe.diagnose import PlotHint
from gradprobe.record import Run

# A plotted line keeps at most this many points: min and max of each of MAX_POINTS / 2
# buckets, so spikes survive and a 1,000,000-step run draws as fast as a short one.
MAX_POINTS = 4000

# Magnitudes an axis can draw: beyond LARGEST matplotlib's limits and ticks overflow float64,
# below SMALLEST (subnormal numbers) a constant series has no representable margin.
LARGEST, SMALLEST = 1e300, 1e-300


def drawable(values: np.ndarray) -> np.ndarray:
    """``values`` as the report draws them: magnitudes above 1e300 become +-Inf (left out of
    the plot, like NaN) and non-zero magnitudes below 1e-300 become 0."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(values)
        return np.where(magnitude > LARGEST, np.sign(values) * np.inf,
                        np.where(magnitude < SMALLEST, 0.0, values))


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Min/max per bucket: the extremes of each of ``max_points // 2`` equal buckets, in step order.

    Buckets holding only NaN keep one NaN (the line shows the gap); shorter series are
    returned unchanged.
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    if n <= max_points:
        return x, y
    buckets = max(max_points // 2, 1)
    size = math.ceil(n / buckets)
    rows = math.ceil(n / size)
    padded = np.full(rows * size, np.nan)
    padded[:n] = y
    block = padded.reshape(rows, size)
    finite = np.isfinite(block)
    any_finite = finite.any(axis=1)
    lo = np.argmin(np.where(finite, block, np.inf), axis=1)
    hi = np.argmax(np.where(finite, block, -np.inf), axis=1)
    first = np.minimum(lo, hi)
    second = np.maximum(lo, hi)
    base = np.arange(rows) * size
    idx = np.stack([base + first, base + second], axis=1)
    # an all-NaN bucket keeps its first index (a NaN: a gap in the line)
    idx[~any_finite] = base[~any_finite, None]
    idx = idx.reshape(-1)
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]
    idx = idx[keep]
    idx = idx[idx < n]
    return x[idx], y[idx]


class RunData:
    """A read-only view of a run for plotting: every series is read from the file once."""

    def __init__(self, run: Run):
        self.run = run
        self.losses = run.losses
        self.meta = run.meta
        self._series: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._arrays: dict[tuple[str, str], tuple[np.ndarray, list[np.ndarray]]] = {}
        self._quantities = set(run.quantities())
        self._names = {q: run.names(q) for q in self._quantities}

    # -- scalars -------------------------------------------------------------------------

    def has(self, quantity: str, name: str | None = None) -> bool:
        if name is None:
            return bool(self._names.get(quantity))
        return name in self._names.get(quantity, ())

    def names(self, quantity: str) -> list[str]:
        return list(self._names.get(quantity, ()))

    def series(self, quantity: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The recorded series, its values :func:`drawable`."""
        key = (quantity, name)
        if key not in self._series:
            steps, values = self.run.series(quantity, name)
            self._series[key] = steps, drawable(values)
        return self._series[key]

    def plotted(self, quantity: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The series as it is drawn (decimated for long runs)."""
        return decimate(*self.series(quantity, name))

    def ratio(self, quantity: str, name: str, to: str) -> tuple[np.ndarray, np.ndarray]:
        """``name / to`` at the steps both were recorded."""
        s1, v1 = self.series(quantity, name)
        s2, v2 = self.series(quantity, to)
        common, i1, i2 = np.intersect1d(s1, s2, assume_unique=True, return_indices=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return common, v1[i1] / v2[i2]

    def ratio_to_largest(self, quantity: str, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each name's value over the largest value among ``names`` at the same step."""
        steps = None
        for name in names:
            s, _ = self.series(quantity, name)
            steps = s if steps is None else np.intersect1d(steps, s, assume_unique=True)
        if steps is None or not len(steps):
            return {}
        table = []
        for name in names:
            s, v = self.series(quantity, name)
            table.append(v[np.searchsorted(s, steps)])
        table = np.vstack(table)
        with np.errstate(invalid="ignore", divide="ignore"):
            largest = np.nanmax(np.where(np.isfinite(table), table, np.nan), axis=0) \
                if np.isfinite(table).any() else np.full(len(steps), np.nan)
            return {name: (steps, table[i] / largest) for i, name in enumerate(names)}

    def relative_to_first(self, quantity: str, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The series over its first finite non-zero value (None when it has none)."""
        s, v = self.series(quantity, name)
        finite = np.flatnonzero(np.isfinite(v) & (v != 0))
        if not len(finite):
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            return s, v / v[finite[0]]

    def step_range(self) -> tuple[int | None, int | None]:
        """First and last step anything was recorded at (probe steps, or the loss series)."""
        steps = self.run.probe_steps()
        lo = int(steps[0]) if len(steps) else None
        hi = int(steps[-1]) if len(steps) else None
        for name in self.names("loss")[:1]:
            s, _ = self.series("loss", name)
            if len(s):
                lo = int(s[0]) if lo is None else min(lo, int(s[0]))
                hi = int(s[-1]) if hi is None else max(hi, int(s[-1]))
        return lo, hi

    # -- arrays --------------------------------------------------------------------------

    def array_names(self, quantity: str) -> list[str]:
        return self.run.array_names(quantity)

    def arrays(self, quantity: str, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """The recorded arrays, their values :func:`drawable`."""
        key = (quantity, name)
        if key not in self._arrays:
            steps, arrays = self.run.arrays(quantity, name)
            self._arrays[key] = steps, [drawable(a) for a in arrays]
        return self._arrays[key]

    def snapshots(self, quantity: str, name: str) -> list[tuple[str, int, np.ndarray]]:
        """The recorded array at three moments: ``[("start", step, a), ("middle", ...), ("end", ...)]``."""
        steps, values = self.arrays(quantity, name)
        return [(label, int(steps[i]), values[i]) for label, i in moment_indices(steps)]


def moment_indices(steps: np.ndarray) -> list[tuple[str, int]]:
    """Indices of the first, middle and last entries of ``steps`` (fewer when fewer exist)."""
    n = len(steps)
    if n == 0:
        return []
    if n == 1:
        return [("end", 0)]
    if n == 2:
        return [("start", 0), ("end", 1)]
    middle = int(np.argmin(np.abs(steps - (steps[0] + steps[-1]) / 2)))
    middle = min(max(middle, 1), n - 2)
    return [("start", 0), ("middle", middle), ("end", n - 1)]


def finding_value(finding: Any, field: str, default: Any = None) -> Any:
    """A field of a Finding (the dataclass, or a plain dict with the same keys); the typed
    plot hint is read in its dict form, as the pages read it."""
    if isinstance(finding, dict):
        return finding.get(field, default)
    value = getattr(finding, field, default)
    return value.to_dict() if isinstance(value, PlotHint) else value


@dataclass(frozen=True)
class JudgedRatio:
    """The ratio a gradient-swamping finding judged: ``loss``'s weighted gradient norm over the
    largest competing one at each judged step (evidence ``ratio``, thinned); ``over``: where
    (the median of its ratios on the layers it shares, or the whole shared set)."""

    loss: str
    steps: np.ndarray
    values: np.ndarray
    over: str

    @property
    def label(self) -> str:
        return f"{self.loss}: judged ratio ({self.over})"


def judged_ratio(finding: Any) -> JudgedRatio | None:
    """The ratio series ``finding``'s rule judged, read from its evidence; None where the
    evidence carries none (a finding of another rule, or one read from an older JSON report):
    the report then draws the ratio of the recorded norms instead."""
    evidence = finding_value(finding, "evidence")
    series = evidence.get("ratio") if isinstance(evidence, dict) else None
    if not (isinstance(series, dict) and series.get("steps") and evidence.get("loss")):
        return None
    over = "median over shared layers" if evidence.get("layer_ratios") else \
        "whole shared set"
    return JudgedRatio(str(evidence["loss"]), np.asarray(series["steps"], dtype=np.float64),
                       np.array([np.nan if v is None else v for v in series["values"]],
                                dtype=np.float64), over)
