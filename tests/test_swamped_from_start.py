"""A task swamped only over its first steps by a loss that then falls to its own floor, and
kept from its fit for the rest of the run, is swamped (docs/findings.md, "gradient-swamping":
swamped from its first steps): a penalty that flattens the network within a few steps leaves
the ratio recovered (the two gradients cancel at the flat point) and the task at chance, and
one that undoes a pretrained task drives its loss back up from its floor. A task that learned
part of its fit, or a rival that did not fall, is no such case. Synthetic runs written as a
probe would (test_swamping_layers), their windows and end fractions checked against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.diagnose._series import task_learning
from gradprobe.record import load_run

from test_swamping_layers import STEPS, _falling, _write

TH = Thresholds()
BRIEF = 3  # steps the penalty's gradient dominates, of STEPS: min_points, under half the start window


def _windows(values):
    """Start and end window medians, in training steps as the rules take them (every=1)."""
    reach = TH.window_share * (STEPS - 1)
    steps = np.arange(STEPS)
    first = max(TH.min_points, int((steps <= reach).sum()))
    last = max(TH.min_points, int((steps >= STEPS - 1 - reach).sum()))
    return float(np.median(values[:first])), float(np.median(values[-last:]))


def _case(tmp_path, task_loss, penalty_end=0.01, tag=""):
    """A task and a penalty on one shared layer: the penalty's gradient 50 times the task's
    over the first BRIEF steps, equal to it afterwards."""
    rng = np.random.default_rng(3)
    scales = np.ones((STEPS, 2))
    scales[:BRIEF, 1] = 50.0
    losses = [task_loss, _falling(1.0, penalty_end)]
    _write(tmp_path / f"brief{tag}.gprobe", ["cross_entropy", "penalty"], [1.0, 1.0],
           {"trunk": 64}, losses, {"trunk": scales}, rng)
    return load_run(tmp_path / f"brief{tag}.gprobe"), losses


def _swamping(run):
    return next((f for f in diagnose(run, TH) if f.id == "gradient-swamping"
                 and f.subject == "cross_entropy"), None)


def test_a_task_flattened_at_chance_by_a_brief_penalty_is_swamped(tmp_path):
    flat = math.log(10) * (1 + 0.002 * np.random.default_rng(0).normal(size=STEPS))
    run, losses = _case(tmp_path, flat)
    finding = _swamping(run)
    assert finding is not None and finding.severity in ("warning", "error")
    held = finding.evidence["never_learned"]
    start, end = _windows(losses[0])
    p_start, p_end = _windows(losses[1])
    assert held["by"] == "penalty"
    assert held["end_fraction"] == pytest.approx(end / start, rel=1e-9)
    assert held["dominant_end_fraction"] == pytest.approx(p_end / p_start, rel=1e-9)
    assert finding.evidence["held_steps"] == BRIEF
    assert "swamped from its first steps by 'penalty'" in finding.title
    # No weight balanced on the ratio (which reads ~1 once the gradients cancel): a warm-up.
    assert "linear_ramp" in finding.remedy and "->" not in finding.remedy


def test_a_task_undone_from_its_floor_is_swamped_and_has_not_memorised(tmp_path):
    # A pretrained classifier at 0.01 driven back up to chance: its first values sit below
    # memorised_fraction of its start window, which the rise lifts.
    undone = np.minimum(0.01 * np.exp(0.9 * np.arange(STEPS)), math.log(10))
    start, end = _windows(undone)
    assert undone[0] <= TH.memorised_fraction * start and end / start >= 1.0
    run, _ = _case(tmp_path, undone, tag="-undone")
    assert task_learning(run, np.arange(STEPS), TH).all()
    finding = _swamping(run)
    assert finding is not None and finding.severity in ("warning", "error")
    assert finding.evidence["never_learned"]["end_fraction"] == pytest.approx(end / start)


@pytest.mark.parametrize("case", ["learned-part", "penalty-stays"])
def test_no_such_case_without_both_the_stall_and_the_rival_s_fall(tmp_path, case):
    learned = _falling(math.log(10), 0.5 * math.log(10))  # down to half: part of its fit
    flat = np.full(STEPS, math.log(10))
    run, _ = _case(tmp_path, learned if case == "learned-part" else flat,
                   penalty_end=1.0 if case == "penalty-stays" else 0.01, tag=case)
    assert _swamping(run) is None
