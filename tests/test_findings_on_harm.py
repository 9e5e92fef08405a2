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


def test_a_conflict_that_stalls_a_loss_is_an_error_when_tragic():
    run = runs.opposed_targets()
    (f,) = _by_id(run, "gradient-conflict")
    steps, task = run.series("loss", "task")
    _, aux = run.series("loss", "aux")
    # The evidence against the recorded series: the task rose while 'aux' fell...
    assert f.evidence["loss_ratios"]["task"] == pytest.approx(
        _window_median(task, False) / _window_median(task, True))
    assert f.evidence["loss_ratios"]["task"] > 1.0 > f.evidence["loss_ratios"]["aux"]
    assert f.evidence["stalled"] == ["task"]
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
    assert "z" not in collapsed
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


def test_neural_collapse_is_not_reported_when_the_labels_are_observed():
    without, with_labels = runs.classifier(False), runs.classifier(True)
    _, classes = with_labels.series("latent_classes", "features")
    assert set(classes) == {10.0}
    # The features end at 0.18 of the isotropic rank; the labels must be what tells neural
    # collapse apart at a fraction where the rank alone reads as collapse (a quarter; the
    # corpus-calibrated default, docs/validity.md, already lets 0.18 pass).
    quarter = Thresholds(collapse_rank_fraction=0.25)
    end = _window_median(with_labels.series("rankme_centred", "features")[1], False)
    assert 9 <= end < 0.25 * with_labels.series("effective_rank_isotropic", "features")[1][0]
    collapsed = [f.subject for f in diagnose(without, quarter) if f.id == "representation-collapse"]
    assert collapsed == ["features"]
    assert [f for f in diagnose(with_labels, quarter) if f.id == "representation-collapse"] == []


def test_simsiam_collapse_points_to_the_stop_gradient_not_to_negatives():
    # This run's data span 8 of 32 dimensions, and its dimensional collapse ends at 0.18 of
    # the isotropic rank: above the default fraction calibrated on the validation corpus
    # (docs/validity.md: a healthy Barlow Twins ends at 0.19-0.21 there), so the remedy is
    # checked at a quarter.
    quarter = Thresholds(collapse_rank_fraction=0.25)
    (f,) = [f for f in diagnose(runs.simsiam(False), quarter) if f.id == "representation-collapse"]
    assert "stop-gradient" in f.remedy and "negatives (other groups" not in f.remedy
    assert [f for f in diagnose(runs.simsiam(True), quarter)
            if f.id == "representation-collapse"] == []


def test_a_contrastive_collapse_points_to_negatives():
    from gradprobe.diagnose.rules.representations import _collapse_remedy
    remedy = _collapse_remedy({"task": "task", "cont": "contrastive"}, posterior=False)
    assert "negatives" in remedy and "stop-gradient" not in remedy
