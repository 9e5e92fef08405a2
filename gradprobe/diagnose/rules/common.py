"""What several rules share: building a finding, a loss's start, a series' end, the
constraint losses the recorded latents show satisfied."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from gradprobe.metrics.usage import usage_entropy
from gradprobe.record import Run
from gradprobe.record.quantities import (BATCH, CKA, GROUPS_PER_BATCH, LOSS, MAX_ABS_CORRELATION,
                                         MAX_ABS_CORRELATION_NULL, PROTOTYPE_ASSIGNMENTS)

from .._series import (align, finite, get, median, roles, start_end, window_counts,
                       window_size)
from ..findings import REMEDY, WHY, Finding, PlotHint
from ..thresholds import Thresholds

Earlier = Sequence[Finding]  # the findings of the rules before this one, in RULES order
Rule = Callable[[Run, Thresholds, Earlier], list[Finding]]


def make_finding(id: str, severity: str, title: str, subject: str, key_number: str,
                 evidence: dict, steps, plot: PlotHint | None = None,
                 remedy: str | None = None) -> Finding:
    """A finding with the id's mechanism as its why; ``remedy`` replaces the id's generic
    remedy when the losses present call for a specific one."""
    return Finding(id=id, severity=severity, title=title, subject=subject, key_number=key_number,
                   evidence=evidence, why=WHY[id], remedy=remedy or REMEDY[id], steps=steps,
                   plot=plot)


def loss_start(run: Run, name: str, th: Thresholds) -> float:
    series = finite(get(run, LOSS, name))
    if series is None:
        return math.nan
    return start_end(*series, th)["start"]


def series_end(series: tuple[np.ndarray, np.ndarray] | None, th: Thresholds) -> float:
    """Median of a series' last window (NaN when it was not recorded)."""
    if series is None:
        return math.nan
    return median(series[1][-window_size(len(series[1]), th):])


def decoupled_pairs(run: Run, th: Thresholds) -> bool:
    """True when latent pairs were recorded and all of them end independent (CKA and max |corr|
    at their null): a decorrelation/orthogonality loss is then satisfied, at its noise floor."""
    pairs = run.names(CKA)
    if not pairs:
        return False
    for pair in pairs:
        cka = finite(get(run, CKA, pair))
        if cka is None or len(cka[0]) < th.min_points:
            return False
        if start_end(*cka, th)["end"] >= th.dependence_cka:
            return False
        corr, null = get(run, MAX_ABS_CORRELATION, pair), get(run, MAX_ABS_CORRELATION_NULL, pair)
        if corr is not None and null is not None:
            _, (rv, nv) = align(corr, null)
            if median(rv[-window_size(len(rv), th):] - nv[-window_size(len(nv), th):]) >= \
                    th.dependence_corr_excess:
                return False
    return True


def satisfied_constraints(run: Run, th: Thresholds) -> set[str]:
    """Constraint losses already at their floor by recorded evidence (decoupled latents)."""
    if not decoupled_pairs(run, th):
        return set()
    return {n for n, r in roles(run).items() if r in ("orthogonality", "decorrelation")}


def groups_per_batch_series(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """The finite groups-per-batch series (``observe(groups=...)``), or None."""
    return finite(get(run, GROUPS_PER_BATCH, BATCH))


def pooled_usage(run: Run, prototypes: str, th: Thresholds) -> dict | None:
    """Usage of a prototype set pooled over the end window of batches: the nearest-prototype
    counts (``prototype_assignments``) summed over those probe steps, their entropy / log P,
    the largest prototype's share and how many were used. One batch cannot tell a collapsed
    set from a batch drawn from one group; many batches can. None when not recorded."""
    if prototypes not in run.array_names(PROTOTYPE_ASSIGNMENTS):
        return None
    steps, counts = run.arrays(PROTOTYPE_ASSIGNMENTS, prototypes)
    if len(steps) < th.min_points or len({c.shape for c in counts}) != 1:
        return None
    last = window_counts(steps, th)[1]
    pooled = np.sum(counts[-last:], axis=0)
    total = float(pooled.sum())
    if total <= 0:
        return None
    return {"usage": usage_entropy(pooled), "largest_share": float(pooled.max()) / total,
            "used": int((pooled > 0).sum()), "prototypes": int(pooled.size),
            "rows": int(total), "steps": [int(steps[-last]), int(steps[-1])]}
