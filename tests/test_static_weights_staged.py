"""A loss weight fixed wherever it is on is a static weight: a stage schedule that switches a
loss off (StableMoE's balance loss at weight 0 once its router is frozen) or on does not
balance it, so its swamping still calls for ``static-loss-weights`` (docs/findings.md). A
weight that changes while on (a ramp) does not. Synthetic runs written as a probe would."""

from __future__ import annotations

import numpy as np
import pytest

from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.record import load_run

from test_swamping_layers import STEPS, _falling, _write

SWITCH = 28


def _staged(tmp_path, schedule: np.ndarray):
    """A task and a balancing loss on one shared layer, the balancing loss's raw gradient 40
    times the task's, weighted by ``schedule`` per step."""
    path = tmp_path / f"staged-{len(list(tmp_path.glob('*.gprobe')))}.gprobe"
    scales = {"router": [np.array([1.0, 40.0])] * STEPS}
    _write(path, ("task", "balance"), [1.0, schedule], {"router": 64},
           [_falling(2.0, 0.5), np.full(STEPS, 1.5)], scales, np.random.default_rng(5))
    return load_run(path)


def _findings(run):
    return {f.id: f for f in diagnose(run, Thresholds())
            if f.id in ("gradient-swamping", "static-loss-weights")}


def test_a_weight_switched_off_in_a_later_stage_is_static_where_it_is_on(tmp_path):
    schedule = np.where(np.arange(STEPS) < SWITCH, 1e-5, 0.0)
    found = _findings(_staged(tmp_path, schedule))
    assert found["gradient-swamping"].subject == "balance"
    assert found["static-loss-weights"].evidence["weights"] == {"balance": pytest.approx(1e-5)}


def test_a_weight_ramped_while_on_is_not_static(tmp_path):
    schedule = np.where(np.arange(STEPS) < SWITCH, np.linspace(1e-5, 2e-5, STEPS), 0.0)
    found = _findings(_staged(tmp_path, schedule))
    assert found["gradient-swamping"].subject == "balance"
    assert "static-loss-weights" not in found
