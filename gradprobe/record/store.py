"""The run file: a single SQLite database in WAL mode, streamed to during training.

Why SQLite: one file, transactional commits (a SIGKILL loses at most the step being
written), a concurrent reader while the trainer writes (WAL), and it ships with Python.

Layout (schema version 1):

- ``meta(key, value)``: JSON values: schema version, losses, roles, shared parameters...
- ``series(id, quantity, name)``: one row per recorded scalar series.
- ``scalars(series, step, value)``: the long-form scalar table (NaN is stored as NULL,
  which SQLite does by itself; the reader turns NULL back into NaN).
- ``arrays(quantity, name, step, dtype, shape, data)``: small arrays (Gram matrices,
  singular spectra, histograms, group ids, prototype snapshots).
- ``events(step, kind, name, message)``: non-finite values, inert losses, probe errors.
- ``steps(step, wall_time)``: every probe step that was committed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
FORMAT_NAME = "gradprobe.run"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, quantity TEXT NOT NULL, name TEXT NOT NULL, UNIQUE (quantity, name));
CREATE TABLE IF NOT EXISTS scalars (
    series INTEGER NOT NULL, step INTEGER NOT NULL, value REAL,
    PRIMARY KEY (series, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS arrays (
    quantity TEXT NOT NULL, name TEXT NOT NULL, step INTEGER NOT NULL,
    dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (quantity, name, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    step INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY, wall_time REAL NOT NULL);
"""

SQLITE_MAGIC = b"SQLite format 3\x00"


def portable_bytes(data: bytes) -> bytes:
    """Database bytes an in-memory connection can open: header bytes 18-19 say 'WAL' (2)
    in a WAL-mode file, and an in-memory database only opens with the legacy value (1)."""
    if len(data) >= 20 and data[:16] == SQLITE_MAGIC and data[18:20] == b"\x02\x02":
        return data[:18] + b"\x01\x01" + data[20:]
    return data


class RunFileError(Exception):
    """A run file or checkpoint that cannot be read or written; the message is one line."""


class RunWriter:
    """Appends probe steps to a run file (or to an in-memory database when ``path`` is None).

    Each ``write_step`` is one transaction, committed before it returns, so a process killed
    at any moment leaves every earlier step readable. Scalars logged between probe steps are
    buffered and committed with the next step, or after ``flush_seconds`` at the latest.
    A second writer on the same file is refused (an exclusive lock on ``<path>.lock``).
    """

    def __init__(self, path: str | os.PathLike | None, *, flush_seconds: float = 5.0,
                 initial_bytes: bytes | None = None):
        self.path = None if path is None else Path(path)
        self.flush_seconds = flush_seconds
        self._series_ids: dict[tuple[str, str], int] = {}
        self._pending_scalars: list[tuple[str, str, int, float]] = []
        self._pending_events: list[tuple[int, str, str, str]] = []
        self._last_commit = time.monotonic()
        self._lock_file = None
        if self.path is None:
            self._conn = sqlite3.connect(":memory:", check_same_thread=False)
            if initial_bytes:
                self._conn.deserialize(initial_bytes)
        else:
            self._open_file(initial_bytes)
        self._init_schema()

    def _open_file(self, initial_bytes: bytes | None) -> None:
        assert self.path is not None
        if self.path.is_dir():
            raise RunFileError(f"cannot write the run file: {self.path} is a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists:
            with open(self.path, "rb") as fh:
                if fh.read(16) != SQLITE_MAGIC:
                    self._release_lock()
                    raise RunFileError(
                        f"cannot append to {self.path}: it exists and is not a gradprobe run file")
        elif initial_bytes:
            # Resuming from a checkpoint whose run file is gone: recreate it from the copy
            # the checkpoint carries, then keep appending to it.
            source = sqlite3.connect(":memory:")
            source.deserialize(initial_bytes)
            target = sqlite3.connect(self.path)
            source.backup(target)
            source.close()
            target.close()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives the process being killed (it is in the OS cache);
            # only a power loss can drop the last transactions.
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            self._release_lock()
            raise RunFileError(f"cannot open run file {self.path}: {exc}") from None

    def _acquire_lock(self) -> None:
        import fcntl

        assert self.path is not None
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_file = open(lock_path, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise RunFileError(
                f"run file {self.path} is already being written by another probe; "
                "give this probe its own log= path") from None

    def _release_lock(self) -> None:
        if self._lock_file is not None:
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

    def set_meta(self, **items: Any) -> None:
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                   [(k, json.dumps(v)) for k, v in items.items()])

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def last_step(self) -> int | None:
        row = self._conn.execute("SELECT MAX(step) FROM steps").fetchone()
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
        self._pending_scalars.extend((q, n, step, float(v)) for (q, n), v in scalars.items())
        if time.monotonic() - self._last_commit > self.flush_seconds:
            self.flush()

    def add_event(self, step: int, kind: str, name: str, message: str) -> None:
        self._pending_events.append((step, kind, name, message))

    def write_step(self, step: int, scalars: dict[tuple[str, str], float],
                   arrays: dict[tuple[str, str], np.ndarray] | None = None) -> None:
        """Commit one probe step (and everything buffered before it) as one transaction."""
        self._pending_scalars.extend((q, n, step, float(v)) for (q, n), v in scalars.items())
        with self._conn:
            self._write_pending()
            for (quantity, name), array in (arrays or {}).items():
                array = np.ascontiguousarray(array)
                self._conn.execute(
                    "INSERT OR REPLACE INTO arrays VALUES (?, ?, ?, ?, ?, ?)",
                    (quantity, name, step, array.dtype.str, json.dumps(list(array.shape)),
                     array.tobytes()))
            self._conn.execute("INSERT OR REPLACE INTO steps VALUES (?, ?)", (step, time.time()))
        self._last_commit = time.monotonic()

    def _write_pending(self) -> None:
        rows = [(self._series_id(q, n), step, value) for q, n, step, value in self._pending_scalars]
        self._conn.executemany("INSERT OR REPLACE INTO scalars VALUES (?, ?, ?)", rows)
        self._conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", self._pending_events)
        self._pending_scalars.clear()
        self._pending_events.clear()

    def flush(self) -> None:
        with self._conn:
            self._write_pending()
        self._last_commit = time.monotonic()

    def to_bytes(self) -> bytes:
        """The whole database as bytes (what a checkpoint carries); works after ``close`` too."""
        if self._conn is None:
            data = self._closed_bytes if self.path is None else self.path.read_bytes()
        else:
            self.flush()
            data = self._conn.serialize()
        return portable_bytes(data)

    def close(self) -> None:
        if self._conn is None:
            return
        try:
            self.flush()
            if self.path is not None:
                # Fold the WAL into the main file so the run is one self-contained file.
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            else:
                self._closed_bytes = self._conn.serialize()
        finally:
            self._conn.close()
            self._conn = None
            self._release_lock()

