"""The diagnose stage: every finding id fires on a real training run that has the failure and
stays silent on its healthy counterpart; evidence numbers are checked against the recorded
series; thresholds load from Python and TOML."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

import runs
from gradprobe.diagnose import (FINDING_IDS, SEVERITY_ORDER, ConfigError, DiagnoseWarning,
                                Finding, PlotHint, Thresholds, diagnose, load_thresholds)
from gradprobe.diagnose.rules import RULES
from gradprobe.record import RunWriter, load_run

DOCS = Path(__file__).resolve().parents[1] / "docs" / "findings.md"


def _diagnose(run, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnoseWarning)  # no rule may fail on real runs
        return diagnose(run, **kw)


def _ids(run, **kw):
    return {f.id for f in _diagnose(run, **kw)}


def _one(run, fid, subject=None):
    found = [f for f in _diagnose(run) if f.id == fid and (subject is None or f.subject == subject)]
    assert found, f"{fid} did not fire on {run.name}: {[f.title for f in _diagnose(run)]}"
    return found[0]


# --------------------------------------------------------------- trigger / healthy pairs

# (finding id, builder of the run that has the failure, builder of its healthy counterpart)
PAIRS = [
    ("gradient-swamping", lambda: runs.two_task_regression(False),
     lambda: runs.two_task_regression(True)),
    ("constraint-neglect", lambda: runs.memorising_decoupler(True),
     lambda: runs.memorising_decoupler(False)),
    ("gradient-conflict", lambda: runs.domain_adversarial(True),
     lambda: runs.domain_adversarial(False)),
    ("representation-collapse", lambda: runs.shrinking_latent("rank1"),
     lambda: runs.shrinking_latent("healthy")),
    ("weak-contrastive-signal", lambda: runs.contrastive_batches("single", 1),
     lambda: runs.contrastive_batches("mixed", None)),
    ("prototype-stale", lambda: runs.prototype_model("never"),
     lambda: runs.prototype_model("momentum")),
    ("prototype-collapse", lambda: runs.prototype_model("batch_mean"),
     lambda: runs.prototype_model("momentum")),
    ("orthogonality-vanishing", lambda: runs.shrinking_latent("vanish"),
     lambda: runs.shrinking_latent("healthy")),
    ("latent-dependence", lambda: runs.two_latents(True), lambda: runs.two_latents(False)),
    ("sigmoid-saturation", lambda: runs.energy_logistic(50.0), lambda: runs.energy_logistic(1.0)),
    ("static-loss-weights", lambda: runs.two_task_regression(False),
     lambda: runs.two_task_regression(True)),
    ("batch-composition-mismatch", lambda: runs.contrastive_batches("mixed", 1),
     lambda: runs.contrastive_batches("single", 1)),
    ("overfitting", lambda: runs.memorise_noisy(16), lambda: runs.memorise_noisy(1024)),
    ("inert-loss", lambda: runs.wiring("detached"), lambda: runs.wiring("healthy")),
    ("non-finite", lambda: runs.wiring("nan"), lambda: runs.wiring("healthy")),
    ("probe-incomplete", lambda: runs.structured_watch(None),
     lambda: runs.structured_watch("z")),
]


def test_every_id_has_a_pair_and_a_rule():
    assert [p[0] for p in PAIRS] == list(FINDING_IDS)
    assert list(RULES) == list(FINDING_IDS)


@pytest.mark.parametrize("fid,bad,good", PAIRS, ids=[p[0] for p in PAIRS])
def test_fires_on_failure_and_not_on_healthy_counterpart(fid, bad, good):
    assert fid in _ids(bad())
    assert fid not in _ids(good())


HEALTHY = [lambda: runs.two_task_regression(True), lambda: runs.memorising_decoupler(False),
           lambda: runs.domain_adversarial(False), lambda: runs.shrinking_latent("healthy"),
           lambda: runs.prototype_model("momentum"), lambda: runs.two_latents(False),
           lambda: runs.energy_logistic(1.0), lambda: runs.memorise_noisy(1024),
           lambda: runs.wiring("healthy")]


@pytest.mark.parametrize("build", HEALTHY, ids=range(len(HEALTHY)))
def test_healthy_runs_have_no_findings_at_all(build):
    assert [f.title for f in _diagnose(build())] == []


# ------------------------------------------------------- evidence against the series

def test_swamping_evidence_matches_the_series():
    run = runs.two_task_regression(False)
    f = _one(run, "gradient-swamping", "small")
    assert f.severity == "error" and f.evidence["dominant"] == "big"
    s_small, v_small = run.series("weighted_grad_norm", "small")
    _, v_big = run.series("weighted_grad_norm", "big")
    ratio = v_small / np.maximum(v_small, v_big)
    # Every step is judged here (the big task never memorises within the run).
    assert f.evidence["judged_steps"] == len(s_small)
    assert f.evidence["median_ratio"] == pytest.approx(float(np.median(ratio)), rel=1e-9)
    assert f.evidence["median_ratio"] < 0.01  # the 100x scale gap
    assert f.steps == (int(s_small[0]), int(s_small[-1]))
    assert f.plot == PlotHint("weighted_grad_norm", names=("small", "big"), threshold=0.1,
                              ratio_to="big")


def test_constraint_neglect_evidence():
    run = runs.memorising_decoupler(True)
    f = _one(run, "constraint-neglect", "orth")
    _, task = run.series("loss", "task")
    _, orth = run.series("loss", "orth")
    k = max(3, math.ceil(0.2 * len(task)))
    assert f.evidence["task_end"] == pytest.approx(np.median(task[-k:]))
    assert f.evidence["constraint_start"] == pytest.approx(np.median(orth[:k]))
    assert f.evidence["constraint_ratio"] == pytest.approx(np.median(orth[-k:]) /
                                                           np.median(orth[:k]))
    assert f.evidence["constraint_ratio"] > 1 and f.severity == "error"  # it rose


def test_conflict_evidence():
    run = runs.domain_adversarial(True)
    f = _one(run, "gradient-conflict", "task|adv")
    s, cos = run.series("grad_cosine", "task|adv")
    assert f.evidence["judged_steps"] <= len(s)
    assert f.evidence["median_cosine"] < -0.2
    assert f.evidence["median_cosine"] == pytest.approx(
        np.median(np.array(f.evidence["cosine"]["values"])), abs=0.1)
    assert float(np.median(cos)) < 0


def test_collapse_and_vanishing_are_told_apart():
    rank1, vanish = runs.shrinking_latent("rank1"), runs.shrinking_latent("vanish")
    f = _one(rank1, "representation-collapse", "z")
    _, r = rank1.series("effective_rank", "z")
    assert f.evidence["rank_end"] == pytest.approx(np.median(r[-max(3, math.ceil(0.2 * len(r))):]))
    assert f.evidence["rank_end"] < 1.5 and f.severity == "error"
    assert "orthogonality-vanishing" not in _ids(rank1)
    v = _one(vanish, "orthogonality-vanishing", "z")
    _, norm = vanish.series("latent_norm", "z")
    assert v.evidence["ratio"] < 0.1
    assert v.evidence["norm_end"] == pytest.approx(np.median(norm[-max(3, math.ceil(0.2 * len(norm))):]))
    assert v.evidence["orthogonality_gradient_lost"] == ["orth"]
    # the unnormalised orthogonality loss is named as well
    assert any(f.subject == "orth" for f in _diagnose(vanish) if f.id == "orthogonality-vanishing")


def test_prototype_evidence():
    never = _one(runs.prototype_model("never"), "prototype-stale", "proto")
    assert never.evidence["never_moved"] and never.evidence["still_share"] == 1.0
    run = runs.prototype_model("momentum")
    _, drift = run.series("prototype_drift", "proto")
    assert np.all(drift > 1e-6)  # the healthy update moves them at every probe step
    col = _one(runs.prototype_model("batch_mean"), "prototype-collapse", "proto")
    assert col.evidence["mean_distance_end"] < 0.2 * col.evidence["mean_distance_peak"]


def test_saturation_evidence():
    run = runs.energy_logistic(50.0)
    f = _one(run, "sigmoid-saturation", "energy")
    _, sat = run.series("saturated_fraction", "energy")
    assert f.evidence["median_saturated_fraction"] == pytest.approx(np.median(sat))
    assert f.evidence["temperature_fixed"] is True
    assert f.evidence["median_energy_scale_ratio"] > 10


def test_overfitting_evidence():
    run = runs.memorise_noisy(16)
    f = _one(run, "overfitting", "val_task")
    s, val = run.series("logged", "val_task")
    assert f.evidence["val_min"] >= float(np.min(val)) - 1e-12
    assert f.evidence["val_end"] > f.evidence["val_min"] * 1.1
    assert f.evidence["training"] == "task"
    assert f.steps[1] == int(s[-1])


def test_a_rising_validation_score_is_not_overfitting():
    run = runs.memorise_noisy(1024)
    steps, accuracy = run.series("logged", "val_accuracy")
    # Learning raises the validation accuracy well above its worst value...
    assert accuracy[-3:].mean() > accuracy.min() * 1.1
    # ...which is progress, not a validation loss rising.
    assert not [f for f in diagnose(run) if f.id == "overfitting"]


def test_wiring_evidence():
    inert = _one(runs.wiring("detached"), "inert-loss", "aux")
    assert inert.severity == "error" and inert.evidence["event"] == "inert_loss"
    nan = runs.wiring("nan")
    f = _one(nan, "non-finite", "aux")
    s, v = nan.series("loss", "aux")
    assert f.steps[0] == int(s[~np.isfinite(v)][0]) == 20


def test_batch_and_contrastive_evidence():
    f = _one(runs.contrastive_batches("mixed", 1), "batch-composition-mismatch")
    _, gpb = runs.contrastive_batches("mixed", 1).series("groups_per_batch", "batch")
    assert f.evidence["declared"] == 1
    assert f.evidence["median_observed"] == pytest.approx(np.median(gpb))
    w = _one(runs.contrastive_batches("single", 1), "weak-contrastive-signal", "cont")
    assert w.evidence["median_same_group_share"] == 1.0


def test_static_weights_names_the_related_finding():
    f = _one(runs.two_task_regression(False), "static-loss-weights")
    assert f.evidence["weights"] == {"small": 1.0}
    assert {"id": "gradient-swamping", "subject": "small"}.items() <= \
        f.evidence["related_findings"][0].items()


# ------------------------------------------------------------------------ public API

def test_findings_are_sorted_json_and_progress_is_reported():
    run = runs.prototype_model("never")
    calls = []
    found = _diagnose(run, progress=lambda i, n, rid: calls.append((i, n, rid)))
    assert calls == [(i + 1, len(FINDING_IDS), rid) for i, rid in enumerate(FINDING_IDS)]
    keys = [(SEVERITY_ORDER[f.severity], f.id) for f in found]
    assert keys == sorted(keys)
    for f in found:
        d = f.to_dict()
        assert list(d) == ["id", "severity", "title", "subject", "key_number", "evidence",
                           "why", "remedy", "steps"]
        json.dumps(d, allow_nan=False)
        assert "\n" not in f.title
        # Written for any multi-loss model: record 22 is cited as an example, never as the
        # reader's model, and no text points at the record's own numbered next steps.
        assert not f.why.lower().startswith("record") and "next step" not in f.remedy
        assert "gradprobe." in f.remedy or f.id == "prototype-stale"  # a loop fix, no piece
        assert d["steps"] is None or d["steps"][0] <= d["steps"][1]


def test_thresholds_override_changes_the_verdict():
    run = runs.two_task_regression(False)
    assert "gradient-swamping" in _ids(run)
    assert "gradient-swamping" not in _ids(run, thresholds=Thresholds(swamping_ratio=0.001))
    assert "gradient-swamping" not in _ids(
        run, thresholds=Thresholds.from_mapping({"exempt_roles": ["task"]}))


def test_unknown_or_bad_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown threshold 'swamp_ratio'.*swamping_ratio"):
        Thresholds.from_mapping({"swamp_ratio": 0.1})
    path = tmp_path / "t.toml"
    path.write_text("swamping_ratio = 0.05\nnot_a_key = 1\n")
    with pytest.raises(ConfigError) as info:
        load_thresholds(path)
    assert "'not_a_key'" in str(info.value) and "\n" not in str(info.value)
    path.write_text("swamping_ratio = 'high'\n")
    with pytest.raises(ConfigError, match="must be a number"):
        load_thresholds(path)
    path.write_text("exempt_roles = ['nonsense']\n")
    with pytest.raises(ConfigError, match="unknown role"):
        load_thresholds(path)
    path.write_text("swamping_ratio = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_thresholds(path)
    with pytest.raises(ConfigError, match="no such"):
        load_thresholds(tmp_path / "missing.toml")
    assert issubclass(ConfigError, ValueError)


def test_toml_overrides_and_the_documented_example_loads(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("swamping_ratio = 0.05\nmin_points = 4\n")
    th = load_thresholds(path)
    assert th.swamping_ratio == 0.05 and th.min_points == 4
    assert th.conflict_share == Thresholds().conflict_share
    text = DOCS.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks, "docs/findings.md has no TOML example"
    for i, block in enumerate(blocks):
        p = tmp_path / f"doc{i}.toml"
        p.write_text(block)
        load_thresholds(p)
    for key in Thresholds.known_keys():  # every threshold is documented
        assert f"`{key}`" in text, key


# --------------------------------------------------------- synthetic edge cases

def _synthetic(tmp_path, rows, losses=("task", "aux"), **meta):
    path = tmp_path / f"syn{len(list(tmp_path.glob('syn*.gprobe')))}.gprobe"  # a fresh file
    w = RunWriter(path)
    w.set_meta(losses=list(losses), task=losses[0], roles={l: "other" for l in losses[1:]} |
               {losses[0]: "task"}, every=1, expect_groups_per_batch=None, **meta)
    for step, scalars in rows:
        w.write_step(step, scalars)
    w.close()
    return load_run(path)


def test_missing_quantities_and_nan_give_no_findings_and_no_crash(tmp_path):
    rows = [(s, {("loss", "task"): float("nan") if s == 3 else 1.0 / (s + 1)}) for s in range(20)]
    run = _synthetic(tmp_path, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnoseWarning)
        found = diagnose(run)
    # a NaN loss (stored as NULL) is reported as non-finite and nothing else crashes
    assert [f.id for f in found] == ["non-finite"] and found[0].steps == (3, 3)


def test_a_single_spike_is_not_persistent(tmp_path):
    rows = []
    for s in range(30):
        aux = 0.001 if s == 10 else 1.0  # one swamped step among 30
        rows.append((s, {("loss", "task"): 1.0, ("loss", "aux"): 1.0,
                         ("grad_norm", "task"): 1.0, ("grad_norm", "aux"): aux,
                         ("weighted_grad_norm", "task"): 1.0, ("weighted_grad_norm", "aux"): aux,
                         ("weight", "task"): 1.0, ("weight", "aux"): 1.0}))
    assert _ids(_synthetic(tmp_path, rows)) == set()


def test_swamping_is_not_judged_after_the_task_memorised(tmp_path):
    # The task learns for 10 steps, then memorises: its gradient vanishes and the ratios
    # invert. Only the learning phase is judged, and there 'aux' was not swamped.
    rows = []
    for s in range(40):
        learning = s < 10
        task_loss = 1.0 - 0.05 * s if learning else 1e-4
        t_grad = 1.0 if learning else 1e-4
        rows.append((s, {("loss", "task"): task_loss, ("loss", "aux"): 1.0,
                         ("grad_norm", "task"): t_grad, ("grad_norm", "aux"): 0.5,
                         ("weighted_grad_norm", "task"): t_grad,
                         ("weighted_grad_norm", "aux"): 0.5 if learning else 1e-7,
                         ("weight", "task"): 1.0, ("weight", "aux"): 1.0}))
    assert "gradient-swamping" not in _ids(_synthetic(tmp_path, rows))


@pytest.mark.parametrize("dominant_steps", [24, 12])
def test_the_steps_a_loss_dominates_count_as_not_swamped(tmp_path, dominant_steps):
    # 'aux' leads the shared gradient for its first steps (weighted norm 2 against the task's
    # 1), then is annealed to 0.05 and 0.002 of it, alternately. The steps it leads are judged
    # too, with ratio 1: swamped on 16 of 40 steps is not persistent (min_share 0.5); on 28 of
    # 40 it is, and how swamped is read on the held steps.
    aux = [2.0 if s < dominant_steps else (0.05, 0.002)[s % 2] for s in range(40)]
    rows = [(s, {("loss", "task"): 1.0 - 0.01 * s, ("loss", "aux"): 1.0,
                 ("grad_norm", "task"): 1.0, ("grad_norm", "aux"): a,
                 ("weighted_grad_norm", "task"): 1.0, ("weighted_grad_norm", "aux"): a,
                 ("weight", "task"): 1.0, ("weight", "aux"): 1.0}) for s, a in enumerate(aux)]
    found = [f for f in _diagnose(_synthetic(tmp_path, rows)) if f.id == "gradient-swamping"]
    ratio = np.minimum(np.array(aux), 1.0)  # aux / max(aux, task) with the task's norm 1
    held = ratio < Thresholds().swamping_ratio
    if held.mean() < Thresholds().min_share:
        assert found == []
        return
    (f,) = found
    assert f.subject == "aux" and f.evidence["judged_steps"] == 40
    assert f.evidence["held_share"] == pytest.approx(held.mean())
    assert f.evidence["median_ratio"] == pytest.approx(float(np.median(ratio[held])))
    assert f.evidence["median_ratio_judged"] == pytest.approx(float(np.median(ratio)))
    assert f.severity == ("error" if np.median(ratio[held]) < Thresholds().swamping_error_ratio
                          else "warning")


def test_finding_validates_its_id():
    with pytest.raises(ValueError):
        Finding(id="nope", severity="error", title="t", subject="s", key_number="k",
                evidence={}, why="w", remedy="r", steps=None, plot=None)


# ------------------------------------- threshold roles: each number does its own job

def test_swamping_skips_a_loss_that_has_learned_what_it_can(tmp_path):
    # 'aux' falls to 3% of its start by step 10 and its gradient to 3% of the task's: it has
    # nothing left to learn, so a small ratio is no swamping (learned_fraction 5%); 3% is
    # above swamping_floor_fraction, so the floor alone does not settle it.
    assert Thresholds().swamping_floor_fraction < 0.03 < Thresholds().learned_fraction
    rows = []
    for s in range(40):
        aux = 1.0 if s < 10 else 0.03
        rows.append((s, {("loss", "task"): 1.0 - 0.01 * s, ("loss", "aux"): aux,
                         ("grad_norm", "task"): 1.0, ("grad_norm", "aux"): aux,
                         ("weighted_grad_norm", "task"): 1.0, ("weighted_grad_norm", "aux"): aux,
                         ("weight", "task"): 1.0, ("weight", "aux"): 1.0}))
    run = _synthetic(tmp_path, rows)
    assert "gradient-swamping" not in _ids(run)
    # The same run judged as if nothing were ever learned: the small ratio is swamping.
    assert "gradient-swamping" in _ids(run, thresholds=Thresholds(learned_fraction=0.0))


def _saturation_run(tmp_path, saturated, wrong, wrong_class=None):
    rows = [(s, {("loss", "task"): 1.0, ("saturated_fraction", "out"): saturated,
                 **({("saturated_wrong_fraction", "out"): wrong} if wrong is not None else {}),
                 **({("saturated_wrong_class_fraction", "out"): wrong_class}
                    if wrong_class is not None else {})})
            for s in range(20)]
    return _synthetic(tmp_path, rows)


@pytest.mark.parametrize("saturated,wrong,wrong_class,severity", [
    (0.4, 0.1, None, "warning"),   # harmful, less than half saturated
    (0.6, 0.1, None, "error"),     # harmful, most inputs saturated
    (0.3, 0.0, None, "info"),      # saturated, but towards the targets
    (0.3, None, None, "info"),     # no target observed: harm not judged
    (0.2, 0.0, None, None),        # below saturation_fraction: nothing
    (0.9, 0.005, 0.9, "error"),    # a rare class (1/200 of the inputs) 90% wrong: harmful
    (0.9, 0.005, 0.12, "info"),    # the hard eighth of a rare class wrong: towards targets
])
def test_saturation_fractions_each_do_their_own_job(tmp_path, saturated, wrong, wrong_class,
                                                     severity):
    found = [f for f in _diagnose(_saturation_run(tmp_path, saturated, wrong, wrong_class))
             if f.id == "sigmoid-saturation"]
    assert [f.severity for f in found] == ([severity] if severity else [])
    if wrong_class is not None:
        assert found[0].evidence["saturated_wrong_class_fraction_end"] == \
            pytest.approx(wrong_class)


def _rank_run(tmp_path, peak, end, isotropic, classes=None):
    rows = []
    for s in range(20):
        rank = peak if s < 10 else end
        scalars = {("loss", "task"): 1.0, ("rankme_centred", "z"): rank,
                   ("effective_rank_isotropic", "z"): isotropic, ("latent_dim", "z"): 64.0}
        if classes:
            scalars[("latent_classes", "z")] = float(classes)
        rows.append((s, scalars))
    return _synthetic(tmp_path, rows)


@pytest.mark.parametrize("peak,end,isotropic,fires", [
    (8.0, 3.0, 40.0, True),    # 3 <= min(0.5 x 8, 0.15 x 40) = 4
    (8.0, 4.5, 40.0, False),   # above half its peak
    (40.0, 7.0, 40.0, False),  # below half its peak, above 0.15 of the isotropic rank (6)
    (40.0, 5.0, 40.0, True),   # below both
])
def test_collapse_needs_both_the_peak_and_the_isotropic_fraction(tmp_path, peak, end, isotropic,
                                                                 fires):
    th = Thresholds()
    assert (th.collapse_peak_fraction, th.collapse_rank_fraction) == (0.5, 0.15)
    found = [f for f in _diagnose(_rank_run(tmp_path, peak, end, isotropic))
             if f.id == "representation-collapse"]
    assert bool(found) == fires
    if found:
        assert found[0].evidence["rank_limit"] == min(0.5 * peak, 0.15 * isotropic)


def test_a_rank_near_classes_minus_one_is_not_collapse(tmp_path):
    # 5 <= 0.15 x 40 = 6: collapse, unless the latent has 10 classes (limit 0.5 x 9 = 4.5).
    assert Thresholds().collapse_class_fraction == 0.5
    assert "representation-collapse" in _ids(_rank_run(tmp_path, 40.0, 5.0, 40.0))
    assert "representation-collapse" not in _ids(_rank_run(tmp_path, 40.0, 5.0, 40.0, classes=10))
    assert "representation-collapse" in _ids(_rank_run(tmp_path, 40.0, 2.0, 40.0, classes=10))


def test_weak_contrastive_signal_from_the_loss_at_chance_alone(tmp_path):
    # Negatives from other groups (same-group share 0.25), but the loss sits at chance and the
    # hardest negative beats the positive: the signal is weak for another reason (positives
    # not paired with their anchors, say).
    rows = [(s, {("loss", "task"): 1.0, ("contrastive_loss_ratio", "cont"): 0.97,
                 ("contrastive_gap", "cont"): -0.4, ("contrastive_same_group_share", "cont"): 0.25})
            for s in range(20)]
    found = [f for f in _diagnose(_synthetic(tmp_path, rows)) if f.id == "weak-contrastive-signal"]
    assert len(found) == 1 and "gap is -0.4" in found[0].title
    assert found[0].evidence["loss_ratio_end"] == pytest.approx(0.97)
    rows = [(s, {**r, ("contrastive_gap", "cont"): 0.5}) for s, r in rows]  # positives win
    assert "weak-contrastive-signal" not in _ids(_synthetic(tmp_path, rows))


def test_a_fixed_weight_is_one_definition_for_every_stage():
    """``is_fixed_weight``: range (max - min) at most ``tolerance`` times the largest |w|."""
    from gradprobe.diagnose import FIXED_WEIGHT_TOLERANCE, is_fixed_weight
    assert FIXED_WEIGHT_TOLERANCE == Thresholds().static_weight_tolerance == 1e-9
    assert is_fixed_weight(np.full(50, 0.05))
    assert is_fixed_weight(np.array([2.0, 2.0 + 1e-10, np.nan, 2.0]))  # rounding, NaN ignored
    assert not is_fixed_weight(np.array([2.0, 2.0 + 1e-6]))
    assert is_fixed_weight(np.array([2.0, 2.0 + 1e-6]), tolerance=1e-6)
    assert is_fixed_weight(np.zeros(5))  # fixed at 0 (static-loss-weights skips a weight of 0)
    assert not is_fixed_weight(np.array([np.nan, np.inf]))
    assert not is_fixed_weight(np.linspace(0.0, 1.0, 10))  # a ramp
    # the report's former test (every value within rtol 1e-9 of the first), away from the edge
    rng = np.random.default_rng(0)
    for _ in range(200):
        spread = rng.choice([0.0, 1e-12, 1e-6, 1e-3]) * rng.uniform(0.5, 1.0, 20)
        w = rng.uniform(-3, 3) * (1 + spread)
        assert is_fixed_weight(w) == np.allclose(w, w[0], rtol=1e-9, atol=0)


def test_the_plot_hint_is_typed_and_left_out_of_the_json():
    from gradprobe.diagnose import SEVERITIES
    hint = {"quantity": "grad_cosine", "names": ["a|b"], "threshold": 0, "ratio_to": None}
    f = Finding(id="gradient-conflict", severity="info", title="t", subject="a|b",
                key_number="cos -0.5", evidence={}, why="w", remedy="r", steps=(0, 5), plot=hint)
    assert f.plot == PlotHint("grad_cosine", names=("a|b",), threshold=0.0)
    assert f.plot.to_dict() == {**hint, "threshold": 0.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.plot.threshold = 1.0
    assert "plot" not in f.to_dict() and json.loads(json.dumps(f.to_dict()))["steps"] == [0, 5]
    assert list(SEVERITY_ORDER) == list(SEVERITIES) == ["error", "warning", "info"]
    assert sorted(SEVERITY_ORDER.values()) == [0, 1, 2]


def test_batches_holding_few_of_the_declared_groups_mismatch():
    """Two of four declared groups per batch (a class-sorted loader read in order) is a
    mismatch; random batches that hold all four are not."""
    pairs = runs.contrastive_batches("pairs", 4)
    _, gpb = pairs.series("groups_per_batch", "batch")
    assert np.median(gpb) <= 0.5 * 4 < 4 and np.max(gpb) <= 4  # neither of the older tests
    f = _one(pairs, "batch-composition-mismatch")
    assert f.evidence["declared"] == 4 and f.severity == "warning"
    assert f.evidence["median_observed"] == pytest.approx(np.median(gpb))
    _, mixed = runs.contrastive_batches("mixed", 4).series("groups_per_batch", "batch")
    assert np.min(mixed) > 0.5 * 4
    assert "batch-composition-mismatch" not in _ids(runs.contrastive_batches("mixed", 4))


def test_a_normalised_loss_that_only_correlates_with_the_norms_is_not_called_unnormalised(tmp_path):
    """Rule (b) of orthogonality-vanishing needs the loss proportional to |z_a|^2 |z_b|^2,
    not only correlated with it: the least-squares slope, checked against scipy."""
    steps = np.arange(60)
    norm_a = np.geomspace(1.0, 6.0, len(steps))  # the latents grow: the product spans 1,296x
    norm_b = np.geomspace(1.0, 6.0, len(steps))
    scale = (norm_a * norm_b) ** 2
    found = {}
    for kind, loss in (("normalised", 0.02 * scale ** 0.15),  # rises with the dependence
                       ("raw", 0.02 * scale)):
        path = tmp_path / f"{kind}.gprobe"
        writer = RunWriter(path)
        writer.set_meta(losses=["task", "orth"], task="task",
                        roles={"task": "task", "orth": "orthogonality"}, every=1,
                        expect_groups_per_batch=None)
        for s in steps:
            writer.write_step(int(s), {("loss", "task"): 1.0 / (1 + s), ("loss", "orth"): loss[s],
                                       ("latent_norm", "a"): norm_a[s],
                                       ("latent_norm", "b"): norm_b[s]}, {})
        writer.close()
        slope = scipy.stats.linregress(np.log(scale), np.log(loss)).slope
        found[kind] = ([f for f in diagnose(load_run(path)) if f.id == "orthogonality-vanishing"
                        and f.subject == "orth"], slope)
    (normalised, slope_n), (raw, slope_r) = found["normalised"], found["raw"]
    assert slope_n == pytest.approx(0.15) and normalised == []
    assert slope_r == pytest.approx(1.0) and len(raw) == 1
    assert raw[0].evidence["log_slope"] == pytest.approx(slope_r, rel=1e-9)
    assert raw[0].evidence["log_correlation"] == pytest.approx(1.0)
