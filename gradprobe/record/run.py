"""Reading a recorded run back: from a run file, or from a checkpoint holding ``probe.state_dict()``."""

from __future__ import annotations

import csv
import json
import os
import pickle
import sqlite3
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .store import FORMAT_NAME, SCHEMA_VERSION, SQLITE_MAGIC, RunFileError

STATE_FORMAT = "gradprobe.state"


def _database_errors(method):
    """Turn SQLite's errors on a damaged file into one-line RunFileErrors."""

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise RunFileError(f"{self.source}: damaged run file ({exc})") from None

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class Run:
    """A recorded run. Every quantity is a series of (step, value) keyed by (quantity, name).

    Quantity names are listed in docs/quantities.md; names are the user's loss, latent,
    prototype and watch names (pairs are written ``"a|b"``).
    """

    def __init__(self, conn: sqlite3.Connection, source: str):
        self._conn = conn
        self.source = source
        self.meta = self._read_meta()
        self._series = {(q, n): sid for sid, q, n in
                        self._query("SELECT id, quantity, name FROM series")}

    @_database_errors
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def _read_meta(self) -> dict[str, Any]:
        try:
            rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as exc:
            raise RunFileError(f"{self.source}: not a gradprobe run file ({exc})") from None
        try:
            meta = {k: json.loads(v) for k, v in rows}
        except ValueError:
            raise RunFileError(f"{self.source}: damaged run file (unreadable metadata)") from None
        if meta.get("format") != FORMAT_NAME:
            raise RunFileError(f"{self.source}: an SQLite database, but not a gradprobe run file")
        version = meta.get("schema_version")
        if not isinstance(version, int):
            raise RunFileError(f"{self.source}: damaged run file (no schema version)")
        if version > SCHEMA_VERSION:
            raise RunFileError(
                f"{self.source}: written with run-file schema version {version}, newer than the "
                f"{SCHEMA_VERSION} this gradprobe reads; upgrade gradprobe")
        if version < SCHEMA_VERSION:
            raise RunFileError(
                f"{self.source}: run-file schema version {version} is older than any this "
                f"gradprobe reads ({SCHEMA_VERSION})")
        return meta

    # -- what was recorded ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.meta.get("run_name") or Path(self.source).stem

    @property
    def losses(self) -> list[str]:
        return list(self.meta.get("losses", []))

    @property
    def task(self) -> str | None:
        return self.meta.get("task")

    @property
    def roles(self) -> dict[str, str]:
        return dict(self.meta.get("roles", {}))

    @property
    def every(self) -> int | None:
        return self.meta.get("every")

    def quantities(self) -> list[str]:
        return sorted({q for q, _ in self._series})

    def names(self, quantity: str) -> list[str]:
        return sorted(n for q, n in self._series if q == quantity)

    def has(self, quantity: str, name: str) -> bool:
        return (quantity, name) in self._series

    def series(self, quantity: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one recorded scalar, as int64 and float64 numpy arrays."""
        sid = self._series.get((quantity, name))
        if sid is None:
            known = ", ".join(self.names(quantity)) or "none"
            raise KeyError(f"no series {quantity!r} / {name!r} in {self.source} "
                           f"(names recorded for {quantity!r}: {known})")
        rows = self._query("SELECT step, value FROM scalars WHERE series=? ORDER BY step", (sid,))
        steps = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        values = np.fromiter((np.nan if r[1] is None else r[1] for r in rows),
                             dtype=np.float64, count=len(rows))
        return steps, values

    def array_names(self, quantity: str) -> list[str]:
        return [r[0] for r in self._query(
            "SELECT DISTINCT name FROM arrays WHERE quantity=? ORDER BY name", (quantity,))]

    def arrays(self, quantity: str, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(steps, [array, ...])`` of one recorded array quantity."""
        rows = self._query("SELECT step, dtype, shape, data FROM arrays WHERE quantity=? AND "
                           "name=? ORDER BY step", (quantity, name))
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        try:
            values = [np.frombuffer(r[3], dtype=np.dtype(r[1])).reshape(json.loads(r[2]))
                      for r in rows]
        except (ValueError, TypeError):
            raise RunFileError(f"{self.source}: damaged array {quantity}/{name}") from None
        return steps, values

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT step, kind, name, message FROM events"
        rows = self._query(sql + " WHERE kind=? ORDER BY step", (kind,)) if kind else \
            self._query(sql + " ORDER BY step")
        return [dict(step=s, kind=k, name=n, message=m) for s, k, n, m in rows]

    def probe_steps(self) -> np.ndarray:
        return np.array([r[0] for r in self._query("SELECT step FROM steps ORDER BY step")],
                        dtype=np.int64)

    def iter_scalars(self) -> Iterator[tuple[int, str, str, float]]:
        """Every recorded scalar in long form ``(step, quantity, name, value)``."""
        for (quantity, name) in sorted(self._series):
            steps, values = self.series(quantity, name)
            for step, value in zip(steps.tolist(), values.tolist()):
                yield step, quantity, name, value

    def to_csv(self, path: str | os.PathLike) -> int:
        """Write every scalar in long form; returns the number of rows written."""
        count = 0
        with open(path, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["step", "quantity", "name", "value"])
            for row in self.iter_scalars():
                out.writerow(row)
                count += 1
        return count

    def summary(self) -> dict[str, Any]:
        steps = self.probe_steps()
        return {
            "name": self.name,
            "source": self.source,
            "losses": self.losses,
            "task": self.task,
            "roles": self.roles,
            "roles_guessed": self.meta.get("roles_guessed", []),
            "every": self.every,
            "shared_parameters": self.meta.get("shared_parameters", []),
            "shared_numel": self.meta.get("shared_numel"),
            "probe_steps": int(len(steps)),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "gradprobe_version": self.meta.get("gradprobe_version"),
        }

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_sqlite(path: Path) -> sqlite3.Connection:
    # Read-only and without touching the writer's WAL: analysing a live run is safe.
    uri = f"file:{path.resolve().as_posix()}?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.DatabaseError as exc:
        raise RunFileError(f"{path}: cannot open run file ({exc})") from None


def run_from_bytes(data: bytes, source: str) -> Run:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        conn.deserialize(data)
    except sqlite3.DatabaseError as exc:
        raise RunFileError(f"{source}: the checkpoint's run data is damaged ({exc})") from None
    return Run(conn, source)


def find_state(obj: Any) -> dict | None:
    """The ``probe.state_dict()`` inside a loaded checkpoint: the object itself or a top-level value."""
    if isinstance(obj, dict):
        if obj.get("format") == STATE_FORMAT:
            return obj
        for value in obj.values():
            if isinstance(value, dict) and value.get("format") == STATE_FORMAT:
                return value
    return None


def load_checkpoint(path: Path) -> Any:
    """``torch.load(weights_only=True)``: a checkpoint is data, never code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), "")
        raise RunFileError(
            f"{path}: refused: the checkpoint needs pickle code to load, and gradprobe only "
            f"loads plain data (weights_only=True){': ' + detail.strip() if detail else ''}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            IndexError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFileError(f"{path}: not a readable checkpoint (corrupt or truncated: "
                           f"{message[:200]})") from None


def load_run(path: str | os.PathLike) -> Run:
    """Open a run file (``.gprobe``) or a checkpoint holding ``probe.state_dict()``.

    Raises :class:`RunFileError` with one line naming the problem for a missing, empty,
    truncated, corrupt or foreign file, a directory, or a checkpoint that needs code to load.
    """
    path = Path(path)
    if not path.exists():
        raise RunFileError(f"{path}: no such file")
    if path.is_dir():
        raise RunFileError(f"{path}: is a directory, not a run file or checkpoint")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read ({exc.strerror})") from None
    if not head:
        raise RunFileError(f"{path}: empty file")
    if head == SQLITE_MAGIC:
        run = Run(_open_sqlite(path), str(path))
        run.probe_steps()  # touches the data pages: a truncated file fails here, not later
        return run
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        state = find_state(load_checkpoint(path))
        if state is None:
            raise RunFileError(f"{path}: a checkpoint, but it holds no probe.state_dict() "
                               "(save it as {'gradprobe': probe.state_dict(), ...})")
        return run_from_state(state, str(path))
    raise RunFileError(f"{path}: not a gradprobe run file or PyTorch checkpoint")


def run_from_state(state: dict, source: str) -> Run:
    import torch

    database = state.get("database")
    if not isinstance(database, torch.Tensor) or database.dtype != torch.uint8:
        raise RunFileError(f"{source}: the probe state holds no recorded data")
    run = run_from_bytes(database.numpy().tobytes(), source)
    run.probe_steps()
    return run

