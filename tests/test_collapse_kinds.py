"""``representation-collapse`` reports its kind: complete (one point, a shrink to the origin
included), dimensional (the centred variance in about one direction) and mean-dominated
(``info``). Each run's latent quantities are computed here with numpy from a latent
generated step by step, written as a run file and diagnosed."""

from __future__ import annotations

import numpy as np
import pytest

from gradprobe.diagnose import Thresholds, diagnose
from test_diagnose import _synthetic

N, D, STEPS = 256, 32, 30


def _entropy_rank(values: np.ndarray) -> float:
    p = values[values > 0] / values.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _quantities(z: np.ndarray) -> dict:
    """RankMe (Garrido et al. 2023) of the centred rows, participation ratio (tr C)^2 / tr C^2,
    SimSiam's normalised std and the unbiased total variance, by their formulas."""
    centred = z - z.mean(0)
    eig = np.linalg.eigvalsh(np.cov(z, rowvar=False))
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    return {"rankme_centred": _entropy_rank(np.linalg.svd(centred, compute_uv=False)),
            "participation_ratio": float(eig.sum() ** 2 / (eig ** 2).sum()),
            "normalized_std": float(unit.std(0, ddof=1).mean()),
            "total_variance": float(z.var(0, ddof=1).sum())}


ISOTROPIC = _entropy_rank(np.linalg.svd(np.random.default_rng(1).standard_normal((N, D)),
                                        compute_uv=False))


def _run(tmp_path, latent_at, gradients=None):
    """``gradients(z)``: the scalars the losses' gradients at the latent add to a step."""
    rows = []
    for step in range(STEPS):
        z = latent_at(min(1.0, step / (0.7 * STEPS)))  # then held
        rows.append((step, {("loss", "task"): 1.0, ("loss", "aux"): 1.0,
                            ("effective_rank_isotropic", "z"): ISOTROPIC,
                            ("latent_dim", "z"): float(D),
                            **{(name, "z"): v for name, v in _quantities(z).items()},
                            **(gradients(z) if gradients else {})}))
    run = _synthetic(tmp_path, rows)
    return run, [f for f in diagnose(run) if f.id == "representation-collapse"]


BASE = np.random.default_rng(0).standard_normal((N, D))
DIRECTION = np.eye(D)[0]


def test_a_shrink_to_the_origin_is_complete_collapse_while_the_normalised_std_holds(tmp_path):
    # An offset keeps the rows off the origin; everything shrinks by 1000x.
    run, (f,) = _run(tmp_path, lambda t: (BASE + 3 * DIRECTION) * 10 ** (-3 * t))
    _, std = run.series("normalized_std", "z")
    _, variance = run.series("total_variance", "z")
    assert abs(std[-1] / std[0] - 1) < 1e-6  # the directions do not move at all
    assert variance[-1] / variance[0] < 1e-5
    assert f.severity == "error" and f.evidence["kind"] == "complete"
    assert "kind: complete" in f.title
    assert f.evidence["variance_end"] <= Thresholds().collapse_shrink_fraction * \
        f.evidence["variance_peak"]
    assert not f.evidence["rank_condition"]  # the shape is kept: only the spread tells
    # the report draws the line the run crossed: the shrink limit on the total variance
    assert f.plot.quantity == "total_variance"
    assert f.plot.threshold == Thresholds().collapse_shrink_fraction * \
        f.evidence["variance_peak"]


def test_directions_and_spread_lost_together_draw_the_directions_limit(tmp_path):
    # Every row moves onto one point off the origin: the directions concentrate and the
    # spread falls 40x, which is less than the shrink limit asks.
    run, (f,) = _run(tmp_path, lambda t: BASE * 10 ** (-0.8 * t) + 3 * DIRECTION)
    th = Thresholds()
    _, variance = run.series("total_variance", "z")
    assert th.collapse_shrink_fraction < variance[-1] / variance.max() <= \
        th.collapse_peak_fraction
    assert f.evidence["kind"] == "complete" and f.severity == "error"
    assert f.plot.quantity == "normalized_std"
    _, std = run.series("normalized_std", "z")
    peak = np.sqrt(D) * np.max(std)  # the scaled std peaks at the start, as rows shrink
    limit = min(th.collapse_peak_fraction * peak, th.collapse_std_fraction) / np.sqrt(D)
    assert np.isclose(f.plot.threshold, limit, rtol=0.05)
    assert np.median(std[-6:]) <= f.plot.threshold


def _one_direction(t):
    # The variance moves onto one direction; a faint isotropic rest stays.
    return BASE * (1 - 0.9 * t) + (BASE[:, :1] * 6 * t) * DIRECTION


def test_variance_in_one_direction_is_dimensional_collapse(tmp_path):
    run, (f,) = _run(tmp_path, _one_direction)
    th = Thresholds()
    end = _quantities(_one_direction(1.0))
    # numpy: the participation ratio falls from ~D to ~1, the RankMe stays above the
    # isotropic fraction that the rank test alone asks.
    assert end["participation_ratio"] <= th.collapse_participation
    assert th.collapse_rank_fraction * ISOTROPIC < end["rankme_centred"] <= \
        th.collapse_participation_rank * ISOTROPIC
    assert f.severity == "warning" and f.evidence["kind"] == "dimensional"
    assert f.evidence["participation_condition"]
    assert np.isclose(f.evidence["participation_end"], end["participation_ratio"], rtol=0.05)
    assert "Decorrelate the dimensions" in f.remedy


def test_a_latent_read_along_one_direction_with_a_wide_spectrum_is_not_collapse(tmp_path):
    # One strong direction over a full isotropic rest: the participation ratio falls under
    # 2, but the RankMe keeps more than the participation-rank fraction of the isotropic one.
    def read_out(t):
        return BASE + (BASE[:, :1] * 12 * t) * DIRECTION
    end = _quantities(read_out(1.0))
    th = Thresholds()
    assert end["participation_ratio"] <= th.collapse_participation
    assert end["rankme_centred"] > th.collapse_participation_rank * ISOTROPIC
    _, found = _run(tmp_path, read_out)
    assert found == []


def test_a_mean_that_dominates_the_normalised_rows_is_a_note_with_both_numbers(tmp_path):
    run, (f,) = _run(tmp_path, lambda t: BASE + 30 * t * DIRECTION)
    _, std = run.series("normalized_std", "z")
    _, variance = run.series("total_variance", "z")
    assert std[-1] * np.sqrt(D) < Thresholds().collapse_std_fraction
    assert abs(variance[-1] / variance[0] - 1) < 1e-9  # an offset moves no variance
    assert f.severity == "info" and f.evidence["kind"] == "mean-dominated"
    assert np.isclose(f.evidence["normalized_std_end"], np.median(std[-6:]))
    assert np.isclose(f.evidence["variance_end"], np.median(variance[-6:]))
    assert "normalised std" in f.title and "total variance" in f.title
    assert "centre the output" in f.remedy


def _squared_norm_gradient(z: np.ndarray) -> float:
    """|dL/dz| of L = sum ||z_i||^2 / N, degree 2 in the scale (an MSE or covariance term):
    2 z / N, by numpy."""
    return float(np.linalg.norm(2 * z / len(z)))


def _distance_gradient(z: np.ndarray) -> float:
    """|dL/dz| of L = mean ||z_i||, degree 1 in the scale (a distance, as a triplet's):
    rows z_i / (N ||z_i||), by numpy."""
    return float(np.linalg.norm(z / (len(z) * np.linalg.norm(z, axis=1, keepdims=True))))


def _shrinking(t):
    return (BASE + 3 * DIRECTION) * 10 ** (-3 * t)


def _elasticity(run) -> float:
    """log(gradient kept) / log(std kept): the series are monotone and held at the end."""
    _, variance = run.series("total_variance", "z")
    _, grad = run.series("latent_grad_norm", "z|task")
    return float(np.log(grad[-1] / grad[0]) / np.log(np.sqrt(variance[-1] / variance[0])))


def test_a_shrink_that_a_quadratic_loss_is_satisfied_by_is_complete_collapse(tmp_path):
    # VICReg without its variance term: the invariance and covariance terms are minimised by
    # the origin, and their gradient at the latent fades with its scale.
    run, (f,) = _run(tmp_path, _shrinking,
                     lambda z: {("latent_grad_norm", "z|task"): _squared_norm_gradient(z)})
    assert abs(_elasticity(run) - 1) < 1e-6  # a degree-2 loss: the gradient ~ scale
    # the rule reads both peaks smoothed over smooth_points (the first steps, both falling)
    assert f.evidence["shrink_gradient_elasticity"] == pytest.approx(_elasticity(run), rel=0.01)
    assert f.evidence["kind"] == "complete" and f.severity == "error"
    assert f.plot.quantity == "total_variance"


def test_a_shrink_under_a_loss_that_keeps_pushing_is_a_change_of_scale(tmp_path):
    # A distance loss (batch-hard triplet on an unnormalised embedding) sends the same
    # gradient at any scale: the spread fell 1e6x, the directions and the rank are kept.
    run, found = _run(tmp_path, _shrinking,
                      lambda z: {("latent_grad_norm", "z|task"): _distance_gradient(z)})
    _, variance = run.series("total_variance", "z")
    assert variance[-1] / variance[0] < 1e-5
    assert abs(_elasticity(run)) < 1e-6 < Thresholds().collapse_shrink_elasticity
    assert found == []


def test_a_gradient_weighted_zero_does_not_keep_a_shrink_alive(tmp_path):
    # The distance loss is recorded but weighted 0 (VICReg's variance term at weight 0); the
    # quadratic loss that acts fades with the scale: the weighted sum is what the latent gets.
    run, (f,) = _run(tmp_path, _shrinking,
                     lambda z: {("latent_grad_norm", "z|aux"): _distance_gradient(z),
                                ("weight", "aux"): 0.0, ("weight", "task"): 25.0,
                                ("latent_grad_norm", "z|task"): _squared_norm_gradient(z)})
    assert f.evidence["kind"] == "complete"
    assert f.evidence["shrink_gradient_end"] == pytest.approx(
        25 * _squared_norm_gradient(_shrinking(1.0)), rel=1e-6)


def _shedding(t, rest=0.08):
    # Three directions keep their spread; every other one shrinks to `rest` of its scale and
    # takes its variance with it (VIbCReg without its variance term).
    scale = np.full(D, 1 - (1 - rest) * t)
    scale[:3] = 1.0
    return BASE * scale


def test_directions_lost_with_their_variance_are_dimensional_collapse(tmp_path):
    run, (f,) = _run(tmp_path, _shedding)
    th = Thresholds()
    start, end = _quantities(_shedding(0.0)), _quantities(_shedding(1.0))
    # numpy: the participation ratio fell to 0.12 of its start and the total variance to
    # 0.09, while every other test stays quiet: the ratio is above collapse_participation,
    # the RankMe above both isotropic fractions, the scaled normalised std above its limit
    # and the variance far above the shrink limit.
    assert end["participation_ratio"] <= th.collapse_participation_lost * \
        start["participation_ratio"]
    assert end["total_variance"] <= th.collapse_peak_fraction * start["total_variance"]
    assert end["participation_ratio"] > th.collapse_participation
    assert end["rankme_centred"] > th.collapse_participation_rank * ISOTROPIC
    assert end["normalized_std"] * np.sqrt(D) > th.collapse_peak_fraction
    assert end["total_variance"] > 5 * th.collapse_shrink_fraction * start["total_variance"]
    assert f.severity == "warning" and f.evidence["kind"] == "dimensional"
    assert f.evidence["directions_lost_condition"]
    assert not f.evidence["participation_condition"] and not f.evidence["point_condition"]
    assert np.isclose(f.evidence["participation_end"], end["participation_ratio"], rtol=1e-6)
    assert np.isclose(f.evidence["participation_lost_limit"],
                      th.collapse_participation_lost * start["participation_ratio"], rtol=0.02)
    # the title's share: the end-window median over the peak of the centred 3-step rolling
    # median, whose window shrinks to 2 values at the edges
    _, variance = run.series("total_variance", "z")
    peak = max(np.median(variance[max(0, i - 1):i + 2]) for i in range(len(variance)))
    assert f"to {np.median(variance[-6:]) / peak:.3g} of its peak" in f.title
    assert f.remedy.startswith("Hold each dimension's spread: a variance term")


def test_a_spectrum_that_sharpens_and_keeps_its_variance_is_no_collapse(tmp_path):
    # The same directions fade, but the three that stay grow to keep the total variance:
    # what healthy self-supervised runs do (participation ratio 0.14-0.25 of its peak).
    def sharpening(t):
        z = _shedding(t)
        lost = BASE.var(0, ddof=1).sum() - z.var(0, ddof=1).sum()
        kept = z[:, :3].var(0, ddof=1).sum()
        z[:, :3] *= np.sqrt(1 + lost / kept)
        return z
    start, end = _quantities(sharpening(0.0)), _quantities(sharpening(1.0))
    th = Thresholds()
    assert end["participation_ratio"] <= th.collapse_participation_lost * \
        start["participation_ratio"]
    assert np.isclose(end["total_variance"], start["total_variance"])
    _, found = _run(tmp_path, sharpening)
    # Only the l2-normalised rows concentrate (three directions hold them): the info note.
    assert [(f.severity, f.evidence["kind"]) for f in found] in ([], [("info", "mean-dominated")])
    assert all(not f.evidence["directions_lost_condition"] for f in found)


def test_a_partial_shrink_that_keeps_the_shape_is_no_collapse(tmp_path):
    # The whole latent shrinks to 5% of its variance, every direction alike (a change of
    # scale, orthogonality-vanishing's case): the participation ratio does not move.
    run, found = _run(tmp_path, lambda t: BASE * np.sqrt(1 - 0.95 * t))
    start, end = _quantities(BASE), _quantities(BASE * np.sqrt(0.05))
    assert np.isclose(end["participation_ratio"], start["participation_ratio"])
    assert np.isclose(end["total_variance"] / start["total_variance"], 0.05)
    assert found == []


def test_a_supervised_latent_shedding_to_its_classes_is_neural_collapse(tmp_path):
    # With 4 classes the class means span 3 directions: the shedding latent settles there.
    _, found = _run(tmp_path, _shedding, lambda z: {("latent_classes", "z"): 4.0})
    end = _quantities(_shedding(1.0))
    assert end["participation_ratio"] > Thresholds().collapse_class_fraction * (4 - 1)
    assert found == []


def _on_sphere(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _row_norm(z: np.ndarray) -> dict:
    return {("latent_norm", "z"): float(np.linalg.norm(z, axis=1).mean())}


def _concentrating(offset: float):
    """l2-normalised rows drawn towards one direction: at unit norm the total variance is
    1 - |mean|^2, so the spread falls exactly as the directions concentrate."""
    return lambda t: _on_sphere(BASE + offset * t * DIRECTION)


def test_unit_rows_that_concentrate_and_keep_their_centred_rank_are_mean_dominated(tmp_path):
    # MSN's anchor (fourth held-out set): spread x0.07-0.09 of its peak, centred rank kept.
    run, (f,) = _run(tmp_path, _concentrating(20.0), _row_norm)
    th = Thresholds()
    start, end = _quantities(_on_sphere(BASE)), _quantities(_concentrating(20.0)(1.0))
    kept = end["total_variance"] / start["total_variance"]
    assert np.allclose(np.linalg.norm(_concentrating(20.0)(1.0), axis=1), 1)
    # Without the one-norm rule this is (b): directions and spread both at most half their peak.
    assert th.collapse_sphere_fraction < kept <= th.collapse_peak_fraction
    assert end["normalized_std"] * np.sqrt(D) <= th.collapse_peak_fraction * \
        start["normalized_std"] * np.sqrt(D)
    assert end["participation_ratio"] > th.collapse_participation  # the centred rank is kept
    assert (f.severity, f.evidence["kind"]) == ("info", "mean-dominated")
    assert f.evidence["constant_norm"] and "rank is kept" in f.title and "rows of one norm" in f.title
    assert np.isclose(f.evidence["variance_end"] / f.evidence["variance_peak"], kept, rtol=0.05)
    # The same rows at a norm that moves over the run are judged by (b) as before.
    _, (moving,) = _run(tmp_path, lambda t: _concentrating(20.0)(t) * (1 + t),
                        lambda z: _row_norm(z))
    assert not moving.evidence["constant_norm"]
    assert (moving.severity, moving.evidence["kind"]) == ("error", "complete")


def test_unit_rows_whose_spread_is_nearly_gone_collapse_to_a_point(tmp_path):
    # BYOL without predictor, CorInfoMax without log-det: x0.0008-0.012 of the peak spread
    # while the faint rest keeps a high centred rank.
    run, (f,) = _run(tmp_path, _concentrating(100.0), _row_norm)
    th = Thresholds()
    end = _quantities(_concentrating(100.0)(1.0))
    kept = end["total_variance"] / _quantities(_on_sphere(BASE))["total_variance"]
    assert kept <= th.collapse_sphere_fraction
    assert end["participation_ratio"] > th.collapse_participation
    assert (f.severity, f.evidence["kind"]) == ("error", "complete")
    assert np.isclose(f.evidence["point_limit"],
                      th.collapse_sphere_fraction * f.evidence["variance_peak"])


def test_unit_rows_whose_centred_variance_takes_one_direction_collapse_to_a_point(tmp_path):
    # SimSiam without stop-gradient: spread x0.11-0.15, but the centred variance sits in
    # 1.1-1.4 directions (the participation test), so the concentration is a collapse.
    def one_line(t):
        return _on_sphere(BASE * (1 - 0.97 * t) + (8 * t * DIRECTION)
                          + 2.5 * t * BASE[:, 1:2] * np.eye(D)[1])
    run, (f,) = _run(tmp_path, one_line, _row_norm)
    th = Thresholds()
    start, end = _quantities(one_line(0.0)), _quantities(one_line(1.0))
    kept = end["total_variance"] / start["total_variance"]
    assert th.collapse_sphere_fraction < kept <= th.collapse_peak_fraction
    assert end["participation_ratio"] <= th.collapse_participation
    assert (f.severity, f.evidence["kind"]) == ("error", "complete")
    assert f.evidence["participation_condition"] or f.evidence["point_condition"]
    assert np.isclose(f.evidence["point_limit"],
                      th.collapse_peak_fraction * f.evidence["variance_peak"])
