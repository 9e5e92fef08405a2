"""Writing the run file (:mod:`gradprobe.record.schema`) on the calling thread: one
transaction a probe step, one writer a file (an exclusive lock beside it)."""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from .follow import lock_file
from .schema import (FORMAT_NAME, SCHEMA_SQL, SCHEMA_VERSION, SQLITE_MAGIC, RunFileError,
                     memory_database, pack_ids, pack_values, portable_bytes)


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
                    "give this probe its own run_file= path") from None
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
            self._conn.executescript(SCHEMA_SQL)
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
