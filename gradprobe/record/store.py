"""The run file: a single SQLite database in WAL mode, streamed to during training.

Why SQLite: one file, transactional commits (a SIGKILL loses at most the step being
written), a concurrent reader while the trainer writes (WAL), and it ships with Python.

Layout (schema version 1):

- ``meta(key, value)``: JSON values: schema version, losses, roles, shared parameters...
- ``series(id, quantity, name)``: one row per recorded scalar series.
- ``step_scalars(id, step, ids, vals)``: the scalars, step-major: one row per step per
  commit (a probe step; scalars logged between probe steps may add more rows for the same
  step). ``ids`` is a blob of little-endian int32 series ids, ``vals`` a blob of as many
  little-endian float64 values (NaN stays NaN). When a (series, step) occurs more than once,
  the row with the highest ``id`` (the last written) wins. One row per step keeps a commit to
  one appended page, and lets the reader load every series in one vectorised pass.
- ``arrays(quantity, name, step, dtype, shape, data)``: small arrays (Gram matrices,
  singular spectra, histograms, group ids, prototype snapshots).
- ``events(step, kind, name, message)``: non-finite values, inert losses, probe errors.
- ``steps(step, wall_time)``: every probe step that was committed.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import sqlite3
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .follow import lock_file

SCHEMA_VERSION = 1
FORMAT_NAME = "gradprobe.run"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, quantity TEXT NOT NULL, name TEXT NOT NULL, UNIQUE (quantity, name));
CREATE TABLE IF NOT EXISTS step_scalars (
    id INTEGER PRIMARY KEY, step INTEGER NOT NULL, ids BLOB NOT NULL, vals BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS arrays (
    quantity TEXT NOT NULL, name TEXT NOT NULL, step INTEGER NOT NULL,
    dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (quantity, name, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    step INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY, wall_time REAL NOT NULL);
"""

SQLITE_MAGIC = b"SQLite format 3\x00"


def pack_ids(ids) -> bytes:
    """Series ids as the ``step_scalars.ids`` blob: little-endian int32."""
    ids = tuple(ids)
    return struct.pack(f"<{len(ids)}i", *ids)


def pack_values(values) -> bytes:
    """Values as the ``step_scalars.vals`` blob: little-endian float64 (NaN stays NaN)."""
    values = tuple(values)
    return struct.pack(f"<{len(values)}d", *values)


def portable_bytes(data: bytes) -> bytes:
    """Database bytes an in-memory connection can open: header bytes 18-19 say 'WAL' (2)
    in a WAL-mode file, and an in-memory database only opens with the legacy value (1)."""
    if len(data) >= 20 and data[:16] == SQLITE_MAGIC and data[18:20] == b"\x02\x02":
        return data[:18] + b"\x01\x01" + data[20:]
    return data


def memory_database(data: bytes) -> sqlite3.Connection:
    """An in-memory connection holding a copy of run-file bytes (a checkpoint's copy).

    Raises what SQLite raises for bytes it cannot take; callers name the problem.
    """
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        conn.deserialize(portable_bytes(data))
    except BaseException:
        conn.close()
        raise
    return conn


class RunFileError(Exception):
    """A run file or checkpoint that cannot be read or written; the message is one line."""

    def __init__(self, message: str = ""):
        # SQLite's and torch's own messages can span lines (a schema quoted in an error):
        # fold them, so that the CLI prints exactly one line.
        super().__init__(" ".join(str(message).split()))


class RunWriter:
    """Appends probe steps to a run file (or to an in-memory database when ``path`` is None).

    Each ``write_step`` is one transaction, committed before it returns, so a process killed
    at any moment leaves every earlier step readable. Scalars logged between probe steps are
    buffered and committed with the next step, or after ``flush_seconds`` at the latest.
    A second writer on the same file is refused (an exclusive lock on ``<path>.lock``).

    ``commit_seconds`` > 0 trades that guarantee for speed (group commit): steps are committed
    together at most every ``commit_seconds``, so a SIGKILL loses at most the steps of that
    window (docs/run-file.md). The default, 0, commits every step.

    The first failed write (disk full, file unwritable, I/O error) raises one
    :class:`RunFileError`; the writer is then *failed*: later writes raise at once, ``close``
    releases the file without raising again, and every step committed before stays readable.
    """

    def __init__(self, path: str | os.PathLike | None, *, flush_seconds: float = 5.0,
                 initial_bytes: bytes | None = None, overwrite: bool = False,
                 commit_seconds: float = 0.0):
        self.path = None if path is None else Path(path)
        self.flush_seconds = flush_seconds
        self.commit_seconds = commit_seconds
        self.error: str | None = None
        self._series_ids: dict[tuple[str, str], int] = {}
        self._pending_scalars: list[tuple[str, str, int, float]] = []
        self._pending_events: list[tuple[int, str, str, str]] = []
        self._last_commit = time.monotonic()
        self._uncommitted = False
        self._lock_file = None
        self._closed_bytes = b""
        self._conn: sqlite3.Connection | None = None
        if self.path is None:
            try:
                self._conn = memory_database(initial_bytes) if initial_bytes else \
                    sqlite3.connect(":memory:", check_same_thread=False)
            except sqlite3.Error as exc:
                raise RunFileError(f"cannot resume from the run data: {exc}") from None
        else:
            self._open_file(initial_bytes, overwrite)
        try:
            self._init_schema()
        except (sqlite3.Error, OSError, ValueError) as exc:
            self._conn.close()
            self._conn = None
            self._release_lock()
            where = self.path if self.path is not None else "the in-memory run"
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise RunFileError(f"cannot write to {where}: {reason}") from None

    def _open_file(self, initial_bytes: bytes | None, overwrite: bool) -> None:
        assert self.path is not None
        if self.path.is_dir():
            raise RunFileError(f"cannot write the run file: {self.path} is a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFileError(f"cannot write the run file {self.path}: cannot create its "
                               f"directory ({exc.strerror})") from None
        self._acquire_lock()
        try:
            if overwrite:
                # Only once the lock is held: never delete a file another probe is writing.
                for suffix in ("", "-wal", "-shm"):
                    Path(str(self.path) + suffix).unlink(missing_ok=True)
            exists = self.path.exists() and self.path.stat().st_size > 0
            if exists:
                with open(self.path, "rb") as fh:
                    if fh.read(16) != SQLITE_MAGIC:
                        raise RunFileError(f"cannot append to {self.path}: it exists and is not "
                                           "a gradprobe run file")
            elif initial_bytes:
                # Resuming from a checkpoint whose run file is gone: recreate it from the copy
                # the checkpoint carries, then keep appending to it.
                source = memory_database(initial_bytes)
                target = sqlite3.connect(self.path)
                source.backup(target)
                source.close()
                target.close()
            self._conn = sqlite3.connect(self.path, check_same_thread=False)
            # A closed run is in rollback-journal mode (see close); entering WAL mode again
            # needs a moment without readers: wait for one that is reading it right now.
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives the process being killed (it is in the OS cache);
            # only a power loss can drop the last transactions.
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except RunFileError:
            self._release_lock()
            raise
        except (sqlite3.Error, OSError) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._release_lock()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise RunFileError(f"cannot open run file {self.path}: {reason}") from None

    @property
    def _lock_path(self) -> Path:
        assert self.path is not None
        return lock_file(self.path)

    def _acquire_lock(self) -> None:
        import fcntl

        lock_path = self._lock_path
        while True:
            try:
                self._lock_file = open(lock_path, "a+")
            except OSError as exc:
                raise RunFileError(f"cannot write the run file {self.path}: {exc.strerror} "
                                   f"(creating {lock_path.name})") from None
            try:
                try:
                    fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    # The holder may be a writer of this process that nothing references any
                    # more (a probe dropped without close(), kept alive by a reference cycle):
                    # collect it, which releases its lock, before calling the file busy.
                    gc.collect()
                    fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock_file.close()
                self._lock_file = None
                raise RunFileError(
                    f"run file {self.path} is already being written by another probe; "
                    "give this probe its own log= path") from None
            # A closing writer deletes the lock file while it holds the lock: a lock taken on
            # the file it deleted guards nothing, so take the lock of the file there now.
            if self._holds_lock_path():
                return
            self._lock_file.close()
            self._lock_file = None

    def _holds_lock_path(self) -> bool:
        try:
            return os.stat(self._lock_path).st_ino == os.fstat(self._lock_file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def _release_lock(self, delete: bool = False) -> None:
        """Release the lock; ``delete``: remove the lock file first (while still holding it,
        so that no other writer can hold a lock on it; see :meth:`_acquire_lock`)."""
        if self._lock_file is not None:
            if delete:
                try:
                    self._lock_path.unlink()
                except OSError:
                    pass  # a leftover lock file is harmless
            self._lock_file.close()
            self._lock_file = None

    def _init_schema(self) -> None:
        with self._conn:
            self._conn.executescript(_SCHEMA)
            version = self._conn.execute(
                "SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if version is None:
                self._conn.execute("INSERT INTO meta VALUES ('format', ?)", (json.dumps(FORMAT_NAME),))
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                                   (json.dumps(SCHEMA_VERSION),))
            elif json.loads(version[0]) != SCHEMA_VERSION:
                raise RunFileError(
                    f"cannot append to run file {self.path}: it has schema version "
                    f"{json.loads(version[0])}, this gradprobe writes version {SCHEMA_VERSION}")
        for sid, quantity, name in self._conn.execute("SELECT id, quantity, name FROM series"):
            self._series_ids[(quantity, name)] = sid

    # -- writing -----------------------------------------------------------------------

    def _check_usable(self) -> sqlite3.Connection:
        if self.error is not None:
            raise RunFileError(self.error)
        if self._conn is None:
            raise RunFileError(f"run file {self.path or '(in memory)'} is closed")
        return self._conn

    def _failed(self, exc: BaseException, doing: str) -> RunFileError:
        """Record the first write failure; the writer accepts nothing more after it."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = self.path if self.path is not None else "the in-memory run"
        self.error = (f"cannot write {where} ({doing}): {reason}; the steps committed "
                      "before stay readable")
        self._pending_scalars.clear()
        self._pending_events.clear()
        if self._conn is not None:
            try:
                self._conn.rollback()
            except (sqlite3.Error, OSError):
                pass
        self._uncommitted = False
        return RunFileError(self.error)

    def set_meta(self, **items: Any) -> None:
        conn = self._check_usable()
        try:
            with conn:
                conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in items.items()])
        except (sqlite3.Error, OSError) as exc:
            raise self._failed(exc, "writing metadata") from None

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._check_usable().execute("SELECT value FROM meta WHERE key=?",
                                           (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def last_step(self) -> int | None:
        row = self._check_usable().execute("SELECT MAX(step) FROM steps").fetchone()
        return row[0]

    def _series_id(self, quantity: str, name: str) -> int:
        key = (quantity, name)
        sid = self._series_ids.get(key)
        if sid is None:
            cur = self._conn.execute("INSERT INTO series (quantity, name) VALUES (?, ?)", key)
            sid = self._series_ids[key] = cur.lastrowid
        return sid

    def add_scalars(self, step: int, scalars: dict[tuple[str, str], float]) -> None:
        """Buffer scalars logged between probe steps; committed with the next step."""
        self._check_usable()
        self._pending_scalars.extend((q, n, step, float(v)) for (q, n), v in scalars.items())
        if time.monotonic() - self._last_commit > self.flush_seconds:
            self.flush()

    def add_event(self, step: int, kind: str, name: str, message: str) -> None:
        if self.error is None:
            self._pending_events.append((step, kind, name, message))

    def write_step(self, step: int, scalars: dict[tuple[str, str], float],
                   arrays: dict[tuple[str, str], np.ndarray] | None = None) -> None:
        """Commit one probe step (and everything buffered before it) as one transaction.

        With ``commit_seconds`` > 0 the transaction is committed once that long has passed
        since the last commit (group commit), else left open for the next steps.
        """
        conn = self._check_usable()
        values = {key: float(v) for key, v in scalars.items()}
        try:
            self._write_pending(step, values)
            for (quantity, name), array in (arrays or {}).items():
                array = np.ascontiguousarray(array)
                conn.execute(
                    "INSERT OR REPLACE INTO arrays VALUES (?, ?, ?, ?, ?, ?)",
                    (quantity, name, step, array.dtype.str, json.dumps(list(array.shape)),
                     array.tobytes()))
            conn.execute("INSERT OR REPLACE INTO steps VALUES (?, ?)", (step, time.time()))
            self._uncommitted = True
            if self.commit_seconds <= 0 or \
                    time.monotonic() - self._last_commit >= self.commit_seconds:
                conn.commit()
                self._uncommitted = False
                self._last_commit = time.monotonic()
        except (sqlite3.Error, OSError) as exc:
            raise self._failed(exc, f"step {step}") from None

    def _write_pending(self, step: int | None = None,
                       scalars: dict[tuple[str, str], float] | None = None) -> None:
        """Insert the buffered scalars and events, then ``scalars`` of probe step ``step``:
        one step_scalars row per step, {series id: value}, the last value of a series wins."""
        by_step: dict[int, dict[int, float]] = {}
        for q, n, at, value in self._pending_scalars:
            values = by_step.get(at)
            if values is None:
                values = by_step[at] = {}
            values[self._series_id(q, n)] = value
        if scalars:
            values = by_step.get(step)
            if values is None:
                values = by_step[step] = {}
            known = self._series_ids
            for key, value in scalars.items():
                sid = known.get(key)
                values[self._series_id(*key) if sid is None else sid] = value
        if by_step:
            self._conn.executemany(
                "INSERT INTO step_scalars (step, ids, vals) VALUES (?, ?, ?)",
                [(step, pack_ids(values), pack_values(values.values()))
                 for step, values in by_step.items()])
        if self._pending_events:
            self._conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", self._pending_events)
        self._pending_scalars.clear()
        self._pending_events.clear()

    def flush(self) -> None:
        """Commit everything buffered (logged scalars, events, a group-commit window)."""
        conn = self._check_usable()
        try:
            self._write_pending()
            conn.commit()
        except (sqlite3.Error, OSError) as exc:
            raise self._failed(exc, "flushing") from None
        self._uncommitted = False
        self._last_commit = time.monotonic()

    def to_bytes(self) -> bytes:
        """The whole database as bytes (what a checkpoint carries); works after ``close``
        and after a failed write too (then it holds the steps committed before)."""
        if self._conn is None:
            if self.path is None:
                data = self._closed_bytes
            else:
                data = _read_database_bytes(self.path)
        else:
            if self.error is None:
                self.flush()
            try:
                data = self._conn.serialize()
            except (sqlite3.Error, OSError, MemoryError) as exc:
                raise RunFileError(f"cannot copy the run data: {exc}") from None
        return portable_bytes(data)

    def close(self) -> None:
        """Commit what is pending and release the file; safe to call twice.

        Raises :class:`RunFileError` (once) when that last commit fails; after an earlier
        failure it only releases the file. The closed run is one file: the WAL is folded into
        it and the file leaves WAL mode (so a later reader creates no ``-wal``/``-shm`` beside
        it), and the lock file is deleted. A reader that still holds the file open keeps it in
        WAL mode (nothing is lost; SQLite's files stay until the last reader closes).
        """
        if self._conn is None:
            return
        conn = self._conn
        error: RunFileError | None = None
        try:
            if self.error is None:
                try:
                    self.flush()
                    if self.path is not None:
                        # A reader holding the file open must not keep us waiting.
                        conn.execute("PRAGMA busy_timeout=200")
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                        self._leave_wal_mode(conn)
                except RunFileError as exc:
                    error = exc
                except (sqlite3.Error, OSError) as exc:
                    error = self._failed(exc, "closing")
            if self.path is None:
                try:
                    self._closed_bytes = conn.serialize()
                except (sqlite3.Error, MemoryError):
                    self._closed_bytes = b""
        finally:
            try:
                conn.close()
            except (sqlite3.Error, OSError):
                pass
            self._conn = None
            self._release_lock(delete=True)
        if error is not None:
            raise error

    @staticmethod
    def _leave_wal_mode(conn: sqlite3.Connection) -> None:
        """Switch the (checkpointed) file to rollback-journal mode, which SQLite does safely
        against a crash at any point; a resumed writer switches it back to WAL. A reader with
        the file open makes SQLite refuse ("locked"): the file then stays in WAL mode."""
        try:
            conn.execute("PRAGMA journal_mode=DELETE").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise


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


def _read_database_bytes(path: Path) -> bytes:
    """A closed run file's bytes, with anything still in its WAL."""
    try:
        conn = sqlite3.connect(f"file:{path.resolve().as_posix()}?mode=ro", uri=True)
        try:
            return conn.serialize()
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise RunFileError(f"cannot read {path}: {exc}") from None
