"""Following a run file that another process is writing: what changed, and is it still written.

A :class:`~gradprobe.record.RunWriter` holds an exclusive ``flock`` on ``<run file>.lock`` for
as long as it writes, and deletes that file (while still holding it) when it closes. So, for a
run file that exists:

- no lock file: the run is **closed** (or was written by a writer that closed it normally);
- a lock file that a process holds: the run is **being written**;
- a lock file that nobody holds: the writer is **gone** without closing (killed, crashed, the
  machine went down): a *stale* lock. Every step it committed is readable; nothing more comes.

Asking whether anybody holds the lock takes a shared lock for a moment. A writer that opens
the run at that very moment fails its first non-blocking attempt and tries once more after a
garbage collection (``RunWriter._acquire_lock``), by which time the shared lock is gone; a
follower still asks only when the file has been quiet (see :func:`writer_state`'s callers).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

LOCK_SUFFIX = ".lock"

WRITING, CLOSED, GONE = "writing", "closed", "gone"


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file a writer of ``path`` holds while it writes."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def writer_state(path: str | os.PathLike) -> str:
    """:data:`WRITING`, :data:`CLOSED` or :data:`GONE` (a stale lock) for an existing run file."""
    import fcntl

    lock = lock_file(path)
    try:
        handle = open(lock, "rb")  # reading only: never creates a lock file
    except FileNotFoundError:
        return CLOSED
    except OSError:
        return WRITING  # unreadable lock file: assume the owner is alive rather than give up
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return WRITING
        try:
            # A closing writer deletes the lock file while holding it: if the file we opened
            # is no longer the one at that path, the writer closed between our open and lock.
            still_there = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            still_there = False
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return GONE if still_there else CLOSED


def change_mark(path: str | os.PathLike) -> tuple | None:
    """A value that changes whenever the writer commits something new (a probe step, logged
    scalars, an event, metadata); None while the file holds no readable run yet.

    Cheap on a run of any length: the largest keys of the tables, read through an index, on
    a read-only connection opened and closed here (no read transaction is left open that
    would hold the writer's checkpoints back).
    """
    uri = f"file:{Path(path).resolve().as_posix()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return None
    try:
        return conn.execute(
            "SELECT (SELECT MAX(step) FROM steps), (SELECT MAX(id) FROM step_scalars), "
            "(SELECT MAX(rowid) FROM events), (SELECT COUNT(*) FROM meta)").fetchone()
    except sqlite3.Error:
        return None  # not (yet) a run file: the caller's load_run names the problem
    finally:
        conn.close()
