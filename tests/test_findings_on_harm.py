"""Findings judged on harm, on small real training runs: a conflict or a saturation that holds
nothing back is a note; collapse is judged on centred measures, active units and the class
count; remedies and static weights follow the losses that suffer."""

from __future__ import annotations

import math

import numpy as np
import pytest

import runs
from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.diagnose.rules import RULES


def _by_id(run, fid):
    return [f for f in diagnose(run) if f.id == fid]


def _window_median(values, first):
    k = max(3, math.ceil(0.2 * len(values)))
    return float(np.median(values[:k] if first else values[-k:]))


# ------------------------------------------------------------------------ gradient-conflict

def test_a_conflict_that_holds_no_loss_back_is_a_note():
    # Gradient reversal: the adversary's gradient opposes the task's (cos < 0), while the task
    # keeps learning and the adversary's not falling is its purpose.
    (f,) = _by_id(runs.domain_adversarial(True), "gradient-conflict")
    assert f.severity == "info" and f.evidence["median_cosine"] < -0.2
    assert f.evidence["suffering"] == [] and not f.evidence["cancelled"]
    assert f.evidence["loss_ratios"]["task"] < 0.9


def test_a_conflict_that_holds_a_loss_back_is_an_error_when_tragic():
    run = runs.opposed_targets()
    (f,) = _by_id(run, "gradient-conflict")
    steps, task = run.series("loss", "task")
    _, aux = run.series("loss", "aux")
    # The evidence against the recorded series: the task rose while 'aux' fell...
    assert f.evidence["loss_ratios"]["task"] == pytest.approx(
        _window_median(task, False) / _window_median(task, True))
    assert f.evidence["loss_ratios"]["task"] > 1.0 > f.evidence["loss_ratios"]["aux"]
    # ...within the start window (60 probe steps: 12 a window); after it 'aux' no longer
    # falls, so the task is no stall but held with 'aux' at their balance, each undoing most
    # of the other's descent: a compromise plateau, the task (declared) settled above where
    # it began.
    k = math.ceil(0.2 * len(task))
    for name, values in (("task", task), ("aux", aux)):
        settled = float(np.median(values[-k:]) / np.median(values[k:2 * k]))
        assert f.evidence["settled_ratios"][name] == pytest.approx(settled)
        assert settled >= Thresholds().conflict_stall_fraction
        assert f.evidence["descent_undone"][name] >= Thresholds().conflict_undone_fraction
    assert f.evidence["stalled"] == [] and f.evidence["plateau"]
    assert f.evidence["suffering"] == ["task", "aux"]
    # ...the weighted gradients cancel (combined norm against the sum of the parts)...
    _, combined = run.series("combined_grad_norm", "shared")
    parts = sum(run.series("weighted_grad_norm", n)[1] for n in ("task", "aux"))
    assert f.evidence["cancel_ratio"] == pytest.approx(float(np.median(combined / parts)))
    # ...and the conflict is tragic: cos <= -magnitude similarity on most steps.
    _, cos = run.series("grad_cosine", "task|aux")
    _, mag = run.series("magnitude_similarity", "task|aux")
    assert f.evidence["tragic_share"] == pytest.approx(float(np.mean(cos <= -mag)))
    assert f.evidence["tragic_share"] >= 0.5 and f.severity == "error"
    # Not tragic enough by the threshold: the same harm is a warning.
    (w,) = [g for g in diagnose(run, Thresholds(conflict_tragic_share=1.0))
            if g.id == "gradient-conflict"]
    assert w.severity == "warning"


def test_a_first_loss_pushed_above_where_it_began_needs_its_declaration():
    """The same training, the task only the first loss: a loss that settled above where it
    began while the other fell is a task held back or a term of one objective at its
    equilibrium (CorInfoMax's log-det term), which the run cannot tell: info, with the line
    that judges it as a task."""
    run = runs.opposed_targets(declared=False)
    (f,) = _by_id(run, "gradient-conflict")
    _, task = run.series("loss", "task")
    k = math.ceil(0.2 * len(task))
    assert np.median(task[k:2 * k]) > np.max(task[:Thresholds().min_points])
    assert f.evidence["settled_above_start"] == ["task"] and not f.evidence["plateau"]
    assert f.severity == "info"
    assert 'judge it as a task: Probe(..., roles={"task": "task"})' in f.title


# --------------------------------------------------------------------- static-loss-weights

def test_static_weights_name_the_swamped_loss_not_the_dominant_one():
    run = runs.left_right(1e-3)
    (swamp,) = _by_id(run, "gradient-swamping")
    assert swamp.subject == "L" and swamp.evidence["dominant"] == "R"
    (f,) = _by_id(run, "static-loss-weights")
    assert f.evidence["weights"] == {"L": 0.001}  # the task's own weight, swamped
    assert f.subject == "L" and "L=0.001" in f.title and "'R' (weight 1)" in f.title


def test_static_weights_read_the_earlier_findings_instead_of_judging_again():
    run = runs.left_right(1e-3)
    rule = RULES["static-loss-weights"]
    assert rule(run, Thresholds(), ()) == []  # no earlier finding: nothing to explain
    earlier = [f for f in diagnose(run) if f.id == "gradient-swamping"]
    assert [f.subject for f in rule(run, Thresholds(), tuple(earlier))] == ["L"]
    assert list(RULES).index("static-loss-weights") > list(RULES).index("gradient-conflict")


def test_a_harmless_conflict_gives_no_static_weight_finding():
    assert _by_id(runs.domain_adversarial(True), "static-loss-weights") == []


# ----------------------------------------------------------------------- sigmoid-saturation

def test_saturation_on_the_wrong_side_of_the_targets_under_mse_is_harm():
    run = runs.sigmoid_head("mse")
    (f,) = _by_id(run, "sigmoid-saturation")
    _, wrong = run.series("saturated_wrong_fraction", "out")
    _, sat = run.series("saturated_fraction", "out")
    assert f.evidence["median_saturated_wrong_fraction"] == pytest.approx(np.median(wrong))
    assert np.median(wrong) > 0.2  # three of six outputs stuck at "off", half of them wrong
    assert f.severity == ("error" if np.median(sat) >= 0.5 else "warning")


def test_saturation_towards_the_targets_under_cross_entropy_is_a_note():
    run = runs.sigmoid_head("bce")
    _, wrong = run.series("saturated_wrong_fraction", "out")
    assert wrong[0] > 0.2 and wrong[-1] == 0.0  # cross-entropy corrected the wrong outputs
    (f,) = _by_id(run, "sigmoid-saturation")
    assert f.severity == "info" and "towards its targets" in f.title
    assert _by_id(runs.energy_logistic(50.0), "sigmoid-saturation")[0].severity == "info"


def test_a_rare_class_saturated_on_the_wrong_side_is_harm_however_rare():
    """A pairwise sigmoid loss with its temperature frozen at 1000: most positives end
    saturated below 0, while the share over all 16,384 logits stays under 1%."""
    run = runs.pairwise_sigmoid(frozen=True)
    _, pooled = run.series("saturated_wrong_fraction", "logits")
    _, by_class = run.series("saturated_wrong_class_fraction", "logits")
    th = Thresholds()
    # The end window: the last window_share of the probe steps, at least min_points.
    k = max(th.min_points, math.ceil(th.window_share * len(by_class)))
    assert np.median(pooled[-k:]) < th.saturation_wrong_fraction  # at most 1/128 = 0.8%
    (f,) = _by_id(run, "sigmoid-saturation")
    assert f.evidence["saturated_wrong_class_fraction_end"] == pytest.approx(
        np.median(by_class[-k:]))
    assert f.evidence["saturated_wrong_class_fraction_end"] >= th.saturation_wrong_class_fraction
    assert f.severity == "error" and "one target class" in f.title
    # A log-sigmoid loss already: the fixed temperature, as recorded, leads the remedy.
    _, temperature = run.series("temperature", "logits")
    assert np.ptp(temperature) == 0
    assert f.remedy.startswith("Learn the temperature, fixed here at ")
    stated = float(f.remedy.removeprefix("Learn the temperature, fixed here at ").split(",")[0])
    assert stated == pytest.approx(temperature[0], rel=1e-3)


def test_a_learnt_temperature_saturates_towards_its_targets():
    run = runs.pairwise_sigmoid(frozen=False)
    _, by_class = run.series("saturated_wrong_class_fraction", "logits")
    assert by_class[-1] < Thresholds().saturation_wrong_class_fraction
    (f,) = _by_id(run, "sigmoid-saturation")
    assert f.severity == "info" and "towards its targets" in f.title


# -------------------------------------------------------------- representation-collapse

def test_a_drifting_mean_is_not_collapse():
    run = runs.shrinking_latent("offset")
    _, uncentred = run.series("effective_rank", "z")
    _, iso = run.series("effective_rank_isotropic", "z")
    # The uncentred RankMe falls below a quarter of the isotropic rank (the old rule fired)...
    assert _window_median(uncentred, False) < 0.25 * iso[0]
    # ...the spread does not shrink, so it is not collapse.
    _, variance = run.series("total_variance", "z")
    assert variance[-1] > variance[0]
    collapsed = {f.subject: f for f in _by_id(run, "representation-collapse")}
    # The normalised rows concentrate around the mean (SimSiam's indicator reads collapse):
    # a note with both numbers, never an alarm.
    _, std = run.series("normalized_std", "z")
    assert _window_median(std, False) * np.sqrt(run.series("latent_dim", "z")[1][0]) < 0.65
    drift = collapsed["z"]
    assert drift.severity == "info" and drift.evidence["kind"] == "mean-dominated"
    assert "normalised std" in drift.title and "total variance" in drift.title
    # Compared by direction (as a cosine loss compares them: the docs say to watch the
    # normalised latent then), the same rows do collapse to one point.
    f = collapsed["z_dir"]
    assert f.evidence["point_condition"] and f.severity == "error"
    assert f.evidence["variance_end"] <= 0.5 * f.evidence["variance_peak"]


def test_posterior_collapse_is_found_by_active_units_and_names_kl_remedies():
    collapsed, healthy = runs.vae(50.0), runs.vae(1.0)
    assert collapsed.roles["kld"] == "kl"
    (f,) = _by_id(collapsed, "representation-collapse")
    _, units = collapsed.series("active_units", "mu")
    assert f.subject == "mu" and f.evidence["active_end"] == _window_median(units, False) == 0
    assert f.severity == "error" and "KL weight" in f.remedy and "negatives" not in f.remedy
    # The centred rank alone would not have seen it: the collapsed mean is isotropic noise.
    assert not f.evidence["rank_condition"]
    assert _by_id(healthy, "representation-collapse") == []
    assert _window_median(healthy.series("active_units", "mu")[1], False) >= 4


def _rank_truth(run):
    """(numpy RankMe before training, after, of an isotropic sample of the same shape)."""
    _, ranks = run.series("logged", "rankme_numpy")
    _, iso = run.series("logged", "rankme_numpy_isotropic")
    return float(ranks[0]), float(ranks[-1]), float(iso[-1])


def test_neural_collapse_is_not_reported_when_the_labels_are_observed():
    without, with_labels = runs.classifier(False), runs.classifier(True)
    _, classes = with_labels.series("latent_classes", "features")
    assert set(classes) == {10.0}
    th = Thresholds()
    # Measured with numpy on a fixed batch: the features fall from rank ~127 to ~22, below
    # collapse_rank_fraction (0.15) of the isotropic rank (~205), and stay above the
    # classes - 1 = 9 directions their class means span (neural collapse). So the rank alone
    # reads as collapse at the defaults, and only the labels tell it apart.
    for run in (without, with_labels):
        start, end, iso = _rank_truth(run)
        assert 9 <= end <= 0.8 * th.collapse_rank_fraction * iso and end < 0.5 * start
    collapsed = [f for f in diagnose(without) if f.id == "representation-collapse"]
    assert [f.subject for f in collapsed] == ["features"]
    assert collapsed[0].evidence["rank_condition"]
    assert [f for f in diagnose(with_labels) if f.id == "representation-collapse"] == []


# SimSiam without its stop-gradient on data spanning 4 of 32 dimensions, with a 64-dim output:
# a dimensional collapse clear at the defaults.
CLEAR = {"span": 4, "out": 64}


def test_simsiam_collapse_points_to_the_stop_gradient_not_to_negatives():
    th = Thresholds()
    start, end, iso = _rank_truth(runs.simsiam(False, **CLEAR))
    _, healthy_end, _ = _rank_truth(runs.simsiam(True, **CLEAR))
    # numpy: rank ~18 -> ~5 (the stop-gradient run keeps ~14), isotropic ~59.
    assert end <= 0.8 * th.collapse_rank_fraction * iso and end < 0.5 * healthy_end
    assert end < 0.5 * start
    (f,) = [f for f in diagnose(runs.simsiam(False, **CLEAR))
            if f.id == "representation-collapse"]
    assert f.evidence["rank_condition"]
    assert "stop-gradient" in f.remedy and "negatives (other groups" not in f.remedy
    assert [f for f in diagnose(runs.simsiam(True, **CLEAR))
            if f.id == "representation-collapse"] == []


def test_a_32_dim_simsiam_collapse_is_real():
    start, end, iso = _rank_truth(runs.simsiam(False))
    _, healthy_end, _ = _rank_truth(runs.simsiam(True))
    # numpy: rank 21.0 -> 5.4, 0.41 of the stop-gradient run's 13.0; isotropic 30.9.
    assert end < 0.5 * healthy_end and end < 0.5 * start
    assert end > Thresholds().collapse_rank_fraction * iso  # the reason the default misses it


@pytest.mark.xfail(strict=True, reason=(
    "the default misses a real dimensional collapse: without the stop-gradient the 32-dim "
    "SimSiam's recorded centred RankMe falls from 22.8 to 5.66 (numpy 21.0 -> 5.4; the "
    "stop-gradient run ends at 13.0), but that is 0.183 of the isotropic rank 30.9, above "
    "collapse_rank_fraction 0.15"))
def test_the_default_finds_the_32_dim_simsiam_collapse():
    assert "representation-collapse" in {f.id for f in diagnose(runs.simsiam(False))}


def test_a_contrastive_collapse_points_to_negatives():
    from gradprobe.diagnose.rules.representations import _collapse_remedy
    remedy = _collapse_remedy({"task": "task", "cont": "contrastive"}, posterior=False)
    assert "negatives" in remedy and "stop-gradient" not in remedy
