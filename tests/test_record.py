"""The step-major scalar layout: what is written is read back exactly, series by series."""

from __future__ import annotations

import math
import sqlite3
import struct

import numpy as np
import pytest

from gradprobe.record import RunFileError, RunWriter, load_run


def _meta(writer: RunWriter) -> None:
    writer.set_meta(run_name="r", losses=["a", "b"])


def test_round_trip_nan_inf_and_every_series(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = RunWriter(path)
    _meta(writer)
    expected: dict[tuple[str, str], list[tuple[int, float]]] = {}
    rng = np.random.default_rng(0)
    for step in range(50):
        scalars = {("loss", "a"): float(rng.random()), ("loss", "b"): float(rng.random())}
        if step % 3 == 0:
            scalars[("grad_norm", "a")] = math.nan
        if step % 7 == 0:
            scalars[("grad_norm", "b")] = -math.inf
        writer.write_step(step, scalars)
        for key, value in scalars.items():
            expected.setdefault(key, []).append((step, value))
    writer.close()
    with load_run(path) as run:
        assert run.quantities() == ["grad_norm", "loss"]
        assert run.names("loss") == ["a", "b"]
        for (quantity, name), points in expected.items():
            steps, values = run.series(quantity, name)
            assert steps.dtype == np.int64 and values.dtype == np.float64
            assert steps.tolist() == [s for s, _ in points]
            np.testing.assert_array_equal(values, [v for _, v in points])
        rows = list(run.iter_scalars())
        assert len(rows) == sum(len(p) for p in expected.values())
        assert rows[0][:3] == (0, "grad_norm", "a") and math.isnan(rows[0][3])
        assert run.to_csv(tmp_path / "r.csv") == len(rows)
        # Each call returns fresh arrays: changing one changes nothing else.
        run.series("loss", "a")[1][:] = 0
        assert run.series("loss", "a")[1][0] != 0
        with pytest.raises(KeyError, match="names recorded for 'loss': a, b"):
            run.series("loss", "c")


def test_one_row_per_step_and_the_last_value_written_wins(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = RunWriter(path, flush_seconds=1e9)
    _meta(writer)
    writer.write_step(0, {("loss", "a"): 1.0})
    writer.add_scalars(0, {("lr", "lr"): 0.1})           # logged after probe step 0
    writer.add_scalars(0, {("lr", "lr"): 0.2})           # ... twice: the last wins
    writer.write_step(1, {("loss", "a"): 2.0, ("loss", "b"): 5.0})
    writer.flush()
    writer.add_scalars(1, {("loss", "a"): 3.0})          # rewrites step 1 in a later commit
    writer.write_step(2, {("loss", "a"): 4.0})
    writer.close()
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT step, length(ids), length(vals) FROM step_scalars "
                        "ORDER BY id").fetchall()
    conn.close()
    assert rows == [(0, 4, 8), (0, 4, 8), (1, 8, 16), (1, 4, 8), (2, 4, 8)]
    with load_run(path) as run:
        assert run.series("lr", "lr")[0].tolist() == [0] and run.series("lr", "lr")[1][0] == 0.2
        assert run.series("loss", "a")[0].tolist() == [0, 1, 2]
        assert run.series("loss", "a")[1].tolist() == [1.0, 3.0, 4.0]
        assert run.series("loss", "b")[1].tolist() == [5.0]


def test_steps_written_out_of_order_are_sorted_and_a_rewrite_wins(tmp_path):
    """A run resumed from an older checkpoint writes earlier steps again."""
    path = tmp_path / "r.gprobe"
    writer = RunWriter(path)
    _meta(writer)
    for step in range(10):
        writer.write_step(step, {("loss", "a"): float(step), ("loss", "b"): float(step)})
    writer.close()
    writer = RunWriter(path)
    for step in range(5, 12):
        writer.write_step(step, {("loss", "a"): 100.0 + step})
    writer.close()
    with load_run(path) as run:
        steps, values = run.series("loss", "a")
        assert steps.tolist() == list(range(12))
        assert values.tolist() == [0, 1, 2, 3, 4] + [100.0 + s for s in range(5, 12)]
        assert run.series("loss", "b")[1].tolist() == list(range(10))
        assert run.probe_steps().tolist() == list(range(12))


def test_a_series_without_values_reads_as_empty(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = RunWriter(path)
    _meta(writer)
    writer.write_step(0, {("loss", "a"): 1.0})
    writer._conn.execute("INSERT INTO series (quantity, name) VALUES ('aaa', 'empty')")
    writer._conn.execute("INSERT INTO series (quantity, name) VALUES ('zzz', 'empty')")
    writer.close()
    with load_run(path) as run:
        for quantity in ("aaa", "zzz"):
            steps, values = run.series(quantity, "empty")
            assert len(steps) == len(values) == 0
        assert run.series("loss", "a")[1].tolist() == [1.0]


@pytest.mark.parametrize("damage", [
    ("ids", b"\x01\x00\x00"),                                   # not a multiple of 4
    ("vals", b"\x00" * 12),                                     # not a multiple of 8
    ("vals", struct.pack("<2d", 1.0, 2.0)),                     # more values than ids
    ("ids", struct.pack("<i", 999)),                            # an unknown series
    ("ids", "text"),                                            # not a blob
    ("vals", 5),
])
def test_damaged_blobs_are_refused_with_one_line(tmp_path, damage):
    column, value = damage
    path = tmp_path / "r.gprobe"
    writer = RunWriter(path)
    _meta(writer)
    for step in range(3):
        writer.write_step(step, {("loss", "a"): 1.0})
    writer.close()
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE step_scalars SET {column}=? WHERE step=1", (value,))
    conn.commit()
    conn.close()
    with load_run(path) as run:
        with pytest.raises(RunFileError, match="damaged run file") as info:
            run.series("loss", "a")
    assert "\n" not in str(info.value)
