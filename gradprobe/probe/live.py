"""Findings while the run trains: ``probe.findings()`` and ``Probe(on_finding=...)``.

When the diagnosis runs: at a *safe point*, the start of ``probe.backward`` (or
``before_backward``) of every step that is a multiple of ``findings_every`` (500 by default),
once something new was committed to the run file since the last diagnosis. That is between
two optimiser steps and outside any autograd backward, so a callback may change a loss weight
(a weights dict the loop passes to this very ``backward`` call is read after it), log, alert,
or set a flag the loop reads to stop.

Each finding at warning or error is handed over once, the first time it appears (a finding is
its id and subject: a severity that rises from info to warning counts as appearing), to the
``on_finding`` callback and to every sink that has a ``write_finding(step, finding)`` method.
A receiver that raises is reported once (a :class:`GradprobeWarning`) and receives nothing
more; a diagnosis that fails is reported once and the scheduled diagnosis stops; training goes
on either way. docs/live.md has the details and the measured cost.

Stage rule: the probe stage does not import ``gradprobe.diagnose`` (a later stage) at module
level; :meth:`LiveFindings.findings` imports it inside the call, the one documented exception:
the user asks the probe, at run time, for the later stage's verdict on what was recorded.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from gradprobe.record import change_mark, load_run, run_from_bytes

from .notices import warn_user

ALERT_SEVERITIES = ("error", "warning")
# probe.findings() waits at most this long for the steps handed to the writer thread (each
# takes milliseconds; a wait for the device's copy of a step can take longer).
COMMIT_WAIT_SECONDS = 10.0


class LiveFindings:
    """Diagnoses what a run writer has committed so far; calls back on new findings."""

    def __init__(self, on_finding: Callable[[Any], Any] | None, every: int):
        self.on_finding = on_finding
        self.every = every
        self._mark: tuple | None = None
        self._cached: list | None = None
        self._handed_over: set[tuple[str, str]] = set()
        self._failed_receivers: set = set()
        self._scheduled = True

    def findings(self, writer: Any, thresholds: Any = None, wait: bool = True) -> list:
        """The findings of what ``writer`` has committed, read from the run file as another
        reader would read it. ``wait``: first wait, up to :data:`COMMIT_WAIT_SECONDS`, for the
        writer thread to commit every step already handed to it (without it, a call right
        after the first ``backward`` could find no step yet and report the run as
        ``probe-incomplete``)."""
        from gradprobe.diagnose import diagnose  # the documented exception (module docstring)

        if writer.path is None:
            run, mark = run_from_bytes(writer.to_bytes(), "(in-memory run)"), None
        else:
            if wait:
                writer.wait_committed(COMMIT_WAIT_SECONDS)
            mark = change_mark(writer.path)
            if mark is not None and mark == self._mark and thresholds is None:
                return list(self._cached)
            run = load_run(writer.path)
        try:
            found = diagnose(run, thresholds)
        finally:
            run.close()
        if thresholds is None:
            self._mark, self._cached = mark, list(found)
        return found

    def at_safe_point(self, step: int, writer: Any, sinks: Iterable[Any]) -> None:
        """Diagnose and hand new findings over, when ``step`` is due (see the module docstring)."""
        if step % self.every or step == 0 or not self._scheduled:
            return  # the cost of a step that is not due: this test
        receivers = self._receivers(sinks)
        if not receivers:
            return
        try:
            # Not waiting for the writer thread: training goes on with what it committed.
            found = self.findings(writer, wait=False)
        except Exception as exc:  # noqa: BLE001 - the observer must not harm the observed
            self._scheduled = False
            warn_user(f"gradprobe: step {step}: diagnosing the run so far failed "
                      f"({type(exc).__name__}: {exc}); findings are no longer checked during "
                      "training (gradprobe analyze still reads the run file)")
            return
        for finding in found:
            key = (finding.id, finding.subject)
            if finding.severity not in ALERT_SEVERITIES or key in self._handed_over:
                continue
            self._handed_over.add(key)
            for receiver, name, receive in receivers:
                if receiver not in self._failed_receivers:
                    self._hand_over(step, receiver, name, receive, finding)

    def _receivers(self, sinks: Iterable[Any]) -> list[tuple[Any, str, Callable]]:
        """``(key, name, receive(step, finding))`` of the callback and each finding sink that
        has not failed."""
        found = []
        if self.on_finding is not None:
            found.append(("on_finding", "on_finding", lambda step, finding: self.on_finding(finding)))
        for sink in sinks:
            write = getattr(sink, "write_finding", None)
            if callable(write):
                found.append((id(sink), f"sink {type(sink).__name__}", write))
        return [r for r in found if r[0] not in self._failed_receivers]

    def _hand_over(self, step: int, receiver: Any, name: str, receive: Callable,
                   finding: Any) -> None:
        try:
            receive(step, finding)
        except Exception as exc:  # noqa: BLE001 - a callback's error must not stop training
            self._failed_receivers.add(receiver)
            warn_user(f"gradprobe: step {step}: {name} raised {type(exc).__name__}: {exc} "
                      f"(for finding {finding.id!r}); it receives no more findings and "
                      "training goes on")
