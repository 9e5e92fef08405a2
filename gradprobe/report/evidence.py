"""A finding's evidence as a reader sees it: a small table of its numbers and a sentence per
recorded series or related finding, instead of the JSON dictionary it is stored as."""

from __future__ import annotations

import math
from typing import Any

# Entries that repeat what the finding's title and subject already say.
_SKIPPED = ("thresholds",)


def label(key: str) -> str:
    """``median_saturated_fraction`` -> ``median saturated fraction``."""
    return str(key).replace("_", " ")


def number(value: Any) -> str:
    """A number as the report prints it: integers with separators, others to 3 digits."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "n/a"}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:,.0f}" if value.is_integer() and abs(value) < 1e15 else f"{value:.3g}"
    return str(value)


def _is_series(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"steps", "values"}


def _flat(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _series_sentence(key: str, series: dict) -> str:
    steps = series.get("steps") or []
    values = [v for v in series.get("values") or [] if v is not None]
    if not steps or not values:
        return f"{label(key)}: no finite value recorded."
    return (f"{label(key)}: {len(steps)} points from step {number(steps[0])} to "
            f"{number(steps[-1])}, {number(values[0])} at the first and {number(values[-1])} at "
            "the last.")


def _record_sentence(key: str, record: dict) -> str:
    parts = [f"{label(k)} {', '.join(map(number, v)) if isinstance(v, list) else number(v)}"
             for k, v in record.items() if _flat(v) or (isinstance(v, list) and
                                                        all(_flat(x) for x in v))]
    return f"{label(key)}: " + "; ".join(parts) + "."


def evidence_parts(evidence: dict, limit: int = 14) -> tuple[list[tuple[str, str]], list[str]]:
    """``(rows, sentences)``: ``(label, value)`` rows for numbers, flags, names and small maps
    (at most ``limit``), and one sentence per recorded series or related record."""
    rows: list[tuple[str, str]] = []
    sentences: list[str] = []
    for key, value in evidence.items():
        if key in _SKIPPED:
            continue
        if _is_series(value):
            sentences.append(_series_sentence(key, value))
        elif _flat(value):
            rows.append((label(key), number(value)))
        elif isinstance(value, dict) and all(_flat(v) for v in value.values()):
            if value:
                rows.append((label(key), ", ".join(f"{k} {number(v)}" for k, v in value.items())))
        elif isinstance(value, list) and all(_flat(v) for v in value):
            rows.append((label(key), ", ".join(number(v) for v in value) if value else "none"))
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            sentences.extend(_record_sentence(key, v) for v in value)
        elif isinstance(value, dict):
            sentences.append(_record_sentence(key, value))
    if len(rows) > limit:
        rows = rows[:limit - 1] + [("…", f"{len(rows) - limit + 1} more in the JSON report")]
    return rows, sentences
