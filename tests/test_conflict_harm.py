"""The harm test of ``gradient-conflict`` (issue 21, item 2): a compromise plateau where each
loss undoes most of the other's descent is harm; a term still falling, or one that rose from
near its floor to an equilibrium, is not. Expected numbers are computed here with numpy from
the series written into the run, not read back from the code under test."""

from __future__ import annotations

import numpy as np
import pytest

from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.diagnose._series import descent_undone, level_after_start, start_low
from gradprobe.record import RunWriter, load_run, pair_name

DEFAULTS = Thresholds()
STEPS = 40  # windows of 20% of 39 training steps: start 0..7, after it 8..15, end 32..39
t = np.arange(STEPS, dtype=np.float64)
# Falls from ln 10 over the start window, then settles near ln 2 (two tasks on one set of
# logits with opposite label maps).
COMPROMISE = np.where(t < 8, 2.3 - (2.3 - 0.8) * t / 8, 0.8 - 0.04 * (t - 8) / (STEPS - 9))
STILL_FALLING = np.where(t < 8, 2.3 - 1.5 * t / 8, 0.8 * np.exp(-(t - 8) / 15))
# Starts at ~0 (a commitment or redundancy term at initialisation) and rises to its equilibrium.
RISES_TO_EQUILIBRIUM = np.where(t < 8, 0.01 + 0.1 * t / 8, 0.11)


def _run(tmp_path, first, second, cosine=-0.8, norms=(1.0, 1.0), names=("task", "aux"),
         roles=None, records=None, latent_reach=None):
    """One conflicting pair; ``records`` (role records) and ``latent_reach`` ({loss:
    latent_grad_norm on the watched latent 'z'}) for the graph's reading of the pair."""
    pair = pair_name(*names)
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.gprobe')))}.gprobe"
    w = RunWriter(path)
    w.set_meta(losses=list(names), task=names[0],
               roles=roles or {names[0]: "task", names[1]: "other"}, every=1,
               expect_groups_per_batch=None, **({"role_records": records} if records else {}))
    for s in range(STEPS):
        scalars = {("grad_cosine", pair): cosine}
        scalars |= {("latent_grad_norm", pair_name("z", n)): v
                    for n, v in (latent_reach or {}).items()}
        for name, loss, norm in zip(names, (first, second), norms):
            scalars |= {("loss", name): float(loss[s]), ("grad_norm", name): norm,
                        ("weighted_grad_norm", name): norm, ("weight", name): 1.0}
        w.write_step(s, scalars)
    w.close()
    found = [f for f in diagnose(load_run(path)) if f.id == "gradient-conflict"]
    assert len(found) == 1
    return found[0]


def test_descent_undone_is_minus_the_inner_product_over_the_own_squared_norm():
    rng = np.random.default_rng(0)
    own, other = rng.normal(size=(2, 200, 16)) * np.array([1.0, 3.0])[:, None, None]
    own_norm, other_norm = np.linalg.norm(own, axis=1), np.linalg.norm(other, axis=1)
    cosine = np.sum(own * other, axis=1) / (own_norm * other_norm)
    expected = np.clip(-np.sum(own * other, axis=1) / own_norm ** 2, 0, 1)
    assert np.allclose(descent_undone(cosine, own_norm, other_norm), expected)
    # values clipped at both ends and values within occur
    inside = (expected > 0) & (expected < 1)
    assert (expected == 0).any() and (expected == 1).any() and inside.any()
    assert np.isnan(descent_undone(np.array([-0.5]), np.array([0.0]), np.array([1.0]))[0])


def test_levels_after_the_start_window_and_the_start_low():
    values = RISES_TO_EQUILIBRIUM + 0.001 * np.sin(t)
    assert level_after_start(t, values, DEFAULTS) == pytest.approx(np.median(values[8:16]))
    padded = np.concatenate([[np.nan], values[:9], [np.nan]])
    rolling = [np.nanmedian(padded[i:i + 3]) for i in range(8)]  # centred, width 3
    assert start_low(t, values, DEFAULTS) == pytest.approx(min(rolling))


def test_both_losses_stuck_on_a_compromise_plateau_is_harm(tmp_path):
    f = _run(tmp_path, COMPROMISE, COMPROMISE)
    e = f.evidence
    assert e["descent_undone"] == {"task": pytest.approx(0.8), "aux": pytest.approx(0.8)}
    settled = np.median(COMPROMISE[32:]) / np.median(COMPROMISE[8:16])
    assert e["settled_ratios"]["task"] == pytest.approx(settled)
    assert DEFAULTS.conflict_plateau_fraction <= settled < 1
    # The old stall test sees no harm: both fell from their start.
    assert max(e["loss_ratios"].values()) < DEFAULTS.conflict_stall_fraction
    assert e["stalled"] == [] and e["plateau"] and e["suffering"] == ["task", "aux"]
    assert f.severity in ("warning", "error") and "compromise plateau" in f.title


def test_a_term_still_falling_is_an_equilibrium_not_harm(tmp_path):
    f = _run(tmp_path, STILL_FALLING, COMPROMISE)
    settled = np.median(STILL_FALLING[32:]) / np.median(STILL_FALLING[8:16])
    assert f.evidence["settled_ratios"]["task"] == pytest.approx(settled)
    assert settled < DEFAULTS.conflict_plateau_fraction
    assert not f.evidence["plateau"] and f.severity == "info"


def test_a_loss_whose_descent_is_barely_undone_is_not_held(tmp_path):
    # cos -0.8, |g_aux| = 0.375 |g_task|: aux undoes 30% of the task's descent (VICReg's
    # variance term: 0.29-0.31), the task all of the aux's (2.13, clipped to 1).
    f = _run(tmp_path, COMPROMISE, COMPROMISE, norms=(1.0, 0.375))
    assert f.evidence["descent_undone"] == {"task": pytest.approx(0.3), "aux": pytest.approx(1.0)}
    assert 0.3 < DEFAULTS.conflict_undone_fraction
    assert not f.evidence["plateau"] and f.severity == "info"


def test_a_loss_that_rose_from_its_floor_to_an_equilibrium_is_not_stalled(tmp_path):
    f = _run(tmp_path, STILL_FALLING, RISES_TO_EQUILIBRIUM)
    # Judged on its first value it would have stalled (it ends far above its start)...
    assert f.evidence["loss_ratios"]["aux"] >= DEFAULTS.conflict_stall_fraction
    assert f.evidence["loss_ratios"]["task"] < DEFAULTS.conflict_stall_fraction
    # ...but its level after the start window is many times its start-window low.
    low = start_low(t, RISES_TO_EQUILIBRIUM, DEFAULTS)
    assert np.median(RISES_TO_EQUILIBRIUM[8:16]) >= DEFAULTS.conflict_rise_ratio * low
    assert f.evidence["rose_to_equilibrium"] == ["aux"]
    assert f.evidence["stalled"] == [] and f.severity == "info"


def test_a_flat_loss_against_a_falling_one_still_stalls(tmp_path):
    flat = np.full(STEPS, 1.0)
    f = _run(tmp_path, STILL_FALLING, flat)
    assert f.evidence["rose_to_equilibrium"] == [] and f.evidence["stalled"] == ["aux"]
    assert f.severity in ("warning", "error")


def test_an_adversary_at_its_equilibrium_is_no_plateau(tmp_path):
    f = _run(tmp_path, COMPROMISE, COMPROMISE, names=("task", "domain"),
             roles={"task": "task", "domain": "adversarial"})
    assert f.evidence["descent_undone"]["task"] == pytest.approx(0.8)
    assert not f.evidence["plateau"] and f.severity == "info"


# A 1 - cos invariance term (floor 0, far from it) and a covariance term: both rise from their
# first values as the embedding leaves its initial common direction, then settle (TiCo).
INVARIANCE_RISES = np.where(t < 8, 0.65 + 0.1 * t / 8, 0.75 - 0.05 * (t - 8) / (STEPS - 9))
COVARIANCE_RISES = np.where(t < 8, 0.02 + 0.014 * t / 8, 0.034)


def test_a_pair_that_rose_together_from_where_it_began_is_no_compromise(tmp_path):
    f = _run(tmp_path, INVARIANCE_RISES, COVARIANCE_RISES)
    e = f.evidence
    for values in (INVARIANCE_RISES, COVARIANCE_RISES):
        began, settled = np.max(values[:DEFAULTS.min_points]), np.median(values[8:16])
        assert settled > began
        # Neither rise is the 3-fold one from a start-window low that a floor-0 test sees...
        assert settled < DEFAULTS.conflict_rise_ratio * start_low(t, values, DEFAULTS)
        # ...and each would sit on the plateau: held, not still falling.
        assert np.median(values[32:]) / settled >= DEFAULTS.conflict_plateau_fraction
    assert e["descent_undone"] == {"task": pytest.approx(0.8), "aux": pytest.approx(0.8)}
    assert e["rose_together"] and e["rose_to_equilibrium"] == ["task", "aux"]
    assert not e["plateau"] and e["stalled"] == [] and f.severity == "info"
    assert "both rose from where they began" in f.title


def test_a_term_that_settled_above_where_it_began_is_no_compromise(tmp_path):
    # One term descends to its balance while the other, satisfied at the start, rises to it
    # (CorInfoMax's log-det covariance term against its invariance term): no plateau.
    f = _run(tmp_path, COMPROMISE, COVARIANCE_RISES)
    began = {name: np.max(v[:DEFAULTS.min_points]) for name, v in
             (("task", COMPROMISE), ("aux", COVARIANCE_RISES))}
    assert np.median(COMPROMISE[8:16]) < began["task"]
    assert np.median(COVARIANCE_RISES[8:16]) > began["aux"]
    # ...held by each other and neither still falling: the plateau's other conditions hold.
    assert min(f.evidence["descent_undone"].values()) >= DEFAULTS.conflict_undone_fraction
    assert np.median(COVARIANCE_RISES[32:]) / np.median(COVARIANCE_RISES[8:16]) >= \
        DEFAULTS.conflict_plateau_fraction
    e = f.evidence
    assert not e["rose_together"] and e["settled_above_start"] == ["aux"]
    assert not e["plateau"] and e["stalled"] == [] and f.severity == "info"
    assert "'aux' settled above where it began" in f.title


def test_a_pair_that_both_descended_is_judged_for_a_plateau(tmp_path):
    f = _run(tmp_path, COMPROMISE, 0.5 * COMPROMISE)
    assert f.evidence["settled_above_start"] == [] and f.evidence["plateau"]
    assert f.severity in ("warning", "error")


def test_a_declared_task_that_settled_above_where_it_began_is_held_back(tmp_path):
    records = [{"name": "task", "role": "task", "source": "declared", "hint": None,
                "reach": "shared", "counts": None},
               {"name": "aux", "role": "other", "source": "name", "hint": None,
                "reach": "shared", "counts": None}]
    f = _run(tmp_path, COVARIANCE_RISES, COMPROMISE, records=records)
    assert f.evidence["settled_above_start"] == [] and f.evidence["plateau"]
    assert f.severity in ("warning", "error")


def test_a_loss_below_zero_is_never_read_by_a_ratio_to_its_start_low(tmp_path):
    # Falls from -0.5 to -0.9 (a log-likelihood, a -cos term): its settled level is 3 times
    # its start-window low "by ratio" (-0.9 >= 3 x -0.9), which means nothing below 0.
    falling_below_zero = np.where(t < 8, -0.5 - 0.4 * t / 8, -0.9 - 0.01 * (t - 8) / (STEPS - 9))
    low = start_low(t, falling_below_zero, DEFAULTS)
    assert np.median(falling_below_zero[8:16]) >= DEFAULTS.conflict_rise_ratio * low
    f = _run(tmp_path, COMPROMISE, falling_below_zero)
    assert f.evidence["rose_to_equilibrium"] == []


def _reach(own_task, own_aux, aux_source="name", aux_role="other"):
    counts = [{"shared": 4, "own": own, "loss_weights": 0} for own in (own_task, own_aux)]
    return [{"name": "task", "role": "task", "source": "first", "hint": None,
             "reach": "shared", "counts": counts[0]},
            {"name": "aux", "role": aux_role, "source": aux_source, "hint": None,
             "reach": "shared", "counts": counts[1]}]


def test_a_term_on_a_latent_the_other_loss_reads_its_output_from_is_a_trade_off(tmp_path):
    # 'task' has a decoder of its own (2 tensors); 'aux' reaches only what 'task' reaches, and
    # both reach the watched latent z: a commitment-like term on z, harm worded but info.
    f = _run(tmp_path, COMPROMISE, COMPROMISE, records=_reach(2, 0),
             latent_reach={"task": 0.5, "aux": 0.2})
    assert f.evidence["term_on_representation"] == {"aux": ["z"]}
    assert f.evidence["suffering"] == ["task", "aux"] and f.severity == "info"
    assert "a term on that representation" in f.title and 'roles={"aux": "task"}' in f.title


@pytest.mark.parametrize("records, reach", [
    (_reach(2, 0), {"task": 0.5, "aux": 0.0}),  # aux never reaches z (a PINN's output bias)
    (_reach(0, 0), {"task": 0.5, "aux": 0.2}),  # the same reach: two tasks on one head
    (_reach(2, 0, aux_source="declared", aux_role="task"), {"task": 0.5, "aux": 0.2}),
])
def test_without_a_latent_both_reach_or_an_output_of_its_own_the_plateau_is_harm(
        tmp_path, records, reach):
    f = _run(tmp_path, COMPROMISE, COMPROMISE, records=records, latent_reach=reach)
    assert f.evidence["term_on_representation"] == {}
    assert f.evidence["plateau"] and f.severity in ("warning", "error")


# Falls over its start window, then flat: satisfied at its balance (VIbCReg's invariance term).
FELL_THEN_FLAT = np.where(t < 8, 2.3 - 1.5 * t / 8, 0.8)
# Falls a little, then climbs back above where it began (VIbCReg's covariance term while its
# variance term, a third loss, falls).
FELL_THEN_CLIMBED = np.where(t < 8, 1.0 - 0.4 * t / 8, 0.6 + 0.5 * (t - 8) / (STEPS - 9))
RISING = 1.0 + 0.5 * t / (STEPS - 1)


@pytest.mark.parametrize("other, stalls", [(FELL_THEN_FLAT, False), (STILL_FALLING, True)])
def test_a_stall_needs_the_other_loss_still_falling_after_its_start_window(tmp_path, other,
                                                                           stalls):
    # |g_aux| = 0.375 |g_task|, cos -0.8: the task undoes all of aux's descent (2.13, clipped),
    # aux 30% of the task's: no plateau, so a stall is the only harm left to read.
    f = _run(tmp_path, other, FELL_THEN_CLIMBED, norms=(1.0, 0.375))
    e = f.evidence
    assert e["descent_undone"] == {"task": pytest.approx(0.3), "aux": pytest.approx(1.0)}
    # aux ended above 0.9 of its start and the task below it, over the judged steps...
    assert np.median(FELL_THEN_CLIMBED[32:]) / np.median(FELL_THEN_CLIMBED[:8]) >= \
        DEFAULTS.conflict_stall_fraction
    assert e["loss_ratios"]["task"] == pytest.approx(np.median(other[32:]) / np.median(other[:8]))
    assert e["loss_ratios"]["task"] < DEFAULTS.conflict_stall_fraction
    # ...but only a task still falling after its start window took the descent from it.
    settled = np.median(other[32:]) / np.median(other[8:16])
    assert e["settled_ratios"]["task"] == pytest.approx(settled)
    assert (settled < DEFAULTS.conflict_stall_fraction) == stalls
    assert e["stalled"] == (["aux"] if stalls else []) and not e["plateau"]
    assert f.severity == ("warning" if stalls else "info")


@pytest.mark.parametrize("norms, held", [((0.375, 1.0), False), ((1.0, 1.0), True)])
def test_a_stall_is_harm_only_where_the_other_undoes_the_stalled_loss_descent(tmp_path, norms,
                                                                              held):
    # aux rises while the task falls (CDAN's transfer loss against its classifier). With
    # |g_task| = 0.375 |g_aux| the task undoes 0.8 x 0.375 = 30% of aux's descent: aux keeps
    # most of its descent on the shared layers, so its rise has another cause (a reversed
    # gradient), not this conflict.
    f = _run(tmp_path, STILL_FALLING, RISING, norms=norms)
    undone_aux = min(1.0, 0.8 * norms[0] / norms[1])
    assert f.evidence["descent_undone"]["aux"] == pytest.approx(undone_aux)
    assert (undone_aux >= DEFAULTS.conflict_undone_fraction) == held
    assert f.evidence["loss_ratios"]["aux"] >= DEFAULTS.conflict_stall_fraction
    assert f.evidence["stalled"] == (["aux"] if held else [])
    assert f.severity == ("warning" if held else "info")


@pytest.mark.parametrize("floor, stalls", [(0.01, False), (0.05, True)])
def test_a_loss_flat_at_its_floor_is_satisfied_not_stalled(tmp_path, floor, stalls):
    # aux falls from 1 to ``floor`` in its first 3 steps and stays there while the task keeps
    # falling (NSFnet's continuity residual beside its boundary loss): flat after its start,
    # it reads as stalled unless its end is at most swamping_floor_fraction (0.025) of its
    # initial level, the median of its first min_points (3) values.
    aux = np.where(t < 3, 1.0 - (1.0 - floor) * t / 3, floor)
    f = _run(tmp_path, STILL_FALLING, aux)
    initial, end = np.median(aux[:3]), np.median(aux[32:])
    assert (end <= DEFAULTS.swamping_floor_fraction * initial) == (not stalls)
    assert f.evidence["loss_ratios"]["aux"] >= DEFAULTS.conflict_stall_fraction
    assert f.evidence["descent_undone"]["aux"] == pytest.approx(0.8)
    assert f.evidence["stalled"] == (["aux"] if stalls else [])
    assert f.severity == ("warning" if stalls else "info")
