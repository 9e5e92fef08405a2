"""Reading a recorded run back: from a run file, or from a checkpoint holding ``probe.state_dict()``."""

from __future__ import annotations

import csv
import functools
import inspect
import json
import os
import pickle
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .schema import FORMAT_NAME, SCHEMA_SQL, SCHEMA_VERSION, SQLITE_MAGIC, RunFileError, memory_database

STATE_FORMAT = "gradprobe.state"

# What a damaged file can make the reading code raise, besides SQLite's own errors: a value
# of the wrong type in a column (TypeError, ValueError), a number out of range (OverflowError).
_DAMAGE = (sqlite3.Error, ValueError, TypeError, OverflowError, MemoryError)
_CHUNK = 65536


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
    "roles": (dict,), "roles_guessed": (list,), "every": (int, type(None)),
    "cadence": (str, type(None)),
    "shared_parameters": (list,), "shared_numel": (int, type(None)),
    "gradprobe_version": (str, type(None)), "latents": (list,), "prototypes": (dict,),
    "saturations": (list,), "contrastive": (list,), "max_rows": (int, type(None)),
    "expect_groups_per_batch": (int, type(None)), "backward_path": (str, type(None)),
}


class _Scalars:
    """Every recorded scalar, grouped by series while the rows are read, chunk by chunk (so
    that memory holds the result, about 16 bytes a value, plus one chunk; never a sort of the
    whole run): ``series[sid]`` = (steps, values), sorted by step, one value a step, the
    value written last for a step kept."""

    def __init__(self, known: list[int]):
        self.known = known
        self._pieces: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in known]
        self.series: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, index: np.ndarray, steps: np.ndarray, values: np.ndarray) -> None:
        """One chunk: ``index[i]`` (position in ``known``), ``steps[i]``, ``values[i]``, in
        the order they were written."""
        if len(self.known) <= 1 << 16:
            index = index.astype(np.uint16)  # numpy sorts 16-bit integers by radix: O(n)
        # Stable: within a series, values stay in the order they were written.
        order = np.argsort(index, kind="stable")
        counts = np.bincount(index, minlength=len(self.known))
        bounds = np.concatenate(([0], np.cumsum(counts)))
        steps, values = steps[order], values[order]
        del order
        for i in np.flatnonzero(counts).tolist():
            start, stop = bounds[i], bounds[i + 1]
            self._pieces[i].append((steps[start:stop].copy(), values[start:stop].copy()))

    def finish(self) -> "_Scalars":
        for i, sid in enumerate(self.known):
            pieces, self._pieces[i] = self._pieces[i], []
            if not pieces:
                self.series[sid] = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
                continue
            steps = np.concatenate([s for s, _ in pieces]) if len(pieces) > 1 else pieces[0][0]
            values = np.concatenate([v for _, v in pieces]) if len(pieces) > 1 else pieces[0][1]
            del pieces
            if len(steps) > 1:
                if (steps[1:] < steps[:-1]).any():
                    # Steps that go back (a resumed run, a rewritten step): sort stably, so
                    # that the value written last still comes last.
                    order = np.argsort(steps, kind="stable")
                    steps, values = steps[order], values[order]
                repeated = steps[1:] == steps[:-1]
                if repeated.any():  # the last value written for a step wins
                    keep = np.append(~repeated, True)
                    steps, values = steps[keep], values[keep]
            self.series[sid] = (steps, values)
        return self


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
            self._scalars: _Scalars | None = None  # every series, loaded on first use
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
    def _load_scalars(self) -> "_Scalars":
        """Every scalar of the run, read once, in one query, a chunk of rows at a time."""
        known = sorted(self._series.values())
        known_ids = np.array(known, dtype=np.int64)
        scalars = _Scalars(known)
        # In chunks: a 1,000,000-step run never exists as a million Python tuples at once.
        cur = self._conn.execute("SELECT step, ids, vals FROM step_scalars ORDER BY id")
        while True:
            rows = cur.fetchmany(_CHUNK)
            if not rows:
                break
            row_steps, row_ids, row_vals = zip(*rows)
            del rows
            try:
                id_bytes, value_bytes = b"".join(row_ids), b"".join(row_vals)
            except TypeError:
                raise RunFileError(f"{self.source}: damaged run file (step_scalars holds "
                                   "a value that is not a blob)") from None
            id_lengths = np.fromiter(map(len, row_ids), dtype=np.int64, count=len(row_ids))
            value_lengths = np.fromiter(map(len, row_vals), dtype=np.int64,
                                        count=len(row_vals))
            del row_ids, row_vals
            if (id_lengths % 4).any() or (value_lengths % 8).any() \
                    or not np.array_equal(id_lengths // 4, value_lengths // 8):
                raise RunFileError(f"{self.source}: damaged run file (step_scalars rows whose "
                                   "ids and values differ in length)")
            ids = np.frombuffer(id_bytes, dtype="<i4")
            index = np.searchsorted(known_ids, ids)
            if len(ids) and (index.max() >= len(known)
                             or not np.array_equal(known_ids[index], ids)):
                raise RunFileError(f"{self.source}: damaged run file (step_scalars names a "
                                   "series missing from the series table)")
            del ids, id_bytes
            values = np.frombuffer(value_bytes, dtype="<f8").astype(np.float64, copy=False)
            steps = np.repeat(np.fromiter(row_steps, dtype=np.int64, count=len(row_steps)),
                              id_lengths // 4)
            scalars.add(index, steps, values)
            del index, values, value_bytes, steps
        return scalars.finish()

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
            rows = cur.fetchmany(_CHUNK)
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


def _open_sqlite(path: Path) -> sqlite3.Connection:
    # Read-only and without touching the writer's WAL: analysing a live run is safe.
    uri = f"file:{path.resolve().as_posix()}?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise RunFileError(f"{path}: cannot open run file ({exc})") from None


def _open_run_file(path: Path) -> Run:
    try:
        return _checked(Run(_open_sqlite(path), str(path)))
    except RunFileError as exc:
        if "unable to open" not in str(exc) and "readonly" not in str(exc):
            raise
    # A WAL-mode file (one whose writer was killed, or still runs) in a directory we cannot
    # write: SQLite cannot create its -shm file. Read the main file as it is (immutable):
    # steps still only in a -wal file are not seen.
    uri = f"file:{path.resolve().as_posix()}?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise RunFileError(f"{path}: cannot open run file ({exc})") from None
    return _checked(Run(conn, str(path)))


def _checked(run: Run) -> Run:
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


def run_from_bytes(data: bytes, source: str) -> Run:
    try:
        conn = memory_database(data)
    except (sqlite3.Error, OverflowError, MemoryError) as exc:
        raise RunFileError(f"{source}: the checkpoint's run data is damaged ({exc})") from None
    return _checked(Run(conn, source))


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
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "")
        if detail or "Weights only load failed" in str(exc):
            raise RunFileError(
                f"{path}: refused: the checkpoint needs pickle code to load, and gradprobe only "
                f"loads plain data (weights_only=True){': ' + detail[:200] if detail else ''}"
            ) from None
        message = lines[0][:200] if lines and lines[0] else "unpickling failed"
        raise RunFileError(f"{path}: not a readable checkpoint (corrupt or truncated: "
                           f"{message})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes torch.load raise
        text = str(exc).strip()
        message = text.splitlines()[0][:200] if text else type(exc).__name__
        raise RunFileError(f"{path}: not a readable checkpoint (corrupt or truncated: "
                           f"{message})") from None


def load_run(path: str | os.PathLike) -> Run:
    """Open a run file (``.gprobe``) or a checkpoint holding ``probe.state_dict()``.

    Raises :class:`RunFileError` with one line naming the problem for a missing, empty,
    truncated, corrupt or foreign file, a directory, or a checkpoint that needs code to load;
    never another exception. Reading a file never runs code or SQL from it.
    """
    try:
        path = Path(path)
        if not path.exists():
            raise RunFileError(f"{path}: no such file")
        if path.is_dir():
            raise RunFileError(f"{path}: is a directory, not a run file or checkpoint")
        with open(path, "rb") as fh:
            head = fh.read(16)
    except (OSError, ValueError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise RunFileError(f"{path}: cannot read ({reason})") from None
    if not head:
        raise RunFileError(f"{path}: empty file")
    if head == SQLITE_MAGIC:
        return _open_run_file(path)
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
    if not isinstance(database, torch.Tensor) or database.dtype != torch.uint8 \
            or database.layout != torch.strided:
        raise RunFileError(f"{source}: the probe state holds no recorded data")
    try:
        data = database.detach().cpu().contiguous().numpy().tobytes()
    except Exception as exc:  # noqa: BLE001 - an odd tensor from a damaged checkpoint
        raise RunFileError(f"{source}: the probe state's run data is unreadable ({exc})") from None
    return run_from_bytes(data, source)
