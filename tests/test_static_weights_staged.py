"""A loss weight fixed wherever it is on is a static weight: a stage schedule that switches a
loss off (StableMoE's balance loss at weight 0 once its router is frozen) or on does not
balance it, so its swamping still calls for ``static-loss-weights`` (docs/findings.md). A
weight that changes while on (a ramp) does not. Synthetic runs written as a probe would."""

from __future__ import annotations

import numpy as np
import pytest

from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.record import RunWriter, load_run

STEPS, SWITCH = 40, 28


def _staged(tmp_path, schedule: np.ndarray):
    """A task and a balancing loss on one shared layer, the balancing loss's raw gradient 40
    times the task's, weighted by ``schedule`` per step."""
    rng = np.random.default_rng(5)
    path = tmp_path / f"staged-{len(list(tmp_path.glob('*.gprobe')))}.gprobe"
    writer = RunWriter(path)
    writer.set_meta(losses=["task", "balance"], task="task",
                    roles={"task": "task", "balance": "other"}, every=1,
                    expect_groups_per_batch=None)
    task_loss = np.geomspace(2.0, 0.5, STEPS)
    for step in range(STEPS):
        rows = rng.normal(size=(2, 64)) * np.array([[1.0], [40.0]])
        gram = rows @ rows.T
        weights = (1.0, float(schedule[step]))
        scalars = {}
        for k, name in enumerate(("task", "balance")):
            norm = float(np.sqrt(gram[k, k]))
            scalars |= {("loss", name): float((task_loss[step], 1.5)[k]),
                        ("grad_norm", name): norm, ("weighted_grad_norm", name): weights[k] * norm,
                        ("weight", name): weights[k]}
        writer.write_step(step, scalars, {("grad_gram", "shared"): gram,
                                          ("grad_gram_layer", "router"): gram})
    writer.close()
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
