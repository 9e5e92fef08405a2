"""What the probe tells: events in the run file, and warnings to the user, each once per kind
and name; what the writer thread found is told here too, on the training thread, at the next
call into the probe (:meth:`Notices.run`).
"""

from __future__ import annotations

import collections
import sys
import warnings
from typing import Any, Callable, Iterable

from gradprobe._warnings import GradprobeWarning


class Notices:
    """Events and warnings of one probe. ``writer``: the run file's writer (None on a rank
    that records nothing: its events are dropped and it warns only about its own failures)."""

    def __init__(self, writer: Any):
        self.writer = writer
        self._warned: set[tuple[str, str]] = set()
        self._later: collections.deque[Callable[[], None]] = collections.deque()

    def event(self, step: int, kind: str, name: str, message: str,
              also: Iterable[str] = (), warn: bool = True) -> None:
        """Record an event (for ``name`` and the names in ``also``) and warn once per kind and
        name."""
        if self.writer is None:
            return
        names = [name, *also]
        for each in names:
            self.writer.add_event(step, kind, each, message)
        self.warn_once(step, kind, names, message, warn)

    def warn_once(self, step: int, kind: str, names: list[str], message: str,
                  warn: bool = True) -> None:
        """Warn about an event already recorded (by the writer thread, say)."""
        # A GradScaler skipping a step now and then is how it works: recorded, not warned.
        fresh = [(kind, each) for each in names if (kind, each) not in self._warned]
        if warn and kind != "skipped_step" and fresh:
            self._warned.update(fresh)
            warn_user(f"gradprobe: step {step}: {message}")

    def note_once(self, key: str, message: str) -> None:
        """A warning about ``key`` that is no event (a latent taken by convention, say)."""
        if ("note", key) not in self._warned:
            self._warned.add(("note", key))
            warn_user(f"gradprobe: {message}")

    def later(self, told: Callable[[], None]) -> None:
        """From the writer thread: something to tell on the training thread."""
        self._later.append(told)

    def run(self) -> None:
        """Tell what the writer thread found since the last call."""
        while self._later:
            self._later.popleft()()


def warn_user(message: str, category: type[Warning] = GradprobeWarning) -> None:
    """A warning (a :class:`GradprobeWarning` unless told), attributed to the user's line that
    called the probe."""
    warnings.warn(message, category, stacklevel=_user_frame())


def _user_frame() -> int:
    """The stack level of the innermost frame outside gradprobe.probe (for ``warnings.warn``)."""
    frame, level = sys._getframe(2), 2
    package = __name__.rsplit(".", 1)[0].replace(".", "/")
    while frame is not None and package in frame.f_code.co_filename.replace("\\", "/"):
        frame, level = frame.f_back, level + 1
    return level
