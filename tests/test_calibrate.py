"""benchmarks/validity/calibrate.py on synthetic run records whose answers are known: runs in
which ``gradient-swamping`` fires exactly when the recorded ratio is below
``swamping_ratio``, so the calibration errors of every candidate value, the error-free range
and its middle can be counted by hand."""

from __future__ import annotations

import math

import pytest

from benchmarks.validity.calibrate import (EDGE_REASONS, GLOBAL_KEYS, INT_GRID, Calibrator,
                                           _middle, _run_at, _widest_run, grid, half_range,
                                           neighbours, numeric_keys)
from benchmarks.validity.report import flip_lines, margin_lines
from benchmarks.validity.harness import Expect, Family, RunRecord, Runs, Variant
from gradprobe.diagnose import Thresholds, diagnose
from test_diagnose import _synthetic

DEFAULTS = Thresholds()
SQRT2 = math.sqrt(2)


# ----------------------------------------------------------------------- the grid of values

def test_the_grid_spans_a_factor_of_eight_each_way_in_steps_of_sqrt_2():
    values = grid("swamping_ratio", 0.1)
    assert len(values) == 13 and values == sorted(values)
    assert values[0] == pytest.approx(0.1 / 8) and values[-1] == pytest.approx(0.1 * 8)
    assert 0.1 in values
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert ratios == pytest.approx([SQRT2] * 12)


def test_a_fraction_or_share_stays_within_one():
    values = grid("collapse_peak_fraction", 0.5)
    # 0.5 / 8 ... 0.5 x sqrt(2) = 0.707 (below 1), then 1.0 itself: 8 + 1 values.
    assert len(values) == 9 and values[-1] == 1.0 and max(values[:-1]) == pytest.approx(0.5 * SQRT2)
    assert values[0] == pytest.approx(0.5 / 8)
    assert all(v <= 1.0 for v in grid("min_share", 0.5))


def test_integer_keys_and_a_zero_default_have_their_own_grids():
    assert grid("min_points", 3) == grid("smooth_points", 3) == list(INT_GRID) == list(range(1, 9))
    assert grid("contrastive_gap", 0.0) == [0.0, -0.001, 0.001, -0.01, 0.01, -0.1, 0.1, -1.0, 1.0]


def test_every_edge_reason_names_a_numeric_threshold():
    assert EDGE_REASONS and set(EDGE_REASONS) <= set(numeric_keys())


def test_the_neighbours_of_a_default_are_one_grid_step_each_way():
    assert neighbours("swamping_ratio", 0.1) == pytest.approx([0.1 / SQRT2, 0.1 * SQRT2])
    assert neighbours("smooth_points", 3) == [2, 4]
    assert neighbours("min_points", 1) == [2]  # the grid's lowest value has no lower neighbour
    assert neighbours("collapse_peak_fraction", 0.8) == pytest.approx([0.8 / SQRT2, 1.0])


def test_keys_every_rule_reads_come_last():
    keys = numeric_keys()
    assert keys[-len(GLOBAL_KEYS):] == list(GLOBAL_KEYS)
    assert "swamping_ratio" in keys and "exempt_roles" not in keys  # roles are not numeric


# ----------------------------------------------------- runs of fewest errors and their middle

def test_the_run_of_fewest_errors_around_a_value():
    values = [1, 2, 3, 4, 5, 6]
    ok = [False, True, True, True, False, True]
    assert _run_at(values, ok, 3) == (2, 4) and _run_at(values, ok, 2) == (2, 4)
    assert _run_at(values, ok, 6) == (6, 6)
    assert _run_at(values, ok, 5) is None and _run_at(values, ok, 1) is None


def test_the_widest_run_of_fewest_errors():
    assert _widest_run([1, 2, 3, 4, 5, 6], [True, False, True, True, True, False]) == (3, 5)
    # A tie goes to the first run; a run may end at the last value.
    assert _widest_run([1, 2, 3, 4, 5], [True, True, False, True, True]) == (1, 2)
    assert _widest_run([1, 2, 3], [False, True, True]) == (2, 3)
    assert _widest_run([1, 2], [False, False]) is None


def test_the_middle_is_geometric_and_keeps_integer_keys_whole():
    assert _middle("swamping_ratio", (0.05, 0.2)) == pytest.approx(0.1)
    assert _middle("contrastive_gap", (-0.1, 0.1)) == 0.0  # through 0: arithmetic
    assert _middle("min_points", (2, 8)) == 4 and isinstance(_middle("min_points", (2, 8)), int)


# ------------------------------------------------------------ the calibrator, end to end

FAMILY = Family(
    name="synthetic-swamping", source="a ratio written into the run file", train=None,
    variants=(Variant("broken", healthy=False, truth="aux's gradient is the given share",
                      expected=(Expect("gradient-swamping", "aux"),)),
              Variant("healthy", healthy=True, truth="aux's gradient is the given share")))


def _record(tmp_path, variant, seed, ratio):
    """A run of 20 probe steps in which aux's (weighted) gradient is ``ratio`` of task's;
    neither loss falls, so the whole run is judged."""
    rows = [(s, {("loss", "task"): 1.0, ("loss", "aux"): 1.0,
                 ("grad_norm", "task"): 1.0, ("grad_norm", "aux"): ratio,
                 ("weighted_grad_norm", "task"): 1.0, ("weighted_grad_norm", "aux"): ratio})
            for s in range(20)]
    folder = tmp_path / f"{variant}-s{seed}"
    folder.mkdir()
    _synthetic(folder, rows).close()
    (path,) = folder.glob("*.gprobe")
    return RunRecord(FAMILY.name, variant, seed, path, {}, 0.0, 0.0)


def _calibrate(tmp_path, broken, healthy, heldout_broken=(), heldout_healthy=()):
    """Calibration runs at even seeds; held-out runs, when given, at odd seeds."""
    records = [_record(tmp_path, "broken", 2 * i, r) for i, r in enumerate(broken)] + \
        [_record(tmp_path, "healthy", 2 * i, r) for i, r in enumerate(healthy)]
    heldout = [_record(tmp_path, "broken", 2 * i + 1, r) for i, r in enumerate(heldout_broken)] + \
        [_record(tmp_path, "healthy", 2 * i + 1, r) for i, r in enumerate(heldout_healthy)]
    runs = Runs(records + heldout)
    try:
        return Calibrator(runs, records, {FAMILY.name: FAMILY}, heldout or None).calibrate()
    finally:
        runs.close()


def _errors(value, broken, healthy):
    """Misses (broken runs at or above the value) plus false alarms (healthy runs below it)."""
    return sum(r >= value for r in broken) + sum(r < value for r in healthy)


def test_the_synthetic_runs_alarm_exactly_below_the_ratio(tmp_path):
    for ratio, fires in ((0.05, True), (0.2, False)):
        run = _synthetic(tmp_path, [(s, {("loss", "task"): 1.0, ("loss", "aux"): 1.0,
                                         ("grad_norm", "task"): 1.0, ("grad_norm", "aux"): ratio,
                                         ("weighted_grad_norm", "task"): 1.0,
                                         ("weighted_grad_norm", "aux"): ratio})
                                    for s in range(20)])
        alarms = [(f.id, f.subject) for f in diagnose(run) if f.severity in ("warning", "error")]
        assert alarms == ([("gradient-swamping", "aux")] if fires else [])


def _key(results, name):
    return next(k for k in results if k.key == name)


def test_a_default_with_no_errors_stays_and_reports_its_error_free_range(tmp_path):
    broken, healthy = (0.02, 0.04), (0.15, 0.3)
    chosen, results = _calibrate(tmp_path, broken, healthy)
    assert chosen == DEFAULTS
    values = grid("swamping_ratio", 0.1)
    free = [v for v in values if _errors(v, broken, healthy) == 0]
    # Error-free: above 0.04 and at most 0.15: 0.1 / 2, 0.1 / sqrt 2, 0.1, 0.1 x sqrt 2.
    assert free == pytest.approx([0.05, 0.1 / SQRT2, 0.1, 0.1 * SQRT2])
    k = _key(results, "swamping_ratio")
    assert (k.default, k.chosen, k.errors_default, k.errors_chosen) == (0.1, 0.1, 0, 0)
    assert k.best_range == (free[0], free[-1]) and k.constrained
    assert k.rules == ("gradient-swamping",)
    # Keys these runs do not exercise have no constraint and stay where they were.
    assert not _key(results, "swamping_error_ratio").constrained  # severity only, no alarm
    assert all(r.chosen == r.default and r.errors_chosen == 0 for r in results)


def test_a_default_with_errors_moves_to_the_middle_of_the_widest_error_free_run(tmp_path):
    broken, healthy = (0.02, 0.04), (0.08, 0.3)
    chosen, results = _calibrate(tmp_path, broken, healthy)
    # At 0.1 the healthy run at 0.08 is a false alarm. Error-free grid values: 0.05 and
    # 0.0707 (above 0.04, at most 0.08); the middle is their geometric mean, equally far (in
    # ratio) from both ends.
    assert _errors(0.1, broken, healthy) == 1
    lo, hi = 0.05, 0.1 / SQRT2
    assert [v for v in grid("swamping_ratio", 0.1) if _errors(v, broken, healthy) == 0] == \
        pytest.approx([lo, hi])
    assert chosen == DEFAULTS.replace(swamping_ratio=chosen.swamping_ratio)
    assert chosen.swamping_ratio == pytest.approx(math.sqrt(lo * hi))
    k = _key(results, "swamping_ratio")
    assert (k.errors_default, k.errors_chosen) == (1, 0)
    assert k.best_range == pytest.approx((lo, hi))
    assert k.chosen / k.best_range[0] == pytest.approx(k.best_range[1] / k.chosen)  # the margin


def test_an_error_free_run_of_one_grid_value_moves_nothing(tmp_path):
    # Only 0.05 lies above 0.04 and at most 0.06: no margin on either side, so the default
    # stays, with its one error reported and no error-free range around it.
    broken, healthy = (0.02, 0.04), (0.06, 0.3)
    chosen, results = _calibrate(tmp_path, broken, healthy)
    assert [v for v in grid("swamping_ratio", 0.1) if _errors(v, broken, healthy) == 0] == \
        pytest.approx([0.05])
    assert chosen == DEFAULTS
    k = _key(results, "swamping_ratio")
    assert (k.errors_default, k.errors_chosen, k.best_range) == (1, 1, None)


# ------------------------------------------------- margins of the default on both halves

def test_the_margin_is_counted_in_grid_steps_to_each_end_of_the_run_holding_the_default():
    values = grid("swamping_ratio", 0.1)  # 0.0125 ... 0.8, the default 0.1 at index 6
    errors = {v: 0 if 0.04 < v < 0.15 else 1 for v in values}  # 0.05, 0.0707, 0.1, 0.141
    h = half_range(errors, 0.1)
    assert h.fewest_range == pytest.approx((0.05, 0.1 * SQRT2))
    assert (h.steps_below, h.steps_above, h.open_below, h.open_above) == (2, 1, False, False)
    assert h.constrained and not h.at_edge and (h.errors_default, h.fewest) == (0, 0)
    # Fewest errors up to the grid's end: no failing value found below, so no edge there.
    h = half_range({v: 0 if v <= 0.1 else 2 for v in values}, 0.1)
    assert (h.steps_below, h.steps_above, h.open_below, h.open_above) == (6, 0, True, False)
    assert h.at_edge  # 0.141 has more errors: no margin above
    h = half_range({v: 3 for v in values}, 0.1)
    assert not h.constrained and not h.at_edge and (h.steps_below, h.steps_above) == (6, 6)
    # A default with more than the fewest errors has no run and sits at an edge by definition.
    h = half_range({v: 0 if v < 0.06 else 1 for v in values}, 0.1)
    assert h.fewest_range is None and h.steps_below is None and h.at_edge


def test_both_halves_are_scanned_and_a_default_at_an_edge_of_the_held_out_half_is_flagged(
        tmp_path, monkeypatch):
    monkeypatch.delitem(EDGE_REASONS, "swamping_ratio", raising=False)  # the corpus's reason
    broken, healthy = (0.02, 0.04), (0.15, 0.3)
    heldout_broken, heldout_healthy = (0.03, 0.09), (0.12, 0.5)
    chosen, results = _calibrate(tmp_path, broken, healthy, heldout_broken, heldout_healthy)
    assert chosen == DEFAULTS  # the held-out half moves nothing
    values = grid("swamping_ratio", 0.1)
    # Held-out: a miss where a broken ratio is >= the value, a false alarm where a healthy one
    # is below it: error-free only above 0.09 and at most 0.12, which holds one grid value, 0.1.
    assert [v for v in values if _errors(v, heldout_broken, heldout_healthy) == 0] == [0.1]
    assert _errors(0.0707, heldout_broken, heldout_healthy) == 1 == _errors(0.141, heldout_broken,
                                                                               heldout_healthy)
    k = _key(results, "swamping_ratio")
    cal, held = k.calibration_half, k.heldout_half
    assert cal.fewest_range == pytest.approx((0.05, 0.1 * SQRT2)) and (cal.steps_below, cal.steps_above) == (2, 1)
    assert not cal.at_edge
    assert held.fewest_range == (0.1, 0.1) and (held.steps_below, held.steps_above) == (0, 0)
    assert (held.errors_default, held.fewest) == (0, 0) and held.at_edge
    assert "swamping_ratio" not in EDGE_REASONS and k.flagged
    (line,) = [line for line in margin_lines(results) if "swamping_ratio" in line]
    assert "margin 2 / 1" in line and "margin 0 / 0" in line and "FLAGGED" in line
    # A stated reason keeps the edge but lifts the flag.
    monkeypatch.setitem(EDGE_REASONS, "swamping_ratio", "the held-out runs at 0.09 and 0.12")
    assert k.at_edge and not k.flagged
    (line,) = [line for line in margin_lines(results) if "swamping_ratio" in line]
    assert "AT AN EDGE, reason stated" in line and "FLAGGED" not in line
    # Keys these runs leave unconstrained on both halves are not at an edge.
    assert not _key(results, "learned_fraction").at_edge


def test_a_default_outside_the_held_out_fewest_error_run_is_at_an_edge(tmp_path):
    # Held-out: the healthy run at 0.08 is a false alarm at the default 0.1; 0.05 and 0.0707
    # have no error. The default has 1 error against the fewest 0: no run, an edge.
    chosen, results = _calibrate(tmp_path, (0.02, 0.04), (0.15, 0.3), (0.03,), (0.08,))
    held = _key(results, "swamping_ratio").heldout_half
    assert (held.errors_default, held.fewest) == (_errors(0.1, (0.03,), (0.08,)), 0) == (1, 0)
    assert held.fewest_range is None and held.at_edge
    # The calibration half alone decides: the default stays.
    assert chosen == DEFAULTS


# ------------------------------------------------- which runs flip at a neighbouring value

def test_flips_name_the_runs_whose_alarms_change_at_a_value_and_their_errors(tmp_path):
    broken, healthy = (0.02, 0.09), (0.12, 0.3)
    ratios = {("broken", 2 * i): r for i, r in enumerate(broken)} | \
        {("healthy", 2 * i): r for i, r in enumerate(healthy)}
    records = [_record(tmp_path, variant, seed, r) for (variant, seed), r in ratios.items()]
    runs = Runs(records)
    try:
        calibrator = Calibrator(runs, records, {FAMILY.name: FAMILY})
        for value in (0.1 / SQRT2, 0.1 * SQRT2, 0.05, 0.2):
            flips = calibrator.flips("swamping_ratio", value)
            # A run flips where its constant ratio lies between the default and the value.
            assert {(f.record.variant, f.record.seed) for f in flips} == \
                {k for k, r in ratios.items() if (r < value) != (r < 0.1)}
            for f in flips:
                variant, ratio = f.record.variant, ratios[(f.record.variant, f.record.seed)]
                gained = ratio < value
                changed, unchanged = (f.appeared, f.vanished) if gained else (f.vanished, f.appeared)
                assert [(x.id, x.subject) for x in changed] == [("gradient-swamping", "aux")]
                assert unchanged == []
                assert changed[0].evidence["median_ratio"] == pytest.approx(ratio)
                # A broken run errs (a miss) without the alarm, a healthy one (a false alarm) with it.
                assert (f.errors_base, f.errors_value) == \
                    ((0, 1) if gained else (1, 0)) if variant == "healthy" else ((1, 0) if gained else (0, 1))
                assert f.record.label in f.describe() and "gradient-swamping[aux]" in f.describe()
        # One step down, the broken run at 0.09 is missed; one step up, the healthy 0.12 alarms.
        assert [(f.record.label, f.errors_value) for f in calibrator.flips("swamping_ratio", 0.1 / SQRT2)] \
            == [("synthetic-swamping/broken/s2", 1)]
        assert [(f.record.label, f.errors_value) for f in calibrator.flips("swamping_ratio", 0.1 * SQRT2)] \
            == [("synthetic-swamping/healthy/s0", 1)]
        # A key no rule reads on these runs flips nothing.
        assert calibrator.flips("proto_usage", 0.7) == []
    finally:
        runs.close()


def test_edge_flips_name_the_runs_one_grid_step_from_a_default_at_an_edge_on_each_half(tmp_path):
    # Calibration ratios leave 0.1 two steps below and one above (no edge); the held-out half
    # has a broken run at 0.09 and a healthy one at 0.12, one grid step either side of 0.1.
    cal = {("broken", 0): 0.02, ("broken", 2): 0.04, ("healthy", 0): 0.15, ("healthy", 2): 0.3}
    held = {("broken", 1): 0.03, ("broken", 3): 0.09, ("healthy", 1): 0.12, ("healthy", 3): 0.5}
    records = [_record(tmp_path, variant, seed, r) for (variant, seed), r in cal.items()]
    heldout = [_record(tmp_path, variant, seed, r) for (variant, seed), r in held.items()]
    runs = Runs(records + heldout)
    try:
        calibrator = Calibrator(runs, records, {FAMILY.name: FAMILY}, heldout)
        chosen, results = calibrator.calibrate()
        found = calibrator.edge_flips(results, chosen)
    finally:
        runs.close()
    assert {key for key, *_ in found} == {"swamping_ratio"}  # the only key at an edge
    by_place = {(half, round(value, 4)): flips for _, half, value, flips in found}
    below, above = round(0.1 / SQRT2, 4), round(0.1 * SQRT2, 4)
    assert set(by_place) == {("calibration", below), ("calibration", above),
                             ("held-out", below), ("held-out", above)}
    # No calibration ratio lies between 0.0707 and 0.141: nothing flips there.
    assert by_place[("calibration", below)] == [] == by_place[("calibration", above)]
    (missed,) = by_place[("held-out", below)]
    (false_alarm,) = by_place[("held-out", above)]
    assert (missed.record.label, missed.errors_base, missed.errors_value) == \
        ("synthetic-swamping/broken/s3", 0, 1)
    assert (false_alarm.record.label, false_alarm.errors_base, false_alarm.errors_value) == \
        ("synthetic-swamping/healthy/s1", 0, 1)
    assert missed.vanished[0].evidence["median_ratio"] == pytest.approx(0.09)
    assert false_alarm.appeared[0].evidence["median_ratio"] == pytest.approx(0.12)
    lines = flip_lines(found)
    assert "swamping_ratio at 0.0707, held-out half: 1 run(s) change, errors +1" in lines
    assert any("synthetic-swamping/healthy/s1 errors 0->1: +gradient-swamping[aux]" in line
               for line in lines)
