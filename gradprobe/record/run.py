"""Reading a recorded run back: the :class:`Run` over an open run-file database (opening a file
or a checkpoint: :mod:`gradprobe.record.load`)."""

from __future__ import annotations

import csv
import functools
import inspect
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .scalars import CHUNK_ROWS, ScalarSeries, read_scalars
from .schema import FORMAT_NAME, SCHEMA_SQL, SCHEMA_VERSION, RunFileError

# What a damaged file can make the reading code raise, besides SQLite's own errors: a value
# of the wrong type in a column (TypeError, ValueError), a number out of range (OverflowError).
_DAMAGE = (sqlite3.Error, ValueError, TypeError, OverflowError, MemoryError)


def _damage_message(source: str, exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return f"{source}: damaged run file ({detail})"


def _database_errors(method):
    """Turn every error a damaged file can cause into a one-line RunFileError (generators too)."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def gen_wrapper(self, *args, **kwargs):
            try:
                yield from method(self, *args, **kwargs)
            except RunFileError:
                raise
            except _DAMAGE as exc:
                raise RunFileError(_damage_message(self.source, exc)) from None
        return gen_wrapper

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (RunFileError, KeyError):
            raise
        except _DAMAGE as exc:
            raise RunFileError(_damage_message(self.source, exc)) from None

    return wrapper


def _expected_columns() -> dict[str, list[tuple]]:
    """Each table's columns (name, type, not null, primary key, hidden) in schema version 1."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA_SQL)
    tables = {name: [tuple(row[1:]) for row in conn.execute(f"PRAGMA table_xinfo({name})")]
              for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    return tables


_TABLES = _expected_columns()

# Meta keys the reader relies on, with the JSON types they must have.
_META_TYPES: dict[str, tuple[type, ...]] = {
    "run_name": (str, type(None)), "task": (str, type(None)), "losses": (list,),
    "roles": (dict,), "roles_guessed": (list,), "role_records": (list,),
    "every": (int, type(None)),
    "cadence": (str, type(None)),
    "shared_parameters": (list,), "shared_numel": (int, type(None)),
    "gradprobe_version": (str, type(None)), "latents": (list,), "prototypes": (dict,),
    "saturations": (list,), "contrastive": (list,), "max_rows": (int, type(None)),
    "expect_groups_per_batch": (int, type(None)), "backward_path": (str, type(None)),
}


class Run:
    """A recorded run. Every quantity is a series of (step, value) keyed by (quantity, name).

    Quantity names are listed in docs/quantities.md; names are the user's loss, latent,
    prototype and watch names (pairs are written ``"a|b"``).
    """

    def __init__(self, conn: sqlite3.Connection, source: str):
        self._conn = conn
        self.source = source
        # Text from a damaged file may not be UTF-8: read it with replacement characters
        # rather than fail deep inside a query.
        conn.text_factory = lambda data: data.decode("utf-8", "replace")
        try:
            self._snapshot()
            self._check_schema()
            self.meta = self._read_meta()
            self._series = self._read_series()
            self._scalars: ScalarSeries | None = None  # every series, loaded on first use
        except RunFileError:
            conn.close()
            raise
        except _DAMAGE as exc:
            conn.close()
            raise RunFileError(_damage_message(source, exc)) from None

    def _snapshot(self) -> None:
        """One read transaction for the life of the Run on a file being written (WAL mode):
        while a trainer keeps writing, every query sees the same committed prefix of the run
        (load the run again to see more). A closed run file (rollback-journal mode, see
        ``RunWriter.close``) changes only if a writer resumes it, which a held read
        transaction would block: there each query reads on its own."""
        try:
            # Defence in depth for files from elsewhere: no writes, no functions from the
            # file's schema (the schema itself is checked against ours below).
            self._conn.execute("PRAGMA query_only=ON")
            self._conn.execute("PRAGMA trusted_schema=OFF")
            if self._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                self._conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise RunFileError(f"{self.source}: cannot read run file ({exc})") from None

    def _check_schema(self) -> None:
        """Only our own tables, with our own columns: no views, triggers or generated columns,
        so reading a file from someone else runs no SQL but ours."""
        try:
            objects = self._conn.execute(
                "SELECT type, name, tbl_name FROM sqlite_master").fetchall()
        except sqlite3.Error as exc:
            raise RunFileError(f"{self.source}: not a gradprobe run file ({exc})") from None
        for kind, name, table in objects:
            if kind == "table" and name in _TABLES:
                continue
            if kind == "index" and str(name).startswith("sqlite_autoindex_") and table in _TABLES:
                continue
            raise RunFileError(f"{self.source}: not a gradprobe run file "
                               f"(unexpected {kind} {str(name)[:60]!r})")
        present = {name for kind, name, _ in objects if kind == "table"}
        if "meta" not in present:
            raise RunFileError(f"{self.source}: an SQLite database, but not a gradprobe run file")
        for name in present:
            try:
                columns = [tuple(row[1:]) for row in
                           self._conn.execute(f"PRAGMA table_xinfo({name})")]
            except sqlite3.Error as exc:
                raise RunFileError(_damage_message(self.source, exc)) from None
            if columns != _TABLES[name]:
                raise RunFileError(f"{self.source}: damaged or foreign run file (table {name!r} "
                                   "has unexpected columns)")

    @_database_errors
    def _read_series(self) -> dict[tuple[str, str], int]:
        series = {}
        for sid, quantity, name in self._query("SELECT id, quantity, name FROM series"):
            if not (isinstance(sid, int) and isinstance(quantity, str) and isinstance(name, str)):
                raise RunFileError(f"{self.source}: damaged run file (series table)")
            series[(quantity, name)] = sid
        return series

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
        except (ValueError, TypeError, RecursionError):
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
                f"gradprobe reads ({SCHEMA_VERSION}); it cannot be migrated")
        for key, types in _META_TYPES.items():
            if key in meta and (not isinstance(meta[key], types) or isinstance(meta[key], bool)):
                raise RunFileError(f"{self.source}: damaged run file (metadata {key!r} is "
                                   f"a {type(meta[key]).__name__})")
        for key in ("losses", "roles_guessed", "shared_parameters"):
            if not all(isinstance(v, str) for v in meta.get(key, [])):
                raise RunFileError(f"{self.source}: damaged run file (metadata {key!r})")
        if not all(isinstance(v, str) for v in meta.get("roles", {}).values()):
            raise RunFileError(f"{self.source}: damaged run file (metadata 'roles')")
        if not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                   and isinstance(r.get("role"), str) for r in meta.get("role_records", [])):
            raise RunFileError(f"{self.source}: damaged run file (metadata 'role_records')")
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
        if self._scalars is None:
            self._scalars = self._load_scalars()
        steps, values = self._scalars.series[sid]
        # Copies: a caller may change its arrays without changing what the next call returns.
        return steps.copy(), values.copy()

    @_database_errors
    def _load_scalars(self) -> ScalarSeries:
        """Every scalar of the run, read once (:func:`~gradprobe.record.scalars.read_scalars`)."""
        return read_scalars(self._conn, sorted(self._series.values()), self.source)

    @_database_errors
    def array_names(self, quantity: str) -> list[str]:
        return [r[0] for r in self._query(
            "SELECT DISTINCT name FROM arrays WHERE quantity=? ORDER BY name", (quantity,))]

    @_database_errors
    def arrays(self, quantity: str, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(steps, [array, ...])`` of one recorded array quantity."""
        rows = self._query("SELECT step, dtype, shape, data FROM arrays WHERE quantity=? AND "
                           "name=? ORDER BY step", (quantity, name))
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        try:
            values = []
            for _, dtype, shape, data in rows:
                dtype = np.dtype(str(dtype))
                if dtype.hasobject or not isinstance(data, bytes):
                    raise ValueError("not plain numbers")
                values.append(np.frombuffer(data, dtype=dtype).reshape(json.loads(shape)))
        except (ValueError, TypeError, RecursionError):
            raise RunFileError(f"{self.source}: damaged array {quantity}/{name}") from None
        return steps, values

    @_database_errors
    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT step, kind, name, message FROM events"
        rows = self._query(sql + " WHERE kind=? ORDER BY step", (kind,)) if kind else \
            self._query(sql + " ORDER BY step")
        return [dict(step=s, kind=k, name=n, message=m) for s, k, n, m in rows]

    @_database_errors
    def probe_steps(self) -> np.ndarray:
        cur = self._conn.execute("SELECT step FROM steps ORDER BY step")
        parts = []
        while True:
            rows = cur.fetchmany(CHUNK_ROWS)
            if not rows:
                break
            parts.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @_database_errors
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

    @_database_errors
    def summary(self) -> dict[str, Any]:
        steps = self.probe_steps()
        return {
            "name": self.name,
            "source": self.source,
            "losses": self.losses,
            "task": self.task,
            "roles": self.roles,
            "roles_guessed": self.meta.get("roles_guessed", []),
            # Older run files have none: the report builds them from "roles" (report/roles.py).
            "role_records": self.meta.get("role_records"),
            "every": self.every,
            "cadence": self.meta.get("cadence"),
            "shared_parameters": self.meta.get("shared_parameters", []),
            "shared_numel": self.meta.get("shared_numel"),
            "probe_steps": int(len(steps)),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "gradprobe_version": self.meta.get("gradprobe_version"),
        }

    def close(self) -> None:
        try:
            self._conn.close()
        except sqlite3.Error:
            pass

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checked_run(conn: sqlite3.Connection, source: str) -> Run:
    """A :class:`Run` of ``conn`` whose data pages were read: a truncated or corrupt file fails
    here, with one line, not later in the middle of a diagnosis."""
    run = Run(conn, source)
    try:
        run.probe_steps()  # touches the data pages: a truncated file fails here, not later
        run._conn.execute("PRAGMA quick_check(1)").fetchall()  # noqa: SLF001
    except RunFileError:
        run.close()
        raise
    except sqlite3.Error as exc:
        run.close()
        raise RunFileError(_damage_message(run.source, exc)) from None
    return run

