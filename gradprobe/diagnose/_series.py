"""Small NaN-aware helpers over recorded series (steps int64, values float64)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Mapping

import numpy as np

from gradprobe.record import Run, role_declaration
from gradprobe.record.quantities import LOSS

from .thresholds import FIXED_WEIGHT_TOLERANCE, Thresholds

MAX_EVIDENCE_POINTS = 60


def get(run: Run, quantity: str, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The series, or None when it was not recorded (or holds no step)."""
    if not run.has(quantity, name):
        return None
    steps, values = run.series(quantity, name)
    if len(steps) == 0:
        return None
    return steps, values


def finite(series: tuple[np.ndarray, np.ndarray] | None):
    if series is None:
        return None
    steps, values = series
    keep = np.isfinite(values)
    if not keep.any():
        return None
    return steps[keep], values[keep]


def is_fixed_weight(values: np.ndarray, tolerance: float = FIXED_WEIGHT_TOLERANCE) -> bool:
    """Whether a recorded loss weight stayed fixed: its range (max - min) is at most
    ``tolerance`` times its largest absolute value (non-finite values ignored; a weight of 0
    throughout is fixed too). False when no finite value was recorded."""
    w = np.asarray(values, dtype=np.float64)
    w = w[np.isfinite(w)]
    if not len(w):
        return False
    return float(np.ptp(w)) <= tolerance * float(np.abs(w).max())


def recorded_series(run: Run, quantity: str,
                    least: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, steps, values)`` for each name ``quantity`` was recorded under whose finite
    values number at least ``least``: the series a rule can judge."""
    for name in run.names(quantity):
        series = finite(get(run, quantity, name))
        if series is not None and len(series[0]) >= least:
            yield name, *series


def median(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else math.nan


def nanmax(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.max()) if len(v) else math.nan


def rolling_median(values: np.ndarray, width: int) -> np.ndarray:
    """Centred rolling median (NaN-aware; shrinks at the edges)."""
    v = np.asarray(values, dtype=np.float64)
    if width <= 1 or len(v) < 2:
        return v.copy()
    half = width // 2
    # NaN padding makes the window shrink at the edges; non-finite values are ignored, as
    # median() ignores them.
    padded = np.concatenate([np.full(half, np.nan), np.where(np.isfinite(v), v, np.nan),
                             np.full(half, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN window gives NaN
        return np.nanmedian(windows, axis=1)


def window_size(n: int, th: Thresholds) -> int:
    return min(n, max(th.min_points, int(math.ceil(th.window_share * n))))


def window_counts(steps: np.ndarray, th: Thresholds) -> tuple[int, int]:
    """How many of the first and of the last probe steps make a series' start and end windows:
    those within ``window_share`` of the training steps the series spans, and at least
    ``min_points``. Windows in training steps, not in probe steps, so that under the default
    cadence (dense at the start) the start window is not just the first few steps."""
    s = np.asarray(steps, dtype=np.float64)
    least = min(len(s), th.min_points)
    if not len(s):
        return 0, 0
    reach = th.window_share * (s[-1] - s[0])
    return max(least, int((s <= s[0] + reach).sum())), max(least, int((s >= s[-1] - reach).sum()))


def start_end(steps: np.ndarray, values: np.ndarray, th: Thresholds) -> dict:
    """Medians of the start and end windows (:func:`window_counts`; finite values only), with
    their step ranges."""
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    first, last = window_counts(steps, th)
    return {
        "start": median(values[:first]), "end": median(values[-last:]),
        "start_steps": [int(steps[0]), int(steps[first - 1])],
        "end_steps": [int(steps[-last]), int(steps[-1])],
        "points": int(len(values)),
    }


def level_after_start(steps: np.ndarray, values: np.ndarray, th: Thresholds) -> float:
    """Median of a series over the window that follows its start window (as long, in training
    steps, and at least ``min_points``): where a loss has settled after its first transient."""
    keep = np.isfinite(values)
    steps, values = np.asarray(steps, dtype=np.float64)[keep], values[keep]
    first, _ = window_counts(steps, th)
    rest_steps, rest = steps[first:], values[first:]
    if not len(rest):
        return math.nan
    within = rest_steps <= steps[0] + 2 * th.window_share * (steps[-1] - steps[0])
    return median(rest[:max(int(within.sum()), min(len(rest), th.min_points))])


def at_floor(steps: np.ndarray, values: np.ndarray, th: Thresholds) -> bool:
    """Whether a loss ended at its floor: its end window at most ``swamping_floor_fraction``
    of its initial level (the median of its first ``min_points`` values). A loss there fell
    by orders of magnitude from where it began (a covariance term at 1e-6 after a collapse, a
    PINN's continuity residual at 1.5% of its start): satisfied, neither swamped nor stalled."""
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if len(values) < 2 * th.min_points:
        return False
    initial = median(values[:th.min_points])
    return bool(initial > 0 and
                abs(start_end(steps, values, th)["end"]) <= th.swamping_floor_fraction * initial)


def began(values: np.ndarray, th: Thresholds) -> float:
    """Where a loss began, above its noise: the highest of its first ``min_points`` values."""
    return float(np.max(values[:th.min_points]))


def start_low(steps: np.ndarray, values: np.ndarray, th: Thresholds) -> float:
    """Lowest ``smooth_points`` rolling median within a series' start window: where a loss that
    starts near its floor (or dips to it) sits before anything pushes it up."""
    keep = np.isfinite(values)
    first, _ = window_counts(np.asarray(steps)[keep], th)
    low = rolling_median(values[keep], th.smooth_points)[:first]
    return float(np.nanmin(low)) if np.isfinite(low).any() else math.nan


def descent_undone(cosine: np.ndarray, own_norm: np.ndarray, other_norm: np.ndarray) -> np.ndarray:
    """Share of a loss's own first-order descent that another loss's weighted gradient undoes
    on the shared parameters: -<g_own, g_other> / |g_own|^2 = -cos |g_other| / |g_own|,
    clipped to [0, 1] (0: no opposition, 1: the step does not lower this loss at all)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        undone = -cosine * other_norm / own_norm
    return np.clip(np.where(own_norm > 0, undone, np.nan), 0.0, 1.0)


def align(*series: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Restrict several series to the steps they all share."""
    common = series[0][0]
    for s, _ in series[1:]:
        if not np.array_equal(common, s):
            common = np.intersect1d(common, s, assume_unique=True)
    out = []
    for s, v in series:
        idx = np.searchsorted(s, common)
        out.append(v[idx])
    return common, out


def step_spans(steps: np.ndarray) -> np.ndarray:
    """The training steps each probe step stands for: up to the next probe step (the last one
    as many as the one before it). Weighting by them makes a share of probe steps a share of
    training under any cadence: the default one is dense at the start, where most losses have
    not settled, and a plain count would let those first steps outvote the rest of the run."""
    s = np.asarray(steps, dtype=np.float64)
    if len(s) < 2:
        return np.ones(len(s))
    spans = np.diff(s)
    return np.append(spans, spans[-1])


def held_share(steps: np.ndarray, held: np.ndarray, judged: np.ndarray | None = None) -> float:
    """The share of the judged training steps (all, by default) on which ``held`` holds."""
    judged = np.ones(len(held), dtype=bool) if judged is None else judged
    spans = step_spans(steps)
    total = float(spans[judged].sum())
    return float(spans[held & judged].sum()) / total if total > 0 else math.nan


def persistent(steps: np.ndarray, held: np.ndarray, judged: np.ndarray | None,
               th: Thresholds) -> bool:
    """Held on at least ``min_points`` probe steps and at least ``min_share`` of the judged
    training steps (:func:`held_share`); ``judged=None``: every step is judged."""
    judged = np.ones(len(held), dtype=bool) if judged is None else judged
    return int(judged.sum()) >= th.min_points and int((held & judged).sum()) >= th.min_points \
        and held_share(steps, held, judged) >= th.min_share


def held_range(steps: np.ndarray, held: np.ndarray) -> tuple[int, int] | None:
    idx = np.flatnonzero(held)
    if not len(idx):
        return None
    return int(steps[idx[0]]), int(steps[idx[-1]])


def trailing_range(steps: np.ndarray, held: np.ndarray) -> tuple[int, int] | None:
    """The last unbroken stretch of held steps (where a state was entered and kept)."""
    idx = np.flatnonzero(held)
    if not len(idx):
        return None
    last = idx[-1]
    first = last
    while first - 1 >= 0 and held[first - 1]:
        first -= 1
    return int(steps[first]), int(steps[last])


def thin(steps: np.ndarray, values: np.ndarray, limit: int = MAX_EVIDENCE_POINTS) -> dict:
    """At most ``limit`` evenly spaced points of a series for the evidence."""
    n = len(steps)
    idx = np.arange(n) if n <= limit else np.unique(np.linspace(0, n - 1, limit).round().astype(int))
    return {"steps": [int(s) for s in steps[idx]],
            "values": [float(v) if math.isfinite(v) else None for v in values[idx]]}


def g(x: float, digits: int = 3) -> str:
    """Short number for titles: 3 significant digits."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def pct(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if x >= 0.1:
        return f"{100 * x:.0f}%"
    if x >= 0.001:
        return f"{100 * x:.1f}%"
    return f"{100 * x:.2g}%"


def roles(run: Run) -> dict[str, str]:
    """Each loss's role, whatever its source: what a role-specific rule reads (a name hint may
    make one apply). Whether a rule for every loss may leave a loss out: :func:`exempt_losses`."""
    r = run.roles
    return {name: r.get(name, "other") for name in run.losses}


# The sources that settle a role: the user's declaration, the first loss as the task (the
# documented default) and the graph. A role from the name is a weak hint.
SETTLED_SOURCES = ("declared", "first", "graph")


def role_records(meta: Mapping[str, Any]) -> list[dict]:
    """The role records of a run's metadata (or of ``Run.summary()``, which carries the same
    keys). A run file from before they were recorded gets them built from its ``roles``: a
    loss listed in ``roles_guessed`` had its role from the name (no graph was read then), or
    from being first; the others were declared, and so is every role of a file that lists no
    guesses at all (its verdicts stay as they were)."""
    recorded = meta.get("role_records")
    if recorded:
        return recorded
    roles_, guessed = meta.get("roles") or {}, set(meta.get("roles_guessed") or [])
    records = []
    for name in meta.get("losses", []):
        role = roles_.get(name, "other")
        source = ("declared" if name not in guessed else
                  "first" if name == meta.get("task") else "name")
        records.append({"name": name, "role": role, "source": source, "hint": None,
                        "reach": None, "reach_summary": "not recorded (an older run file)",
                        "counts": None, "override": role_declaration(name, role),
                        "ambiguity": None})
    return records


def role_record(run: Run, name: str) -> dict:
    """One loss's role record (a bare one, from the name, for a loss without a record)."""
    for record in role_records(run.meta):
        if record["name"] == name:
            return record
    return {"name": name, "role": roles(run).get(name, "other"), "source": "name", "hint": None,
            "reach": None}


def exempt_losses(run: Run, th: Thresholds) -> set[str]:
    """The losses a rule that applies to every loss (swamping, conflict, inert-loss) leaves
    out: those whose role is one of ``exempt_roles`` and was declared or read from the graph.
    A role from the name never exempts: ``reg`` may be a regression as well as a regulariser."""
    role = roles(run)
    return {r["name"] for r in role_records(run.meta)
            if r["name"] in role and role[r["name"]] in th.exempt_roles
            and r["source"] in SETTLED_SOURCES}


# Roles whose loss is meant to shape the shared representation: one that reaches only
# parameters of its own is cut off from what it was meant to train.
SHAPES_SHARED = ("task", "contrastive", "orthogonality", "decorrelation", "adversarial",
                 "alignment", "distillation", "reconstruction")


def own_parameter_losses(run: Run) -> list[str]:
    """The losses whose graph reaches only parameters no other loss reaches and whose role
    does not say they were meant to reach the shared ones: a codebook's loss, a prototype
    table's."""
    return [r["name"] for r in role_records(run.meta)
            if r.get("reach") == "own" and r["role"] not in SHAPES_SHARED]


def role_origin(record: Mapping[str, Any]) -> str:
    """How a role reads in a finding: ``declared``, ``from the graph``, ``from the name
    'domain'``..."""
    if record.get("source") == "name":
        hint = record.get("hint")
        return f"from the name '{hint}'" if hint else "from the name"
    return {"declared": "declared", "first": "the first loss, taken as the task",
            "graph": "from the graph"}.get(record.get("source"), str(record.get("source")))


def task_name(run: Run) -> str | None:
    if run.task in run.losses:
        return run.task
    return run.losses[0] if run.losses else None


def task_learning(run: Run, steps: np.ndarray, th: Thresholds) -> np.ndarray:
    """Per step: is the task still learning (smoothed loss above memorised_fraction of start)?"""
    task = task_name(run)
    series = finite(get(run, LOSS, task)) if task else None
    if series is None or len(series[0]) < th.min_points:
        return np.ones(len(steps), dtype=bool)
    s, v = series
    start = start_end(s, v, th)["start"]
    if not start > 0:
        return np.ones(len(steps), dtype=bool)
    smooth = rolling_median(v, th.smooth_points)
    low = smooth <= th.memorised_fraction * start
    # Memorised once it has fallen there: a task that starts below (a pretrained classifier
    # whose loss an overweighted penalty then drives up to chance) has not memorised anything.
    above = np.flatnonzero(~low & np.isfinite(smooth))
    memorised_at = np.flatnonzero(low[above[0]:]) + above[0] if len(above) else []
    if not len(memorised_at):
        return np.ones(len(steps), dtype=bool)
    return steps < s[memorised_at[0]]
