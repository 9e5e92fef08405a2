"""How ``gradprobe demo`` shows its training: a progress bar per variant on a terminal, and a
few plain lines where nothing redraws (a CI log, a pipe, a file)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

PLAIN_LINES = 4  # lines per variant where nothing redraws: at 25%, 50%, 75% and 100%


@contextmanager
def training_progress(label: str, total: int, stream: TextIO) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(steps)``, to call as training goes (``train(progress=advance)``)."""
    if stream.isatty():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), TextColumn("left"),
                      TimeRemainingColumn(), console=Console(file=stream)) as progress:
            task = progress.add_task(label, total=total)
            yield lambda steps: progress.advance(task, steps)
    else:
        yield PlainProgress(label, total, stream)


class PlainProgress:
    """``<label>: <done>/<total> steps (<percent>%), <seconds> s`` at each quarter of the way."""

    def __init__(self, label: str, total: int, stream: TextIO):
        self.label, self.total, self.stream = label, total, stream
        self.done = 0
        self.marks = [round(total * k / PLAIN_LINES) for k in range(1, PLAIN_LINES + 1)]
        self.start = time.perf_counter()

    def __call__(self, steps: int) -> None:
        self.done += steps
        while self.marks and self.done >= self.marks[0]:
            self.marks.pop(0)
            print(f"{self.label}: {self.done}/{self.total} steps "
                  f"({100 * self.done // self.total}%), {time.perf_counter() - self.start:.0f} s",
                  file=self.stream, flush=True)
