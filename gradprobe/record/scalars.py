"""Reading the step-major ``step_scalars`` table (:mod:`gradprobe.record.schema`) back as one
``(steps, values)`` series per recorded scalar, a chunk of rows at a time."""

from __future__ import annotations

import sqlite3

import numpy as np

from .schema import RunFileError

CHUNK_ROWS = 65536  # rows fetched from SQLite at a time


class ScalarSeries:
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

    def finish(self) -> "ScalarSeries":
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


def read_scalars(conn: sqlite3.Connection, known: list[int], source: str) -> ScalarSeries:
    """Every scalar of a run, read once, in one query, a chunk of rows at a time: ``known``
    are the ids of the series table, sorted; ``source`` names the file in an error."""
    known_ids = np.array(known, dtype=np.int64)
    scalars = ScalarSeries(known)
    # In chunks: a 1,000,000-step run never exists as a million Python tuples at once.
    cur = conn.execute("SELECT step, ids, vals FROM step_scalars ORDER BY id")
    while True:
        rows = cur.fetchmany(CHUNK_ROWS)
        if not rows:
            break
        row_steps, row_ids, row_vals = zip(*rows)
        del rows
        try:
            id_bytes, value_bytes = b"".join(row_ids), b"".join(row_vals)
        except TypeError:
            raise RunFileError(f"{source}: damaged run file (step_scalars holds "
                               "a value that is not a blob)") from None
        id_lengths = np.fromiter(map(len, row_ids), dtype=np.int64, count=len(row_ids))
        value_lengths = np.fromiter(map(len, row_vals), dtype=np.int64,
                                    count=len(row_vals))
        del row_ids, row_vals
        if (id_lengths % 4).any() or (value_lengths % 8).any() \
                or not np.array_equal(id_lengths // 4, value_lengths // 8):
            raise RunFileError(f"{source}: damaged run file (step_scalars rows whose "
                               "ids and values differ in length)")
        ids = np.frombuffer(id_bytes, dtype="<i4")
        index = np.searchsorted(known_ids, ids)
        if len(ids) and (index.max() >= len(known)
                         or not np.array_equal(known_ids[index], ids)):
            raise RunFileError(f"{source}: damaged run file (step_scalars names a "
                               "series missing from the series table)")
        del ids, id_bytes
        values = np.frombuffer(value_bytes, dtype="<f8").astype(np.float64, copy=False)
        steps = np.repeat(np.fromiter(row_steps, dtype=np.int64, count=len(row_steps)),
                          id_lengths // 4)
        scalars.add(index, steps, values)
        del index, values, value_bytes, steps
    return scalars.finish()
