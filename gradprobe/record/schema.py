"""The run file's format: one SQLite database in WAL mode, streamed to during training.

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

import sqlite3
import struct

SCHEMA_VERSION = 1
FORMAT_NAME = "gradprobe.run"

SCHEMA_SQL = """
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
