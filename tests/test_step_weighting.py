"""Shares are shares of training, not of probe steps: the default cadence is dense at the start,
so a pattern of the first steps (a loss still being switched on) must not count as persistent."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds
from gradprobe.diagnose._series import held_share, start_end
from gradprobe.probe.cadence import is_probe_step


def test_held_share_weights_each_probe_step_by_the_steps_it_stands_for():
    steps = np.array([0, 1, 2, 3, 4, 6, 8, 16])
    held = np.array([True] * 4 + [False] * 4)
    # Spans up to the next probe step; the last one repeats the one before: 1,1,1,1,2,2,8,8.
    assert held_share(steps, held) == 4 / 24
    judged = np.array([True, True, False, False, True, True, True, True])
    assert held_share(steps, held, judged) == 2 / 22


def test_start_and_end_windows_are_shares_of_the_training_steps():
    """Under the default cadence the first fifth of a 385-step run holds 24 probe steps and
    the last fifth 5: each window's median is of the values recorded in its fifth."""
    steps = np.array([s for s in range(385) if is_probe_step(s, None)])
    values = np.sqrt(steps.astype(float))
    ends = start_end(steps, values, Thresholds())
    span = steps[-1] - steps[0]
    assert ends["start"] == np.median(values[steps <= 0.2 * span])
    assert ends["end"] == np.median(values[steps >= steps[-1] - 0.2 * span])
    assert ends["start_steps"] == [0, int(steps[steps <= 0.2 * span][-1])]
    # At least min_points probe steps even where the share holds fewer.
    few = start_end(steps, values, Thresholds(window_share=0.001, min_points=3))
    assert few["start"] == np.median(values[:3]) and few["end"] == np.median(values[-3:])


def _delayed_auxiliary(tmp_path, switched_on: bool, steps: int = 400) -> list[str]:
    """A trunk shared by a task and an auxiliary loss held at weight 1e-3 over the first 35% of
    training and then raised to 0.3 (a loss switched on after a warm-up, as curricula and KL
    annealing do); ``switched_on=False`` keeps it at 1e-3: swamped for the whole run."""
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    # Label noise keeps the task learning (its loss floor is a fifth of its start) for the
    # whole run, so every probe step is judged.
    y_task, y_aux = (x[:, part].sum(1, keepdim=True) + torch.randn(512, 1)
                     for part in (slice(0, 4), slice(4, 8)))
    trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
    task, aux = nn.Linear(32, 1), nn.Linear(32, 1)
    model = nn.ModuleDict(dict(trunk=trunk, task=task, aux=aux))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    log = tmp_path / f"switched_on={switched_on}.gprobe"
    probe = gradprobe.Probe(model, run_file=log)
    warm_up = int(0.35 * steps)
    for step in range(steps):
        idx = torch.randint(0, 512, (64,))
        h = trunk(x[idx])
        weight = 0.3 if switched_on and step >= warm_up else 1e-3
        probe.backward({"task": F.mse_loss(task(h), y_task[idx]),
                        "aux": F.mse_loss(aux(h), y_aux[idx])}, weights={"aux": weight})
        opt.step()
        opt.zero_grad()
    probe.close()
    run = gradprobe.load_run(log)
    probe_steps = run.probe_steps()
    assert len(probe_steps) == sum(is_probe_step(s, None) for s in range(steps))
    # The warm-up is 35% of training but most of the default cadence's probe steps: counted
    # per probe step, the swamp would be persistent (share >= min_share = 0.5).
    assert (probe_steps < warm_up).mean() > 0.5
    return [f.subject for f in gradprobe.diagnose.diagnose(run) if f.id == "gradient-swamping"]


def test_a_loss_swamped_only_during_a_warm_up_is_not_a_swamp(tmp_path):
    assert _delayed_auxiliary(tmp_path, switched_on=True) == []


def test_a_loss_never_switched_on_is_a_swamp(tmp_path):
    assert _delayed_auxiliary(tmp_path, switched_on=False) == ["aux"]
