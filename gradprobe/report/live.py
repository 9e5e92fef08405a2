"""``gradprobe watch``: a live terminal view of a run file that another process is writing.

How it follows the run (docs/live.md):

- it waits for the run file to appear (up to ``timeout`` seconds);
- every ``every`` seconds it reads a *change mark* (the largest keys of the run file's tables,
  :func:`gradprobe.record.change_mark`), which costs the same on a run of any length, and
  reloads and diagnoses the run only when the mark changed: a long run is diagnosed again only
  when new probe steps (or logged scalars, or events) arrived;
- the run is over when its writer is: the lock file is gone (closed normally), or nobody holds
  it any more (a stale lock: the training process was killed or crashed;
  :func:`gradprobe.record.writer_state`). Either way the view shows the last committed steps
  and returns; Ctrl-C returns too. The caller prints the final summary.

Each reading opens the run, reads what it needs and closes it at once, so the watcher never
holds a read transaction that would keep the writer's WAL from being checkpointed.
"""

from __future__ import annotations

import collections
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.record import (CLOSED, GONE, WRITING, RunFileError, change_mark, load_run,
                              writer_state)

from .terminal import SEVERITY_STYLE

RATE_WINDOW_SECONDS = 30.0
READ_RETRIES = 3

ENDINGS = {CLOSED: "closed", GONE: "writer gone (stale lock)", "interrupted": "interrupted"}


@dataclass
class Reading:
    """What one reading of the run shows: progress, the latest key numbers, the findings."""

    summary: dict[str, Any]
    findings: list
    losses: list[tuple[str, float, float, float, float]]  # name, loss, weight, ratio, cosine
    latents: list[tuple[str, float, float]]  # name, effective rank, dimension


@dataclass
class WatchResult:
    """How the watch ended (``closed``, ``gone``: a stale lock, ``interrupted``) and the last
    reading of the run."""

    ending: str
    reading: Reading


def _latest(run, quantity: str, name: str) -> float:
    if not run.has(quantity, name):
        return math.nan
    steps, values = run.series(quantity, name)
    return float(values[-1]) if len(values) else math.nan


def read_run(path: str | os.PathLike, thresholds: Thresholds | None = None,
             diagnosed: bool = True) -> Reading:
    """One reading: load the run, take its latest numbers and (``diagnosed``) its findings."""
    run = load_run(path)
    try:
        summary = run.summary()
        findings = diagnose(run, thresholds) if diagnosed else []
        task = run.task
        norms = {n: _latest(run, "weighted_grad_norm", n) for n in run.losses}
        largest = max((v for v in norms.values() if math.isfinite(v)), default=math.nan)
        losses = []
        for name in run.losses:
            ratio = norms[name] / largest if largest > 0 else math.nan
            cosine = math.nan
            for pair in (f"{task}|{name}", f"{name}|{task}"):
                if name != task and run.has("grad_cosine", pair):
                    cosine = _latest(run, "grad_cosine", pair)
            losses.append((name, _latest(run, "loss", name), _latest(run, "weight", name),
                           ratio, cosine))
        latents = [(name, _latest(run, "effective_rank", name), _latest(run, "latent_dim", name))
                   for name in run.names("effective_rank")]
    finally:
        run.close()
    return Reading(summary, findings, losses, latents)


def _number(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.4g}"


@dataclass
class _View:
    """The live view's memory between readings: when each finding appeared and cleared, and
    the progress seen, for the rate."""

    path: str
    appeared: dict[tuple[str, str], int | None] = field(default_factory=dict)
    cleared: dict[tuple[str, str], tuple[Any, int | None]] = field(default_factory=dict)
    progress: collections.deque = field(default_factory=collections.deque)

    def update(self, reading: Reading) -> None:
        step = reading.summary["last_step"]
        now = {(f.id, f.subject): f for f in reading.findings}
        for key in list(self.appeared):
            if key not in now:
                previous = self.appeared.pop(key)
                self.cleared[key] = (previous, step)
        for key in now:
            if key not in self.appeared:
                self.appeared[key] = step
                self.cleared.pop(key, None)
        if step is not None:
            t = time.monotonic()
            self.progress.append((t, step))
            while len(self.progress) > 2 and t - self.progress[1][0] > RATE_WINDOW_SECONDS:
                self.progress.popleft()

    def rate(self) -> float:
        if len(self.progress) < 2:
            return math.nan
        (t0, s0), (t1, s1) = self.progress[0], self.progress[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else math.nan

    def render(self, reading: Reading | None, status: str, findings_pending: bool = False):
        if reading is None:
            return Text(f"gradprobe watch {self.path}: {status}")
        s = reading.summary
        rate = self.rate()
        head = Text.assemble(
            ("gradprobe watch ", "bold"), (f"{s['name']}", "bold cyan"), f"  ({self.path})\n",
            f"{status}  step {s['last_step'] if s['last_step'] is not None else '-'}  "
            f"probe steps {s['probe_steps']}  ",
            f"rate {rate:.3g} steps/s" if math.isfinite(rate) else "rate -")
        parts = [head]
        if reading.losses:
            table = Table(title="losses (latest probe step)", title_justify="left", box=None)
            for column in ("loss", "value", "weight", "weighted grad / largest",
                           f"cosine with {s['task']}"):
                table.add_column(column, justify="left" if column == "loss" else "right")
            for name, value, weight, ratio, cosine in reading.losses:
                table.add_row(name, _number(value), _number(weight), _number(ratio),
                              _number(cosine))
            parts.append(table)
        if reading.latents:
            table = Table(title="latents", title_justify="left", box=None)
            for column in ("latent", "effective rank", "dimension"):
                table.add_column(column, justify="left" if column == "latent" else "right")
            for name, rank, dim in reading.latents:
                table.add_row(name, _number(rank), _number(dim))
            parts.append(table)
        parts.append(self._findings_table(reading, findings_pending))
        return Group(*parts)

    def _findings_table(self, reading: Reading, pending: bool):
        if pending:
            return Text("findings: waiting for the first probe step")
        if not reading.findings and not self.cleared:
            return Text("findings: no failure mode found so far", style="green")
        table = Table(title="findings", title_justify="left", box=None)
        for column in ("severity", "finding", "seen at step", "held", "key number", ""):
            table.add_column(column, no_wrap=column != "")
        for f in reading.findings:
            seen = self.appeared.get((f.id, f.subject))
            held = "-" if f.steps is None else f"{f.steps[0]}-{f.steps[1]}"
            table.add_row(Text(f.severity, style=f"bold {SEVERITY_STYLE[f.severity]}"), f.id,
                          "-" if seen is None else str(seen), held, f.key_number, f.title)
        for (finding_id, subject), (_, step) in self.cleared.items():
            table.add_row(Text("cleared", style="green"), finding_id, "", "", "",
                          f"{subject}: cleared at step {step}", style="dim")
        return table


def _wait_for(path: Path, timeout: float, every: float, live: Live, view: _View) -> None:
    """Until the file exists and is not empty (a writer creating it writes the header first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if path.stat().st_size > 0:
                return
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            raise RunFileError(f"{path}: no run file appeared within {timeout:g} s "
                               "(start the training, or pass a longer --timeout)")
        live.update(view.render(None, "waiting for the run file to appear"), refresh=True)
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))


def _follow(path: Path, every: float, timeout: float, thresholds: Thresholds | None,
            live: Live, view: _View) -> tuple[Reading | None, str]:
    """The watch loop: the last reading, and how the run ended (see the module docstring)."""
    reading: Reading | None = None
    mark: tuple | None = None
    state, failures, pause = WRITING, 0, every
    try:
        _wait_for(path, timeout, every, live, view)
        while True:
            # The writer's state first, then the mark: a run found closed is read with
            # everything its writer committed.
            state = writer_state(path)
            now = change_mark(path)
            if reading is None or now is None or now != mark:
                first_step_seen = now is None or now[0] is not None
                started = time.monotonic()
                try:
                    reading = read_run(path, thresholds,
                                       diagnosed=first_step_seen or state != WRITING)
                except RunFileError:
                    # A writer switching the file out of WAL mode as it closes holds it
                    # for a moment: read again next time, give up when it persists.
                    failures += 1
                    if state != WRITING or failures > READ_RETRIES:
                        raise
                    time.sleep(every)
                    continue
                failures, mark = 0, now
                view.update(reading)
                # On a run so long that a reading takes longer than `every`, wait as long
                # as it took: the watcher never takes more than about half a core.
                pause = max(every, time.monotonic() - started)
            if now is None:  # a checkpoint, not a run file being written: nothing follows
                state = CLOSED
            if state != WRITING:
                break
            live.update(view.render(reading, "training", findings_pending=not first_step_seen),
                        refresh=True)
            time.sleep(pause)
    except KeyboardInterrupt:
        state = "interrupted"
    if reading is not None:
        live.update(view.render(reading, ENDINGS[state]), refresh=True)
    return reading, state


def watch(path: str | os.PathLike, *, every: float = 2.0, timeout: float = 600.0,
          thresholds: Thresholds | None = None, console: Console | None = None) -> WatchResult:
    """Show the run at ``path`` live until its writer closes it (or is gone, or Ctrl-C).

    Raises :class:`gradprobe.record.RunFileError` for a file that is not a run, or none
    appearing within ``timeout`` seconds.
    """
    path = Path(path)
    view = _View(str(path))
    console = console or Console()
    try:
        with Live(console=console, auto_refresh=False) as live:
            reading, state = _follow(path, every, timeout, thresholds, live, view)
    finally:
        if not console.is_terminal:
            console.line()  # off a terminal the view is printed once, at the end, without one
    if reading is None:
        raise KeyboardInterrupt
    return WatchResult({CLOSED: "closed", GONE: "gone"}.get(state, state), reading)
