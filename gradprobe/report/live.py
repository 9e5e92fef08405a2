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

How it shows the run: on a terminal, a view redrawn in place and fitted to the terminal's size
at every refresh (each finding's severity, id, quoted subject and key number on one row, its
title wrapped under it; where the height does not hold everything, titles are cut to one line,
the losses and latents tables shrink to ``TABLE_ROWS_KEPT`` rows, then findings are left out,
each cut said in a line). Off a terminal, or ``plain``: one line per change, flushed as
written (:class:`_PlainScreen`).
"""

from __future__ import annotations

import collections
import math
import os
import textwrap
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
PLAIN_PROGRESS_SECONDS = 30.0  # --plain: a progress line at most this often (and at the end)
TITLE_INDENT = 8  # a finding's title, under its id
TABLE_ROWS_KEPT = 3  # rows of the losses and latents tables kept where findings need the room
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


def _progress(summary: dict[str, Any], rate: float) -> str:
    step = summary["last_step"]
    return (f"step {'-' if step is None else step}  probe steps {summary['probe_steps']}  "
            + (f"rate {rate:.3g} steps/s" if math.isfinite(rate) else "rate -"))


def _held(finding) -> str:
    return "" if finding.steps is None else f"held {finding.steps[0]}-{finding.steps[1]}"


@dataclass
class Change:
    """What one reading changed: a finding that ``appeared``, ``cleared`` or changed severity
    (``was``: the severity before)."""

    kind: str  # "appeared", "cleared", "severity"
    key: tuple[str, str]  # (id, subject)
    finding: Any = None  # None for "cleared"
    was: str | None = None


@dataclass
class _View:
    """The live view's memory between readings: when each finding appeared and cleared, and
    the progress seen, for the rate."""

    path: str
    appeared: dict[tuple[str, str], int | None] = field(default_factory=dict)
    severity: dict[tuple[str, str], str] = field(default_factory=dict)
    cleared: dict[tuple[str, str], tuple[Any, int | None]] = field(default_factory=dict)
    progress: collections.deque = field(default_factory=collections.deque)

    def update(self, reading: Reading) -> list[Change]:
        step = reading.summary["last_step"]
        now = {(f.id, f.subject): f for f in reading.findings}
        changes = []
        for key in list(self.appeared):
            if key not in now:
                previous = self.appeared.pop(key)
                self.severity.pop(key, None)
                self.cleared[key] = (previous, step)
                changes.append(Change("cleared", key))
        for key, finding in now.items():
            if key not in self.appeared:
                self.appeared[key] = step
                self.cleared.pop(key, None)
                changes.append(Change("appeared", key, finding))
            elif self.severity.get(key) != finding.severity:
                changes.append(Change("severity", key, finding, self.severity.get(key)))
            self.severity[key] = finding.severity
        if step is not None:
            t = time.monotonic()
            self.progress.append((t, step))
            while len(self.progress) > 2 and t - self.progress[1][0] > RATE_WINDOW_SECONDS:
                self.progress.popleft()
        return changes

    def rate(self) -> float:
        if len(self.progress) < 2:
            return math.nan
        (t0, s0), (t1, s1) = self.progress[0], self.progress[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else math.nan

    # -- the live view: laid out for the console's width and height -------------------------

    def render(self, reading: Reading | None, status: str, console: Console,
               findings_pending: bool = False):
        """One frame, fitted to ``console``: lines wrap to its width, and what does not fit its
        height is left out, with a line saying what (see the module docstring)."""
        if reading is None:
            return Text(f"gradprobe watch {self.path}: {status}")
        s = reading.summary
        head = Text.assemble(("gradprobe watch ", "bold"), (f"{s['name']}", "bold cyan"),
                             f"  ({self.path})\n", f"{status}  {_progress(s, self.rate())}")
        options = console.options.update_width(console.size.width)

        def lines(renderable) -> int:
            return len(console.render_lines(renderable, options, pad=False))

        left = console.size.height - lines(head)
        tables = [(("loss", "losses"), self._losses_table, reading.losses),
                  (("latent", "latents"), self._latents_table, reading.latents)]
        # The findings first, titles cut to one line where not all fit whole; the tables keep
        # a few rows (TABLE_ROWS_KEPT) and get what the findings leave.
        budget = left - sum(min(len(rows), TABLE_ROWS_KEPT) + 2 for _, _, rows in tables if rows)
        findings = self._findings(reading, findings_pending, console.size.width)
        heights = [[lines(block), lines(compact)] for block, compact in findings]
        whole = [False] * len(findings)
        for k, (full, cut) in enumerate(heights):
            if sum(h[0] if w else h[1] for h, w in zip(heights, whole)) - cut + full <= budget:
                whole[k] = True
        def findings_left_out(n: int) -> Text:
            return Text(f"... {n} more finding{'s' if n != 1 else ''} (listed at the end)",
                        style="dim")

        note = lines(findings_left_out(len(findings)))
        shown, used = [], 0
        for k, ((block, compact), (full, cut)) in enumerate(zip(findings, heights)):
            height = full if whole[k] else cut
            if used + height + (note if k < len(findings) - 1 else 0) > max(budget, 3):
                shown.append(findings_left_out(len(findings) - k))
                used += note
                break
            shown.append(block if whole[k] else compact)
            used += height
        left -= used
        parts = [head]
        for what, make, rows in tables:
            if not rows or left < 1:
                continue

            def rows_left_out(n: int, fitting: int) -> Text:
                return Text(f"{'... ' if fitting else ''}{n} {'more ' if fitting else ''}"
                            f"{what[n != 1]} (a taller terminal shows them)", style="dim")

            note = lines(rows_left_out(len(rows), 1))
            fitting = min(len(rows), left - 2)  # a title and a header row above the rows
            while fitting > 0 and \
                    lines(make(rows[:fitting], s)) + (note if fitting < len(rows) else 0) > left:
                fitting -= 1
            if fitting > 0:
                parts.append(make(rows[:fitting], s))
                left -= lines(parts[-1])
            fitting = max(fitting, 0)
            if fitting < len(rows) and left >= note:
                parts.append(rows_left_out(len(rows) - fitting, fitting))
                left -= lines(parts[-1])
        return Group(*parts, *shown)

    @staticmethod
    def _losses_table(rows: list, summary: dict[str, Any]) -> Table:
        table = Table(title="losses (latest probe step)", title_justify="left", box=None)
        for column in ("loss", "value", "weight", "weighted grad / largest",
                       f"cosine with {summary['task']}"):
            table.add_column(column, justify="left" if column == "loss" else "right")
        for name, value, weight, ratio, cosine in rows:
            table.add_row(name, _number(value), _number(weight), _number(ratio), _number(cosine))
        return table

    @staticmethod
    def _latents_table(rows: list, summary: dict[str, Any]) -> Table:
        table = Table(title="latents", title_justify="left", box=None)
        for column in ("latent", "effective rank", "dimension"):
            table.add_column(column, justify="left" if column == "latent" else "right")
        for name, rank, dim in rows:
            table.add_row(name, _number(rank), _number(dim))
        return table

    def _findings(self, reading: Reading, pending: bool, width: int) -> list:
        """``(block, compact)`` per finding, most severe first: the block is its row
        (severity, id, quoted subject, key number, then when it was seen and held where the
        width allows) and its title wrapped under it; the compact form cuts the title to one
        line. Headed by a line, and followed by the cleared findings."""
        if pending:
            return [(Text("findings: waiting for the first probe step"),) * 2]
        if not reading.findings and not self.cleared:
            return [(Text("findings: no failure mode found so far", style="green"),) * 2]
        out = [(Text("findings", style="bold"),) * 2]
        # The ids in a column where every row still fits the width with them padded.
        pad = max((len(f.id) for f in reading.findings), default=0)
        if any(8 + pad + len(f"  '{f.subject}'  {f.key_number}") > width
               for f in reading.findings):
            pad = 0
        for f in reading.findings:
            seen = self.appeared.get((f.id, f.subject))
            row = Text.assemble((f"{f.severity:<8}", f"bold {SEVERITY_STYLE[f.severity]}"),
                                (f"{f.id:<{pad}}", "bold"), f"  '{f.subject}'  ",
                                (f.key_number, "bold"))
            # When it was first seen and the steps it held on, as much as the row has room for.
            for when in (", ".join(x for x in (seen is not None and f"seen {seen}", _held(f))
                                   if x), _held(f)):
                if when and row.cell_len + 2 + len(when) <= width:
                    row.append(f"  {when}", style="dim")
                    break
            wrapped = textwrap.wrap(f.title, max(20, width - TITLE_INDENT)) or [""]
            block = Text("\n").join([row, *(Text(" " * TITLE_INDENT + line) for line in wrapped)])
            cut = wrapped[0] if len(wrapped) == 1 else \
                textwrap.wrap(f.title, max(16, width - TITLE_INDENT - 4))[0] + " ..."
            out.append((block, Text("\n").join([row, Text(" " * TITLE_INDENT + cut)])))
        for (finding_id, subject), (_, step) in self.cleared.items():
            line = Text(f"{'cleared':<8}{finding_id}  '{subject}'  at step {step}", style="dim")
            out.append((line, line))
        return out


class _LiveScreen:
    """The view redrawn in place (a terminal), laid out for the terminal's size."""

    def __init__(self, console: Console, view: _View):
        self.console, self.view = console, view
        self.live = Live(console=console, auto_refresh=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        return self.live.__exit__(*exc)

    def waiting(self, status: str) -> None:
        self.live.update(self.view.render(None, status, self.console), refresh=True)

    def show(self, reading: Reading, status: str, changes: list[Change],
             pending: bool = False) -> None:
        self.live.update(self.view.render(reading, status, self.console, pending), refresh=True)


class _PlainScreen:
    """One line per change, each written as it happens (a CI log, a pipe): the run found, a
    finding appearing, changing severity or clearing, progress now and then, the ending."""

    def __init__(self, console: Console, view: _View):
        self.console, self.view = console, view
        self._said: set[str] = set()
        self._progress_at = -math.inf

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()

    def waiting(self, status: str) -> None:
        if status not in self._said:
            self._said.add(status)
            self._line(f"gradprobe watch {self.view.path}: {status}")

    def show(self, reading: Reading, status: str, changes: list[Change],
             pending: bool = False) -> None:
        s = reading.summary
        step = "-" if s["last_step"] is None else s["last_step"]
        rate = self.view.rate()
        count = s["probe_steps"]
        progress = (f"step {step}: {status}, {count} probe step{'s' if count != 1 else ''}"
                    + (f", {rate:.3g} steps/s" if math.isfinite(rate) else ""))
        ended = status != "training"
        if not ended and time.monotonic() - self._progress_at >= PLAIN_PROGRESS_SECONDS:
            self._progress_at = time.monotonic()
            self._line(progress)
        for change in changes:
            finding_id, subject = change.key
            if change.kind == "cleared":
                self._line(f"step {step}: cleared  {finding_id} '{subject}'")
                continue
            f = change.finding
            was = f" (was {change.was})" if change.kind == "severity" else ""
            held = f" ({_held(f)})" if f.steps is not None else ""
            self._line(f"step {step}: {f.severity}{was}  {f.id} '{f.subject}'  "
                       f"[{f.key_number}]  {f.title}{held}")
        if ended:
            self._line(progress)


def _wait_for(path: Path, timeout: float, every: float, screen) -> None:
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
        screen.waiting("waiting for the run file to appear")
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))


def _follow(path: Path, every: float, timeout: float, thresholds: Thresholds | None,
            screen, view: _View) -> tuple[Reading | None, str]:
    """The watch loop: the last reading, and how the run ended (see the module docstring)."""
    reading: Reading | None = None
    mark: tuple | None = None
    state, failures, pause, changes = WRITING, 0, every, []
    try:
        _wait_for(path, timeout, every, screen)
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
                changes += view.update(reading)
                # On a run so long that a reading takes longer than `every`, wait as long
                # as it took: the watcher never takes more than about half a core.
                pause = max(every, time.monotonic() - started)
            if now is None:  # a checkpoint, not a run file being written: nothing follows
                state = CLOSED
            if state != WRITING:
                break
            screen.show(reading, "training", changes, pending=not first_step_seen)
            changes = []
            time.sleep(pause)
    except KeyboardInterrupt:
        state = "interrupted"
    if reading is not None:
        screen.show(reading, ENDINGS[state], changes)
    return reading, state


def watch(path: str | os.PathLike, *, every: float = 2.0, timeout: float = 600.0,
          thresholds: Thresholds | None = None, console: Console | None = None,
          plain: bool | None = None) -> WatchResult:
    """Show the run at ``path`` live until its writer closes it (or is gone, or Ctrl-C).

    ``plain``: one line per change, each written as it happens (for a CI log), instead of a
    view redrawn in place; None (the default): plain when ``console`` is not a terminal.
    Raises :class:`gradprobe.record.RunFileError` for a file that is not a run, or none
    appearing within ``timeout`` seconds.
    """
    path = Path(path)
    view = _View(str(path))
    console = console or Console()
    plain = not console.is_terminal if plain is None else plain
    with (_PlainScreen if plain else _LiveScreen)(console, view) as screen:
        reading, state = _follow(path, every, timeout, thresholds, screen, view)
    if reading is None:
        raise KeyboardInterrupt
    return WatchResult({CLOSED: "closed", GONE: "gone"}.get(state, state), reading)
