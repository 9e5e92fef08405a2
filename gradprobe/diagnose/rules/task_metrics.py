"""The per-task metrics a user logs with ``probe.log`` (an accuracy, a validation loss), linked
to the loss they measure by name, and their trend: ``gradient-conflict`` reads a task whose
metric stopped improving while the conflict holds as held back."""

from __future__ import annotations

import math
import re

from gradprobe.record import Run
from gradprobe.record.quantities import LOGGED

from .._series import finite, get, start_end
from ..thresholds import Thresholds


def linked_metrics(run: Run, loss: str) -> list[str]:
    """The per-task metrics a user logged (``probe.log``) for ``loss``: logged names that hold
    the loss's name as whole words (split at anything not a letter or digit): ``acc_left``,
    ``val/left`` or ``left_accuracy`` for loss ``left``, not ``leftover``."""
    words = _words(loss)
    return [m for m in run.names(LOGGED) if m != loss and any(
        _words(m)[i:i + len(words)] == words for i in range(len(_words(m))))]


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^0-9a-z]+", name.lower()) if w]


def metric_progress(run: Run, metric: str, lo: int, hi: int, th: Thresholds) -> float:
    """How much a logged metric still improved over the second half of the judged steps
    ``lo``..``hi``, as a fraction of its improvement over the first half: (end - middle) /
    (middle - start) with start and middle the first half's start and end windows and end
    the second half's end window (``start_end``). Its direction is the one it first moved
    in, so an accuracy and a validation loss read alike; a metric that turned back (a
    validation loss rising) has a negative progress. NaN with too few points in a half or
    no first move."""
    series = finite(get(run, LOGGED, metric))
    if series is None:
        return math.nan
    middle = (lo + hi) / 2
    halves = [(series[0] >= lo) & (series[0] <= middle), (series[0] > middle) & (series[0] <= hi)]
    if any(h.sum() < th.min_points for h in halves):
        return math.nan
    first, second = (start_end(series[0][h], series[1][h], th) for h in halves)
    moved = first["end"] - first["start"]
    return (second["end"] - first["end"]) / moved if moved != 0 else math.nan
