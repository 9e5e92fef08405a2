"""Unit tests that each catch one small change to the code which the rest of the suite let
pass (issue 21, item 5). ``scripts/mutations.py`` applies each change and runs this file to
show that it fails on the mutant; every expected number here is worked out by hand or with
numpy, not read back from the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.diagnose._series import start_end, window_counts, window_size
from gradprobe.metrics.latents import latent_summary
from gradprobe.record import pair_name
from test_diagnose import _synthetic

DEFAULTS = Thresholds()


# ------------------------------------------------------------- _series.window_size (ceil)

@pytest.mark.parametrize("n,expected", [
    (2, 2),    # fewer points than min_points: all of them
    (10, 3),   # 20% of 10 = 2 -> min_points 3
    (15, 3),   # 20% of 15 = 3 exactly
    (16, 4),   # 3.2 points: a partial point counts as a whole one
    (17, 4),   # 3.4
    (20, 4),
    (21, 5),   # 4.2
    (99, 20),  # 19.8
])
def test_a_window_of_a_share_of_the_points_rounds_up(n, expected):
    assert DEFAULTS.window_share == 0.2 and DEFAULTS.min_points == 3
    assert window_size(n, DEFAULTS) == expected


def test_the_collapse_rule_reads_its_end_window_from_window_size(tmp_path):
    # 17 rank points: the end window holds ceil(0.2 * 17) = 4 of them, steps 13..16; the
    # last four ranks are 1, 1, 9, 9 (median 5), the last three 1, 9, 9 (median 9).
    ranks = [40.0] * 13 + [1.0, 1.0, 9.0, 9.0]
    rows = [(s, {("loss", "task"): 1.0, ("rankme_centred", "z"): r,
                 ("effective_rank_isotropic", "z"): 40.0, ("latent_dim", "z"): 64.0})
            for s, r in enumerate(ranks)]
    (f,) = [f for f in diagnose(_synthetic(tmp_path, rows)) if f.id == "representation-collapse"]
    assert f.evidence["end_steps"] == [13, 16]
    assert f.evidence["rank_end"] == float(np.median(ranks[-4:])) == 5.0


# ----------------------------------------------------------- _series.window_counts (<=)

# A cadence dense at the start, sparser later: 100 training steps, 20% of them = 20 steps.
CADENCE = np.array([0, 1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95, 100])


def test_the_start_and_end_windows_include_their_boundary_steps():
    # Start window: steps 0..20 inclusive (0-5, 10, 20: 8 probe steps); end window: steps
    # 80..100 inclusive (80, 85, 90, 95, 100: 5 probe steps).
    assert window_counts(CADENCE, DEFAULTS) == (8, 5)
    values = np.arange(len(CADENCE), dtype=np.float64)
    ends = start_end(CADENCE, values, DEFAULTS)
    assert ends["start_steps"] == [0, 20] and ends["end_steps"] == [80, 100]
    assert ends["start"] == float(np.median(values[:8])) == 3.5
    assert ends["end"] == float(np.median(values[-5:])) == 15.0


def test_windows_never_hold_fewer_than_min_points():
    # 10 steps spaced 1, 1, ... then one far step: the end window (steps >= 100 - 20) would hold
    # the last step alone; min_points makes it 3.
    steps = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 100])
    assert window_counts(steps, DEFAULTS) == (9, 3)


# ------------------------------------------------------ gradient-conflict: stall condition

def _conflict_run(tmp_path, task, aux):
    """A pair with cosine -0.8 at every step, equal gradient norms and weights, and the
    given loss curves; no combined norm is recorded, so only a stall can show harm."""
    pair = pair_name("task", "aux")
    rows = [(s, {("loss", "task"): t, ("loss", "aux"): a, ("grad_cosine", pair): -0.8,
                 ("grad_norm", "task"): 1.0, ("grad_norm", "aux"): 1.0,
                 ("weighted_grad_norm", "task"): 1.0, ("weighted_grad_norm", "aux"): 1.0,
                 ("weight", "task"): 1.0, ("weight", "aux"): 1.0})
            for s, (t, a) in enumerate(zip(task, aux))]
    found = [f for f in diagnose(_synthetic(tmp_path, rows)) if f.id == "gradient-conflict"]
    assert len(found) == 1 and found[0].evidence["median_cosine"] == -0.8
    return found[0]


STEPS = 40
FALLING = 1.0 - 0.7 * np.arange(STEPS) / (STEPS - 1)  # 1.0 -> 0.3
FLAT = np.ones(STEPS)
RISING = 1.0 + 0.5 * np.arange(STEPS) / (STEPS - 1)  # 1.0 -> 1.5


def _window_ratio(values):
    # 20% of 39 training steps = 7.8: steps 0..7 and 32..39, 8 points each.
    return float(np.median(values[-8:]) / np.median(values[:8]))


@pytest.mark.parametrize("aux", [FLAT, RISING])
def test_a_conflict_is_harmful_when_one_loss_stalls_while_the_other_falls(tmp_path, aux):
    f = _conflict_run(tmp_path, FALLING, aux)
    ratios = f.evidence["loss_ratios"]
    assert ratios["task"] == pytest.approx(_window_ratio(FALLING), rel=1e-12)
    assert ratios["aux"] == pytest.approx(_window_ratio(aux), rel=1e-12)
    assert ratios["task"] < DEFAULTS.conflict_stall_fraction <= ratios["aux"]
    assert f.evidence["stalled"] == ["aux"] and f.evidence["suffering"] == ["aux"]
    assert f.severity == "warning" and "'aux' stalled while the other fell" in f.title


def test_a_conflict_where_neither_loss_falls_is_not_a_stall(tmp_path):
    f = _conflict_run(tmp_path, FLAT, FLAT)
    assert f.evidence["loss_ratios"] == {"task": 1.0, "aux": 1.0}
    # Not a stall; both stuck with 80% of their descent undone is the plateau harm instead
    # (tests/test_conflict_harm.py).
    assert f.evidence["stalled"] == [] and f.evidence["plateau"]


def test_a_conflict_where_both_losses_fall_is_not_harm(tmp_path):
    f = _conflict_run(tmp_path, FALLING, FALLING)
    assert f.evidence["stalled"] == [] and f.severity == "info"
    assert "neither loss is held back" in f.title


# ---------------------------------------------- prototype-collapse: absolute spread kept

def _prototype_run(tmp_path, distance, norm):
    rows = [(s, {("loss", "task"): 1.0, ("prototype_mean_distance", "protos"): d,
                 ("latent_norm", "z"): n}) for s, (d, n) in enumerate(zip(distance, norm))]
    run = _synthetic(tmp_path, rows, losses=("task",), prototypes={"protos": "z"})
    return [f for f in diagnose(run) if f.id == "prototype-collapse"]


def test_prototypes_that_stay_apart_while_the_latent_grows_have_not_collapsed(tmp_path):
    # The latent's norm grows 1 -> 20 while the prototypes keep a mean distance of 2: relative
    # to the norm the distance falls to 1/20 of its peak (below proto_collapse_fraction 0.2),
    # but the prototypes themselves did not close in.
    norm = np.linspace(1.0, 20.0, 20)
    distance = np.full(20, 2.0)
    relative = distance / norm
    assert np.median(relative[-4:]) <= DEFAULTS.proto_collapse_fraction * relative.max()
    assert _prototype_run(tmp_path, distance, norm) == []


def test_prototypes_that_close_in_have_collapsed(tmp_path):
    # Same latent norm throughout; the mean distance falls 2 -> 0.1.
    norm = np.full(20, 5.0)
    distance = np.concatenate([np.full(8, 2.0), np.linspace(2.0, 0.1, 12)])
    (f,) = _prototype_run(tmp_path, distance, norm)
    end = float(np.median(distance[-4:]))  # window: ceil(0.2 * 20) = 4 points
    assert f.severity == "error"
    assert f.evidence["absolute_mean_distance_peak"] == 2.0
    assert f.evidence["absolute_mean_distance_end"] == pytest.approx(end, rel=1e-12)
    assert f.evidence["mean_distance_end"] == pytest.approx(end / 5.0, rel=1e-12)


# ------------------------------------------------------- total_variance_of (n - 1, not n)

@pytest.mark.parametrize("n,d", [(4, 3), (3, 8), (2, 5), (50, 6)])
def test_the_recorded_total_variance_is_the_unbiased_one(n, d):
    # Both Gram branches (n >= d and n < d), and few rows, where n and n - 1 differ most.
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d), dtype=torch.float64)
    expected = float(np.var(z.numpy(), axis=0, ddof=1).sum())
    assert float(latent_summary(z)["total_variance"]) == pytest.approx(expected, rel=1e-12)


def test_one_row_has_no_total_variance():
    assert float(latent_summary(torch.ones(1, 4))["total_variance"]) == 0.0


# ---------------------------------------------- per_loss.assemble (accumulates into .grad)

def test_the_assembled_grad_adds_to_a_gradient_already_accumulated():
    """Gradient accumulation over two micro-batches with no zero_grad between them: the
    assembled path must add to ``.grad`` as the ordinary backward does."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    head_a, head_b = nn.Linear(8, 1), nn.Linear(8, 1)
    model = nn.ModuleList([trunk, head_a, head_b])

    def losses(batch):
        h = trunk(batch)
        return {"a": head_a(h).pow(2).mean(), "b": (head_b(h) - 1.0).pow(2).mean()}

    weights = {"a": 1.0, "b": 0.5}
    for batch in x:  # the ordinary backward of the weighted sum, accumulated
        parts = losses(batch)
        (parts["a"] + 0.5 * parts["b"]).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    probe = gradprobe.Probe(model, shared=trunk, every=1, assemble=True)
    first = None
    for batch in x:
        probe.backward(losses(batch), weights=weights)
        assert probe.backward_path == "assembled"
        first = first or [p.grad.clone() for p in model.parameters()]
    probe.close()
    for p, want, one in zip(model.parameters(), expected, first):
        assert torch.allclose(p.grad, want, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(p.grad, one)  # the second micro-batch did add something
