"""Opening a recorded run: a run file, or a checkpoint holding ``probe.state_dict()`` (loaded
as data, ``weights_only=True``), or the run-file bytes such a state carries."""

from __future__ import annotations

import os
import pickle
import sqlite3
from pathlib import Path
from typing import Any

from .run import Run, checked_run
from .schema import SQLITE_MAGIC, RunFileError, memory_database

STATE_FORMAT = "gradprobe.state"


def _open_sqlite(path: Path) -> sqlite3.Connection:
    # Read-only and without touching the writer's WAL: analysing a live run is safe.
    uri = f"file:{path.resolve().as_posix()}?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise RunFileError(f"{path}: cannot open run file ({exc})") from None


def _open_run_file(path: Path) -> Run:
    try:
        return checked_run(_open_sqlite(path), str(path))
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
    return checked_run(conn, str(path))



def run_from_bytes(data: bytes, source: str) -> Run:
    try:
        conn = memory_database(data)
    except (sqlite3.Error, OverflowError, MemoryError) as exc:
        raise RunFileError(f"{source}: the checkpoint's run data is damaged ({exc})") from None
    return checked_run(conn, source)


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
