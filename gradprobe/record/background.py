"""Writing the run file on a thread of its own: the training thread hands a step over to
:class:`BackgroundRunWriter` and goes on, the writer thread commits it with a
:class:`~gradprobe.record.store.RunWriter`."""

from __future__ import annotations

import os
import queue
import threading
import weakref
from typing import Any, Callable

import numpy as np

from .schema import RunFileError
from .store import RunWriter

Scalars = dict[tuple[str, str], float]
Arrays = dict[tuple[str, str], np.ndarray]


class BackgroundRunWriter:
    """A :class:`RunWriter` that writes on a thread of its own: the training thread hands a
    step over and goes on; it never waits on the disk.

    Same methods as :class:`RunWriter`, plus :meth:`submit`, which hands over a function that
    makes a step's numbers on the writer thread (one that waits for a non-blocking copy from
    the device, say, and finishes the metrics on the host). Steps, events, logged scalars and
    metadata are written in the order they were handed over, each step as one transaction.

    What "committed" means: a step is committed once its transaction is in the file
    (:attr:`committed_step` is the last such step); from then on a crash of the process
    (SIGKILL included) cannot lose it. Handing a step over does not commit it: a SIGKILL loses
    the steps handed over but not yet committed, at most ``max_pending`` waiting plus the one
    being written; with ``max_pending`` steps waiting, handing over waits (a slow disk slows
    training rather than piling steps up in memory). :meth:`flush` returns once everything
    handed over before it is committed. :meth:`close`, the garbage collection of a writer never
    closed and the interpreter's exit (after an uncaught exception too) commit everything
    handed over.

    An error on the writer thread (a failed write; an exception in a submitted function) is
    raised once, by the next call that hands something over, :meth:`flush` or :meth:`close`.
    After a failed write, as with :class:`RunWriter`, every later write raises at once,
    ``close`` only releases the file and every step committed before stays readable.
    """

    def __init__(self, path: str | os.PathLike | None, *, max_pending: int = 8,
                 flush_seconds: float = 5.0, initial_bytes: bytes | None = None,
                 overwrite: bool = False):
        # Opened here, on the caller's thread: a file that cannot be written is an error now.
        self._writer = RunWriter(path, flush_seconds=flush_seconds, initial_bytes=initial_bytes,
                                 overwrite=overwrite)
        self.path = self._writer.path
        self._shared = _Shared()
        self._items: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._closed = False
        # The thread and the finalizer hold the inner writer, never this object: a writer
        # nobody references is collected, and its finalizer commits and releases the file.
        self._thread = threading.Thread(target=_write_items,
                                        args=(self._writer, self._items, self._shared),
                                        name="gradprobe-run-writer", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_writing, self._items, self._thread,
                                           os.getpid(), self._shared)

    # -- handing over --------------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """The failed write, as :attr:`RunWriter.error` (None while writing works)."""
        return self._writer.error

    @property
    def committed_step(self) -> int | None:
        """The last step whose transaction is in the file (None before the first)."""
        return self._shared.committed_step

    def write_step(self, step: int, scalars: Scalars, arrays: Arrays | None = None) -> None:
        """Hand one probe step over (the arrays must not change afterwards)."""
        self._hand_over(("step", step, dict(scalars), dict(arrays or {})))

    def submit(self, step: int, make: Callable[[], tuple]) -> None:
        """Hand over a function that returns the step's ``(scalars, arrays)``, or ``(scalars,
        arrays, events)`` with events ``(kind, name, message)`` found in its numbers; it runs
        on the writer thread, in order with everything else handed over, and must not call
        this writer (it would wait for itself)."""
        self._hand_over(("make", step, make))

    def add_scalars(self, step: int, scalars: Scalars) -> None:
        """Scalars logged between probe steps; committed with the next step."""
        self._hand_over(("scalars", step, dict(scalars)))

    def add_event(self, step: int, kind: str, name: str, message: str) -> None:
        """Never raises (as :meth:`RunWriter.add_event`); dropped after a failed write."""
        if not self._closed and self._writer.error is None:
            self._put(("event", step, kind, name, message))

    def set_meta(self, **items: Any) -> None:
        self._hand_over(("meta", items))

    def flush(self) -> None:
        """Return once everything handed over before is committed (raises a pending error)."""
        done = threading.Event()
        self._hand_over(("flush", done))
        done.wait()
        self._raise_pending()

    def wait_committed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for everything handed over before to be committed;
        True when it was (or nothing can be: the writer is closed or failed). Raises nothing:
        an error of the writer thread is raised by the next call that hands something over."""
        if self._closed or self._writer.error is not None:
            return True
        done = threading.Event()
        self._put(("flush", done))
        return done.wait(timeout)

    # -- reading what was committed ----------------------------------------------------

    def last_step(self) -> int | None:
        self.flush()
        with self._shared.lock:
            return self._writer.last_step()

    def get_meta(self, key: str, default: Any = None) -> Any:
        self.flush()
        with self._shared.lock:
            return self._writer.get_meta(key, default)

    def to_bytes(self) -> bytes:
        """The whole database as bytes, everything handed over included."""
        if not self._closed and self._writer.error is None:
            self.flush()
        with self._shared.lock:
            return self._writer.to_bytes()

    def close(self) -> None:
        """Commit everything handed over and release the file (:meth:`RunWriter.close`);
        raises an error of the writer thread not raised before. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        self._raise_pending()

    # -- internals -----------------------------------------------------------------------

    def _hand_over(self, item: tuple) -> None:
        if self._closed:
            raise RunFileError(f"run file {self.path or '(in memory)'} is closed")
        self._raise_pending()
        if self._writer.error is not None:
            raise RunFileError(self._writer.error)
        self._put(item)

    def _put(self, item: tuple) -> None:
        while True:
            try:
                self._items.put(item, timeout=1.0)
                return
            except queue.Full:
                if not self._thread.is_alive():  # cannot happen: the loop catches everything
                    raise RunFileError("the run file's writer thread stopped") from None

    def _raise_pending(self) -> None:
        error = self._shared.take_error()
        if error is not None:
            raise error


class _Shared:
    """What the writer thread shares with the thread that hands steps over."""

    def __init__(self):
        self.lock = threading.Lock()  # held while the writer thread uses the database
        self.committed_step: int | None = None
        self.stop = False  # set by a finalizer that ran on the writer thread itself
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()

    def keep_error(self, exc: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = exc

    def take_error(self) -> BaseException | None:
        with self._error_lock:
            error, self._error = self._error, None
        return error


def _write_items(writer: RunWriter, items: queue.Queue, shared: _Shared) -> None:
    """The writer thread: write what is handed over, in order, until told to close."""
    while True:
        item = items.get()
        kind = item[0]
        try:
            if kind != "close" and writer.error is None:  # after a failed write: drop it
                _write_item(writer, item, shared)
            if kind == "close" or (shared.stop and items.empty()):
                kind = "close"
                with shared.lock:
                    writer.close()
        except BaseException as exc:  # handed to the training thread, raised there once
            shared.keep_error(exc)
        finally:
            if item[0] == "flush":
                item[1].set()
        if kind == "close":
            return


def _write_item(writer: RunWriter, item: tuple, shared: _Shared) -> None:
    kind = item[0]
    if kind == "make":
        _, step, make = item
        made = make()  # outside the lock: it may take a while
        scalars, arrays, events = made if len(made) == 3 else (*made, ())
        with shared.lock:
            for event in events:
                writer.add_event(step, *event)
        item = ("step", step, scalars, arrays or {})
        kind = "step"
    with shared.lock:
        if kind == "step":
            _, step, scalars, arrays = item
            writer.write_step(step, scalars, arrays)
            shared.committed_step = step
        elif kind == "scalars":
            writer.add_scalars(item[1], item[2])
        elif kind == "event":
            writer.add_event(*item[1:])
        elif kind == "meta":
            writer.set_meta(**item[1])
        elif kind == "flush":
            writer.flush()


def _stop_writing(items: queue.Queue, thread: threading.Thread, owner: int,
                  shared: _Shared) -> None:
    """Close (commit everything handed over) and wait for the writer thread to finish. In a
    forked child, whose copy has no writer thread, do nothing; on the writer thread itself (a
    garbage collection that ran there), ask it to close once the queue is empty."""
    if os.getpid() != owner or not thread.is_alive():
        return
    if threading.current_thread() is thread:
        shared.stop = True
        return
    items.put(("close",))
    thread.join()
