"""constraint-neglect judges a constraint that rose from near its floor to an equilibrium in
its start window (a center loss whose centres start at the features' origin) against that
level, not against its first value; numbers checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.record import RunWriter, load_run

STEPS = 60
TH = Thresholds()


def _run(tmp_path, constraint):
    path = tmp_path / "c.gprobe"
    w = RunWriter(path)
    w.set_meta(losses=["task", "center"], task="task",
               roles={"task": "task", "center": "prototype"}, every=1,
               expect_groups_per_batch=None)
    task = np.geomspace(2.0, 0.02, STEPS)
    for s in range(STEPS):
        w.write_step(s, {("loss", "task"): float(task[s]),
                         ("loss", "center"): float(constraint[s])}, {})
    w.close()
    return load_run(path)


def _neglect(run):
    return [f for f in diagnose(run) if f.id == "constraint-neglect"]


def _windows():
    size = int(np.ceil(TH.window_share * STEPS))
    return slice(0, size), slice(STEPS - size, STEPS)


def test_a_constraint_that_rose_to_its_equilibrium_and_fell_from_it_is_not_neglected(tmp_path):
    # 0.01 for most of the start window, up to 1 at its end, then down to 0.15: 15x its
    # start, but it fell to 0.15 of where it settled.
    rise = np.r_[np.full(8, 0.01), np.geomspace(0.01, 1.0, 6), np.geomspace(1.0, 0.15, STEPS - 14)]
    start, end = _windows()
    assert np.median(rise[end]) / np.median(rise[start]) > 1  # the old test: "rose"
    assert _neglect(_run(tmp_path, rise)) == []


def test_a_constraint_that_rose_and_stays_there_is_neglected(tmp_path):
    rise = np.r_[np.full(8, 0.01), np.geomspace(0.01, 1.0, 6), np.full(STEPS - 14, 1.0)]
    (f,) = _neglect(_run(tmp_path, rise))
    start, end = _windows()
    assert f.evidence["constraint_ratio"] == pytest.approx(
        np.median(rise[end]) / np.median(rise[start]))
    assert f.severity == "error"  # it rose from its start
    assert f.evidence["settled_ratio"] >= TH.neglect_settled_fraction


def test_a_constraint_that_rose_and_decays_slowly_is_still_neglected(tmp_path):
    # Up to 1, then only down to 0.6 of it: not satisfied (the failure theorem's rising
    # constraint; tests/runs.memorising_decoupler's orthogonality loss ends at 0.7 of its level).
    rise = np.r_[np.full(8, 0.01), np.geomspace(0.01, 1.0, 6), np.geomspace(1.0, 0.6, STEPS - 14)]
    (f,) = _neglect(_run(tmp_path, rise))
    assert f.evidence["settled_ratio"] == pytest.approx(
        np.median(rise[_windows()[1]]) / f.evidence["constraint_settled"])
    assert TH.neglect_settled_fraction <= f.evidence["settled_ratio"] < 1
