"""Choosing thresholds on the calibration half of the corpus.

Procedure (one coordinate at a time, in the order ``Thresholds`` declares its keys):

1. For a numeric threshold, a grid of candidate values: the current value times
   sqrt(2)^k for k = -6..6 (values a ``Thresholds`` refuses, such as a share above 1, are
   skipped; integer keys 1..8).
2. Each candidate is scored on the calibration runs only: the number of false alarms plus
   misses (harness.judge) with that one value changed. Which rules read which key is
   recorded, not assumed (a recording proxy); the first rule that reads the key and every
   rule after it are re-run (later rules may read earlier findings).
3. If the current value already has the fewest errors, it stays (the corpus confirms its
   published or derived source). Otherwise the new value is the geometric midpoint of the
   widest run of consecutive grid values with the fewest errors: the point farthest from
   the nearest failing value (margin-maximising); a run of a single grid value (no margin)
   moves nothing.
4. Rule-specific keys first, then the keys every rule reads (persistence and phase); a
   second pass when the first moved anything (a change can move another key's best range).
   The result is reported with, for every key, its range of fewest errors on the grid.

The held-out half is never read here.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, fields

from gradprobe.diagnose import RULES, Thresholds

from .harness import Family, RunRecord, Runs, judge

GRID_STEPS = 6
INT_GRID = tuple(range(1, 9))


class _Recording:
    """Stands in for a Thresholds and records which keys a rule reads."""

    def __init__(self, thresholds: Thresholds, seen: set[str]):
        self._th, self._seen = thresholds, seen

    def __getattr__(self, name):
        self._seen.add(name)
        return getattr(self._th, name)


@dataclass
class KeyResult:
    key: str
    start: float
    chosen: float
    errors_at_start: int
    errors_best: int
    best_range: tuple[float, float] | None  # grid values with the fewest errors (widest run)
    constrained: bool  # whether the calibration runs' errors depend on this key at all
    rules: tuple[str, ...]


# Keys every rule reads (persistence and phase): tried last, so that a rule-specific key is
# moved before a change that would shift every rule at once.
GLOBAL_KEYS = ("min_points", "min_share", "window_share", "smooth_points", "memorised_fraction")


def _numeric_keys() -> list[str]:
    keys = [f.name for f in fields(Thresholds) if f.metadata.get("kind") in ("float", "int")]
    return [k for k in keys if k not in GLOBAL_KEYS] + [k for k in keys if k in GLOBAL_KEYS]


def grid(key: str, value: float) -> list[float]:
    """Candidate values. A share or a fraction stays within [0, 1]; values a Thresholds
    refuses are skipped by the caller."""
    if key in ("min_points", "smooth_points"):
        return list(INT_GRID)
    if value == 0:
        return [0.0] + [s * 10.0 ** e for e in range(-3, 1) for s in (-1, 1)]
    values = {value * math.sqrt(2) ** k for k in range(-GRID_STEPS, GRID_STEPS + 1)}
    if key.endswith(("_fraction", "_share")):
        values = {v for v in values if v <= 1.0}
    return sorted(values)


def _call(rule, run, th, earlier):
    """A rule of either signature: (run, th) or (run, th, earlier findings)."""
    if len(inspect.signature(rule).parameters) >= 3:
        return rule(run, th, tuple(earlier))
    return rule(run, th)


class Calibrator:
    """Re-diagnoses calibration runs with one threshold changed at a time. Rules run in
    ``RULES`` order and may read the findings of the rules before them, so a change re-runs
    the first rule that reads the key and every rule after it."""

    def __init__(self, runs: Runs, records: list[RunRecord], families: dict[str, Family]):
        self.records, self.families = records, families
        self.loaded = {id(r): runs.run_of(r) for r in records}
        self.order = list(RULES)
        self.rules_reading: dict[str, set[str]] = {}

    def _diagnose(self, th: Thresholds, cache: dict | None = None, first: int = 0) -> dict:
        """Per run, per rule findings, re-running rules ``first..`` (earlier ones from cache)."""
        out = {}
        for r in self.records:
            per_rule = list(cache[id(r)][:first]) if cache else []
            for rid in self.order[first:]:
                seen: set[str] = set()
                earlier = [f for found in per_rule for f in found]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        found = _call(RULES[rid], self.loaded[id(r)], _Recording(th, seen), earlier)
                    except Exception:  # a rule diagnose() would skip with a warning
                        found = []
                per_rule.append(list(found))
                for key in seen:
                    self.rules_reading.setdefault(key, set()).add(rid)
            out[id(r)] = per_rule
        return out

    def errors(self, cache: dict) -> int:
        total = 0
        for r in self.records:
            findings = [f for found in cache[id(r)] for f in found]
            j = judge(self.families[r.family].variant(r.variant), findings)
            total += len(j.false_alarms) + len(j.misses)
        return total

    def calibrate(self, start: Thresholds | None = None, passes: int = 2) -> tuple[Thresholds, list[KeyResult]]:
        th = start or Thresholds()
        cache = self._diagnose(th)
        results: dict[str, KeyResult] = {}
        for _ in range(passes):
            before = th
            for key in _numeric_keys():
                rules = sorted(self.rules_reading.get(key, ()), key=self.order.index)
                if not rules:
                    continue
                first = self.order.index(rules[0])
                current = getattr(th, key)
                base_errors = self.errors(cache)
                scored = []
                for value in grid(key, current):
                    try:
                        trial = th.replace(**{key: value})
                    except ValueError:
                        continue
                    scored.append((value, self.errors(self._diagnose(trial, cache, first))))
                best = min(e for _, e in scored)
                values = [v for v, _ in scored]
                run = _widest_run(values, [e == best for _, e in scored])
                # Move only with a margin: the fewest-error run spans two grid values or more.
                if base_errors > best and run is not None and values.index(run[1]) > values.index(run[0]):
                    lo, hi = run
                    chosen = math.sqrt(lo * hi) if lo > 0 and hi > 0 else (lo + hi) / 2
                    if key in ("min_points", "smooth_points"):
                        chosen = int(round(chosen))
                    th = th.replace(**{key: chosen})
                    cache = self._diagnose(th, cache, first)
                previous = results.get(key)
                results[key] = KeyResult(
                    key=key, start=previous.start if previous else current, chosen=getattr(th, key),
                    errors_at_start=previous.errors_at_start if previous else base_errors,
                    errors_best=min(best, previous.errors_best) if previous else best,
                    best_range=run, constrained=len({e for _, e in scored}) > 1 or
                    bool(previous and previous.constrained), rules=tuple(rules))
            if th == before:
                break  # a further pass would score the same values again
        return th, list(results.values())


def _widest_run(values: list[float], ok: list[bool]) -> tuple[float, float] | None:
    best, start = None, None
    for i, flag in enumerate(ok + [False]):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return None if best is None else (values[best[0]], values[best[1] - 1])
