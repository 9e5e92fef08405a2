"""benchmarks/validity/reproduce.py: the comparison of two run.py output folders, on synthetic
outcomes whose ranges and overlaps are counted by hand, and end to end on folders of real run
files whose alarms are known (aux's gradient ratio below or above ``swamping_ratio``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.validity.reproduce import (RangeComparison, range_comparisons,
                                           verdict_differences)
from benchmarks.validity.report import outcome_ranges
from test_diagnose import _synthetic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "validity" / "reproduce.py"


def test_outcome_ranges_are_min_and_max_over_seeds_of_numeric_outcomes():
    outcomes = {("fam", "healthy", 0): {"acc": 0.9, "rank": 12, "ok": True, "note": "x"},
                ("fam", "healthy", 1): {"acc": 0.86, "rank": 14},
                ("fam", "healthy", 2): {"acc": 0.95, "rank": 13},
                ("fam", "broken", 1): {"acc": 0.1}}
    ranges = outcome_ranges(outcomes)
    assert ranges[("fam", "healthy")] == {"acc": (0.86, 0.95, 3), "rank": (12.0, 14.0, 3)}
    assert ranges[("fam", "broken")] == {"acc": (0.1, 0.1, 1)}  # booleans and text are not figures


def test_ranges_overlap_when_neither_lies_wholly_beyond_the_other():
    a = {("f", "v", 0): {"acc": 0.80, "err": 0.010}, ("f", "v", 1): {"acc": 0.86, "err": 0.012}}
    b = {("f", "v", 0): {"acc": 0.86, "err": 0.020}, ("f", "v", 1): {"acc": 0.90, "err": 0.030},
         ("f", "w", 0): {"acc": 0.5}}
    rows = {(r.variant, r.outcome): r for r in range_comparisons(a, b)}
    # acc: [0.80, 0.86] and [0.86, 0.90] share 0.86; err: [0.010, 0.012] lies below [0.020, 0.030].
    assert rows["v", "acc"].a == (0.80, 0.86, 2) and rows["v", "acc"].b == (0.86, 0.90, 2)
    assert rows["v", "acc"].overlap and not rows["v", "err"].overlap
    # A variant one side lacks cannot overlap.
    assert rows["w", "acc"].a is None and not rows["w", "acc"].overlap
    assert RangeComparison("f", "v", "x", (1.0, 2.0, 2), (2.5, 3.0, 1)).overlap is False
    assert RangeComparison("f", "v", "x", (1.0, 2.0, 2), (0.5, 1.0, 1)).overlap is True


def test_one_seed_figures_that_differ_by_rounding_overlap_and_larger_gaps_do_not():
    # Two threads sum in another order: cos_median -0.65357602 against -0.65357608 (measured,
    # two-task-conflict s0 at 1 and 2 threads). The slack is rtol x the largest magnitude.
    one, two = (-0.6535760164, -0.6535760164, 1), (-0.6535760760, -0.6535760760, 1)
    assert RangeComparison("f", "v", "cos", one, two).overlap  # default rtol 1e-3
    assert not RangeComparison("f", "v", "cos", one, two, rtol=0.0).overlap
    # 0.50 against 0.51: apart at 1e-3 (slack 0.00051), together at 0.05 (slack 0.0255).
    assert not RangeComparison("f", "v", "acc", (0.5, 0.5, 1), (0.51, 0.51, 1)).overlap
    assert RangeComparison("f", "v", "acc", (0.5, 0.5, 1), (0.51, 0.51, 1), rtol=0.05).overlap


def test_an_outcome_unmeasured_on_both_sides_agrees_and_on_one_side_does_not():
    nan = float("nan")
    assert RangeComparison("f", "v", "ratio", (nan, nan, 2), (nan, nan, 2)).overlap
    assert not RangeComparison("f", "v", "ratio", (nan, nan, 2), (0.2, 0.3, 2)).overlap
    assert not RangeComparison("f", "v", "ratio", (0.2, 0.3, 2), (nan, nan, 2)).overlap


def test_verdict_differences_name_what_only_one_side_raised():
    swamp = ("gradient-swamping", "aux", "warning")
    conflict = ("gradient-conflict", "a|b", "error")
    a = {("f", "v", 0): frozenset({swamp}), ("f", "v", 1): frozenset(), ("f", "v", 3): frozenset()}
    b = {("f", "v", 0): frozenset({swamp, conflict}), ("f", "v", 1): frozenset(),
         ("f", "v", 2): frozenset({swamp})}
    (d,) = verdict_differences(a, b)  # runs 2 and 3 are one-sided: not compared
    assert d.run == ("f", "v", 0) and d.only_a == frozenset() and d.only_b == {conflict}
    # The same alarm at another severity is another verdict.
    (d,) = verdict_differences({("f", "v", 0): frozenset({swamp})},
                               {("f", "v", 0): frozenset({("gradient-swamping", "aux", "error")})})
    assert d.only_a == {swamp}


def _folder(tmp_path: Path, name: str, runs: dict, threads: int) -> Path:
    """A run.py output folder: per run a real run file in which aux's weighted gradient is
    ``ratio`` of task's, and its outcome beside it."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "training.json").write_text(json.dumps({"wall_seconds": 1.0, "workers": 1,
                                                      "threads": threads}))
    for (family, variant, seed), (ratio, outcome) in runs.items():
        scratch = tmp_path / f"{name}-{variant}-{seed}"
        scratch.mkdir()
        rows = [(s, {("loss", "task"): 1.0, ("loss", "aux"): 1.0,
                     ("grad_norm", "task"): 1.0, ("grad_norm", "aux"): ratio,
                     ("weighted_grad_norm", "task"): 1.0, ("weighted_grad_norm", "aux"): ratio})
                for s in range(20)]
        _synthetic(scratch, rows).close()
        stem = folder / f"{family}-{variant}-s{seed}"
        shutil.move(next(scratch.glob("*.gprobe")), stem.with_suffix(".gprobe"))
        stem.with_suffix(".json").write_text(json.dumps({
            "family": family, "variant": variant, "seed": seed, "threads": threads,
            "outcome": outcome, "seconds": 1.0, "cpu_seconds": 1.0}))
    return folder


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_two_folders_with_the_same_alarms_and_overlapping_ranges_agree(tmp_path):
    # 0.05 is below swamping_ratio (0.1): a swamping alarm on aux; 0.3 raises nothing.
    a = _folder(tmp_path, "a", {("toy", "broken", 0): (0.05, {"acc": 0.50}),
                                ("toy", "broken", 1): (0.04, {"acc": 0.56}),
                                ("toy", "healthy", 0): (0.30, {"acc": 0.90})}, threads=1)
    b = _folder(tmp_path, "b", {("toy", "broken", 0): (0.06, {"acc": 0.55}),
                                ("toy", "broken", 1): (0.05, {"acc": 0.60}),
                                ("toy", "healthy", 0): (0.30, {"acc": 0.90})}, threads=2)
    result = _compare(a, b)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1 torch threads a run" in out and "2 torch threads a run" in out
    assert "3 of 3 shared runs raise the same alarms" in out
    assert "same toy/broken/s0: " in out and "gradient-swamping [aux]" in out
    assert "same toy/healthy/s0: none" in out
    assert "overlap toy/broken acc: A 0.5 to 0.56 (2 seeds), B 0.55 to 0.6 (2 seeds)" in out
    assert "2 of 2 seed ranges both folders hold overlap (relative tolerance 0.001)" in out
    assert "agree" in out.splitlines()[-1]


def test_a_changed_verdict_and_ranges_apart_make_the_folders_disagree(tmp_path):
    a = _folder(tmp_path, "a", {("toy", "broken", 0): (0.05, {"acc": 0.50}),
                                ("toy", "broken", 1): (0.05, {"acc": 0.52})}, threads=1)
    b = _folder(tmp_path, "b", {("toy", "broken", 0): (0.3, {"acc": 0.70}),
                                ("toy", "broken", 2): (0.05, {"acc": 0.71})}, threads=2)
    result = _compare(a, b)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "0 of 1 shared runs raise the same alarms" in out
    (diff,) = [line for line in out.splitlines() if "DIFF" in line]
    assert "toy/broken/s0" in diff and "only in A: warning gradient-swamping [aux]" in diff \
        and "only in B: none" in diff
    assert "APART   toy/broken acc: A 0.5 to 0.52 (2 seeds), B 0.7 to 0.71 (2 seeds)" in out
    assert "A only: toy/broken/s1" in out and "B only: toy/broken/s2" in out
    assert "DISAGREE" in out.splitlines()[-1]


def test_ranges_one_folder_alone_holds_are_counted_apart_from_the_compared(tmp_path):
    """A rerun of part of the corpus: the variants only the first folder holds are listed as
    one-sided, not counted among the compared ranges (and the folders still disagree)."""
    a = _folder(tmp_path, "a", {("toy", "broken", 0): (0.05, {"acc": 0.50}),
                                ("toy", "healthy", 0): (0.30, {"acc": 0.90})}, threads=1)
    b = _folder(tmp_path, "b", {("toy", "broken", 0): (0.05, {"acc": 0.50})}, threads=2)
    out = _compare(a, b).stdout
    assert "1 of 1 seed ranges both folders hold overlap (relative tolerance 0.001); " \
        "1 held by one folder only" in out
    assert "one     toy/healthy acc: A 0.9 (1 seed), B -" in out
    assert "A only: toy/healthy/s0" in out and "DISAGREE" in out.splitlines()[-1]


def test_a_folder_that_is_not_a_run_output_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for a in (tmp_path / "missing", tmp_path / "empty"):
        result = _compare(a, a)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(a) in result.stderr
    old = tmp_path / "old"
    old.mkdir()
    (old / "training.json").write_text("{}")
    (old / "toy-v-s0.json").write_text(json.dumps({"outcome": {}, "seconds": 1.0}))
    result = _compare(old, old)
    assert result.returncode == 2 and "older run.py" in result.stderr
