"""Rules on watched latents: ``representation-collapse``, ``orthogonality-vanishing`` and
``latent-dependence``."""

from __future__ import annotations

import math

import numpy as np

from gradprobe.record import Run, pair_name, pair_parts
from gradprobe.record.quantities import (ACTIVE_UNITS, CKA, EFFECTIVE_RANK_ISOTROPIC, GRAD_NORM,
                                         LATENT_CLASSES, LATENT_DIM, LATENT_GRAD_NORM, LATENT_NORM,
                                         LOSS, MAX_ABS_CORRELATION, MAX_ABS_CORRELATION_NULL,
                                         NORMALIZED_STD, PARTICIPATION_RATIO, RANKME_CENTRED,
                                         TOTAL_VARIANCE, WEIGHT)

from .._series import (align, finite, g, get, held_range, held_share, median, nanmax, pct,
                       persistent, recorded_series, roles, rolling_median, start_end, thin,
                       trailing_range, window_size)
from ..findings import Finding, PlotHint
from ..thresholds import Thresholds
from .common import Earlier, make_finding, series_end


def representation_collapse(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    """One finding per latent, of one kind: ``complete`` (every input maps to one point:
    directions and spread gone, a shrink to the origin, or posterior collapse), ``dimensional``
    (the centred rank fell, or the directions lost took their variance with them) or
    ``mean-dominated`` (the l2-normalised rows concentrate while the centred spread is kept:
    ``info``)."""
    out = []
    role = roles(run)
    kl_losses = [n for n, r in role.items() if r == "kl"]
    for z, steps, r in recorded_series(run, RANKME_CENTRED, 2 * th.min_points):
        k = window_size(len(r), th)
        peak = nanmax(rolling_median(r, th.smooth_points))
        end = median(r[-k:])
        # Centring moves the isotropic sample's RankMe by O(1/n): the recorded one serves.
        iso_s = get(run, EFFECTIVE_RANK_ISOTROPIC, z)
        iso = median(iso_s[1]) if iso_s is not None else math.nan
        d = median(get(run, LATENT_DIM, z)[1]) if run.has(LATENT_DIM, z) else math.nan
        # Centred measures only: a common offset that grows (a drifting mean) is no collapse.
        rank_limit = th.collapse_peak_fraction * peak
        if math.isfinite(iso):
            rank_limit = min(rank_limit, th.collapse_rank_fraction * iso)
        classes = nanmax(get(run, LATENT_CLASSES, z)[1]) if run.has(LATENT_CLASSES, z) \
            else math.nan
        if classes >= 2:
            # Neural collapse (Papyan et al. 2020): a supervised latent's class means span
            # classes - 1 directions; a rank settling there is the geometry training aims at.
            rank_limit = min(rank_limit, th.collapse_class_fraction * (classes - 1))
        rank_held = r <= rank_limit
        rank_cond = bool(end <= rank_limit)
        lines = _one_direction(run, z, steps, classes, th)
        if lines["condition"] and end <= th.collapse_participation_rank * iso:
            rank_held = rank_held | lines["held"] if rank_cond else lines["held"]
            rank_cond = True
        spread = _spread(run, z, d, steps, th, lines["condition"])
        lost = _directions_lost(lines, spread, steps)
        if lost["condition"]:
            rank_held = rank_held | lost["held"] if rank_cond else lost["held"]
            rank_cond = True
        active = _inactive_units(run, z, d, kl_losses, steps, th)
        if spread["complete"] or active["condition"]:
            kind = "complete"
            held = np.zeros(len(steps), dtype=bool)
            for part in (spread["complete_held"], active["held"]):
                if part is not None:
                    held = held | part
        elif rank_cond:
            kind, held = "dimensional", rank_held
        elif spread["mean_dominated"]:
            kind, held = "mean-dominated", spread["mean_dominated_held"]
        else:
            continue
        if kind == "mean-dominated":
            severity = "info"
        elif end <= th.collapse_error_rank or spread["complete"] or \
                active.get("active_end") == 0:
            severity = "error"
        else:
            severity = "warning"
        evidence = {
            "latent": z, "kind": kind, "dim": d, "rank_peak": peak, "rank_end": end,
            "rank_isotropic": iso, "classes": classes if classes >= 2 else None,
            "rank_limit": rank_limit, "rank_condition": rank_cond,
            "point_condition": spread["complete"], "active_units_condition": active["condition"],
            "mean_dominated_condition": spread["mean_dominated"],
            "participation_condition": lines["condition"] and
            end <= th.collapse_participation_rank * iso,
            "participation_peak": lines.get("peak"), "participation_end": lines.get("end"),
            "participation_limit": lines.get("limit"),
            "directions_lost_condition": lost["condition"],
            "participation_lost_limit": lines.get("lost_limit"),
            "end_steps": [int(steps[-k]), int(steps[-1])],
            "thresholds": {"peak_fraction": th.collapse_peak_fraction,
                           "rank_fraction": th.collapse_rank_fraction,
                           "class_fraction": th.collapse_class_fraction,
                           "std_fraction": th.collapse_std_fraction,
                           "shrink_fraction": th.collapse_shrink_fraction,
                           "sphere_fraction": th.collapse_sphere_fraction,
                           "constant_norm": th.collapse_constant_norm,
                           "shrink_elasticity": th.collapse_shrink_elasticity,
                           "participation": th.collapse_participation,
                           "participation_rank": th.collapse_participation_rank,
                           "participation_lost": th.collapse_participation_lost,
                           "active_fraction": th.collapse_active_fraction},
            "rankme_centred": thin(steps, r),
            **{key: v for key, v in {**spread, **active}.items()
               if key not in ("held", "condition", "complete", "mean_dominated",
                              "complete_held", "mean_dominated_held", "spread_lost_held")},
        }
        if active["condition"]:
            what = f"{g(active['active_end'])} of {g(d)} units active (posterior collapse under " \
                f"{', '.join(repr(n) for n in active['kl_losses'])})"
            key = f"active units {g(active['active_end'])} of {g(d)}"
            plot = PlotHint(ACTIVE_UNITS, names=[z], threshold=active["active_limit"])
        elif kind == "complete":
            kept = spread["variance_end"] / spread["variance_peak"]
            what = f"its total variance shrank to {g(kept)} of its peak and its normalised " \
                f"std is {g(spread['normalized_std_end'])} (healthy " \
                f"{g(spread['healthy_normalized_std'])}): all inputs map to one point"
            key = f"spread x{g(kept)} of peak"
            # The line the run crossed: the shrink limit, else the directions' limit.
            plot = PlotHint(TOTAL_VARIANCE, names=[z], threshold=spread["shrink_limit"]) \
                if spread["variance_end"] <= spread["shrink_limit"] and \
                spread["shrink_gradient_faded"] else \
                PlotHint(NORMALIZED_STD, names=[z], threshold=spread["std_limit"] / math.sqrt(d))
        elif kind == "dimensional":
            what = f"centred RankMe fell from {g(peak)} to {g(end)} (isotropic {g(iso)}, " \
                f"dim {g(d)}" + (f", {g(classes)} classes" if classes >= 2 else "") + ")"
            if evidence["participation_condition"] or lost["condition"]:
                what += f"; its variance sits in {g(lines['end'])} directions (participation " \
                    f"ratio, from {g(lines['peak'])})"
            if lost["condition"]:
                what += f" and its total variance fell with the directions it lost, to " \
                    f"{g(spread['variance_end'] / spread['variance_peak'])} of its peak"
            key = f"rank {g(end)} of {g(d)}"
            plot = PlotHint(RANKME_CENTRED, names=[z], threshold=rank_limit)
        else:
            kept = spread["variance_end"] / spread["variance_peak"]
            what = f"its l2-normalised rows concentrate (normalised std " \
                f"{g(spread['normalized_std_end'])}, healthy " \
                f"{g(spread['healthy_normalized_std'])}) while its centred " + \
                (f"rank is kept (centred RankMe {g(end)} of {g(d)}; rows of one norm, total "
                 f"variance {g(kept)} of its peak)" if spread["constant_norm"] else
                 f"spread is kept (total variance {g(kept)} of its peak, centred RankMe "
                 f"{g(end)} of {g(d)})")
            key = f"normalised std {g(spread['normalized_std_end'])}"
            plot = PlotHint(NORMALIZED_STD, names=[z],
                            threshold=spread["std_limit"] / math.sqrt(d))
        out.append(make_finding(
            "representation-collapse", severity, f"latent '{z}' collapsed (kind: {kind}): {what}",
            z, key, evidence, trailing_range(steps, held), plot=plot,
            remedy=_collapse_remedy(role, active["condition"], kind, lost["condition"])))
    return out


def _one_direction(run: Run, z: str, steps: np.ndarray, classes: float,
                   th: Thresholds) -> dict:
    """Dimensional collapse read from the participation ratio (tr C)^2 / tr C^2, the number of
    directions that hold the centred variance (Gao et al. 2017): it fell, and the variance now
    sits in about one direction. The RankMe, which weighs in the small directions through the
    entropy of the singular values, can stay above its isotropic fraction there; the caller
    still asks a lower RankMe than a latent read along one direction keeps. A supervised
    latent may hold its classes in classes - 1 directions."""
    ratio = finite(get(run, PARTICIPATION_RATIO, z))
    if ratio is None or len(ratio[0]) < th.min_points:
        return {"condition": False}
    peak = nanmax(rolling_median(ratio[1], th.smooth_points))
    limit = min(th.collapse_participation, th.collapse_peak_fraction * peak)
    lost_limit = th.collapse_participation_lost * peak
    if classes >= 2:
        limit = min(limit, th.collapse_class_fraction * (classes - 1))
        lost_limit = min(lost_limit, th.collapse_class_fraction * (classes - 1))
    end = series_end(ratio, th)
    at = np.interp(steps, *ratio)
    return {"condition": bool(end <= limit), "held": at <= limit, "peak": peak, "end": end,
            "limit": limit, "lost_limit": lost_limit, "lost_held": at <= lost_limit}


def _directions_lost(lines: dict, spread: dict, steps: np.ndarray) -> dict:
    """Dimensional collapse of a shrinking latent: the participation ratio fell to
    ``collapse_participation_lost`` of its peak and the total variance to
    ``collapse_peak_fraction`` of its own. A healthy spectrum that sharpens moves the variance
    into the directions it keeps (self-supervised runs end at 0.14-0.25 of their peak
    participation with their total variance kept); here the directions lost took their
    variance with them, while a latent that only changes its scale keeps its participation
    ratio (``orthogonality-vanishing`` judges that shrink)."""
    if "lost_limit" not in lines or "spread_lost" not in spread:
        return {"condition": False, "held": None}
    return {"condition": bool(lines["end"] <= lines["lost_limit"] and spread["spread_lost"]),
            "held": lines["lost_held"] & spread["spread_lost_held"]}


def _spread(run: Run, z: str, d: float, steps: np.ndarray, th: Thresholds,
            centred_lost: bool) -> dict:
    """The rows' directions (SimSiam's normalised std) against their centred spread (total
    variance). Complete collapse: the directions concentrate and the spread shrinks, or the
    spread falls by orders of magnitude whatever the directions do (a shrink to the origin,
    where the normalised std of what is left can hold). Mean-dominated: the directions
    concentrate around a mean while the spread stays (Chen & He 2021's indicator reads it
    as collapse; the centred information is kept).
    Rows of one norm (an l2-normalised output) make the two one measurement: there the total
    variance is |z|^2 - |mean|^2, so it falls exactly as the directions concentrate. Such a
    latent collapsed to a point when the centred variance also left its directions
    (``centred_lost``, the participation test) or when its spread fell to
    ``collapse_sphere_fraction`` of its peak; a concentration that keeps the centred rank is
    mean-dominated."""
    std_s = finite(get(run, NORMALIZED_STD, z))
    var_s = finite(get(run, TOTAL_VARIANCE, z))
    if std_s is None or var_s is None or not (math.isfinite(d) and d > 0) or \
            len(var_s[0]) < th.min_points:
        return {"complete": False, "mean_dominated": False, "complete_held": None,
                "mean_dominated_held": None}
    scaled = std_s[1] * math.sqrt(d)
    s_peak = nanmax(rolling_median(scaled, th.smooth_points))
    v_peak = nanmax(rolling_median(var_s[1], th.smooth_points))
    std_limit = min(th.collapse_peak_fraction * s_peak, th.collapse_std_fraction)
    var_limit = th.collapse_peak_fraction * v_peak
    one_norm = _constant_norm(run, z, th)
    point_limit = th.collapse_sphere_fraction * v_peak if one_norm and not centred_lost \
        else var_limit
    shrink_limit = th.collapse_shrink_fraction * v_peak
    s_end, v_end = series_end((std_s[0], scaled), th), series_end(var_s, th)
    std_held = np.interp(steps, std_s[0], scaled) <= std_limit
    var_at = np.interp(steps, var_s[0], var_s[1])
    directions_lost, point = s_end <= std_limit, v_end <= point_limit
    signal = _shrink_gradient(run, z, v_end / v_peak if v_peak > 0 else math.nan, th)
    shrunk = bool(v_end <= shrink_limit and signal["shrink_gradient_faded"])
    return {"complete": bool(directions_lost and point or shrunk),
            "mean_dominated": bool(directions_lost and not point),
            "complete_held": (std_held & (var_at <= point_limit)) |
            ((var_at <= shrink_limit) & shrunk),
            "mean_dominated_held": std_held & (var_at > point_limit),
            "spread_lost": bool(v_end <= var_limit), "spread_lost_held": var_at <= var_limit,
            "constant_norm": one_norm, "point_limit": point_limit,
            "std_limit": std_limit, "std_scaled_peak": s_peak, "std_scaled_end": s_end,
            "normalized_std_end": s_end / math.sqrt(d), "healthy_normalized_std": 1 / math.sqrt(d),
            "variance_peak": v_peak, "variance_end": v_end, "shrink_limit": shrink_limit,
            "normalized_std": thin(std_s[0], std_s[1]), "total_variance": thin(*var_s),
            **signal}


def _constant_norm(run: Run, z: str, th: Thresholds) -> bool:
    """Whether the rows keep one norm over the run: the mean row norm varies by at most
    ``collapse_constant_norm`` of its largest value (an l2-normalised output: ~1e-8)."""
    norm = finite(get(run, LATENT_NORM, z))
    if norm is None or len(norm[0]) < th.min_points:
        return False
    top = float(np.max(np.abs(norm[1])))
    return bool(top > 0 and np.ptp(norm[1]) <= th.collapse_constant_norm * top)


def _shrink_gradient(run: Run, z: str, variance_kept: float, th: Thresholds) -> dict:
    """Whether the losses that read the latent are satisfied by its shrink. A loss of degree p
    in the latent's scale s sends it a gradient ~ s^(p-1): a quadratic one (an MSE between
    views, a covariance or KL penalty) is minimised by the origin, and its gradient fades with
    the shrink; a distance (triplet, margin) or a loss on normalised rows keeps pushing at
    any scale, so the latent only changed its scale and (a), (b), (d) judge what it kept.
    The elasticity log(gradient kept) / log(std kept) estimates p - 1 from the run. Without a
    recorded gradient the shrink counts, as before."""
    total, steps = None, None
    for name in run.names(LOSS):
        grad = finite(get(run, LATENT_GRAD_NORM, pair_name(z, name)))
        if grad is None:
            continue
        weight = np.abs(np.interp(grad[0], *get(run, WEIGHT, name))) \
            if run.has(WEIGHT, name) else 1.0
        if total is None:
            steps, total = grad[0], weight * grad[1]
        else:
            total = total + np.interp(steps, grad[0], weight * grad[1])
    if total is None or len(steps) < th.min_points or not 0 < variance_kept < 1:
        return {"shrink_gradient_faded": True, "shrink_gradient_elasticity": None}
    peak = nanmax(rolling_median(total, th.smooth_points))
    end = series_end((steps, total), th)
    if not peak > 0:
        return {"shrink_gradient_faded": True, "shrink_gradient_elasticity": None}
    elasticity = math.log(end / peak) / math.log(math.sqrt(variance_kept)) if end > 0 \
        else math.inf
    return {"shrink_gradient_faded": bool(elasticity >= th.collapse_shrink_elasticity),
            "shrink_gradient_elasticity": elasticity, "shrink_gradient_peak": peak,
            "shrink_gradient_end": end, "latent_gradient": thin(steps, total)}


def _inactive_units(run: Run, z: str, d: float, kl_losses: list[str], steps: np.ndarray,
                    th: Thresholds) -> dict:
    """Posterior collapse: with a KL term to a unit prior, (almost) no unit of the latent
    varies with the input any more (active units, Burda et al. 2016)."""
    units = finite(get(run, ACTIVE_UNITS, z))
    if not kl_losses or units is None or not (math.isfinite(d) and d > 0) or \
            len(units[0]) < th.min_points:
        return {"condition": False, "held": None}
    reached = [n for n in kl_losses
               if not run.has(LATENT_GRAD_NORM, pair_name(z, n))
               or nanmax(run.series(LATENT_GRAD_NORM, pair_name(z, n))[1]) > 0]
    if not reached:
        return {"condition": False, "held": None}  # the KL term does not act on this latent
    limit = th.collapse_active_fraction * d
    a_end = series_end(units, th)
    return {"condition": bool(a_end <= limit), "held": np.interp(steps, *units) <= limit,
            "active_end": a_end, "active_peak": nanmax(units[1]), "active_limit": limit,
            "kl_losses": reached, "active_units": thin(*units)}


def _collapse_remedy(role: dict[str, str], posterior: bool, kind: str = "complete",
                     spread_shed: bool = False) -> str:
    """What prevents collapse depends on its kind and on the losses the model has."""
    present = set(role.values())
    if kind == "mean-dominated":
        return ("Nothing may need fixing: the centred spread and rank are kept, only a common "
                "mean dominates the l2-normalised rows. If a loss compares them by cosine, "
                "centre the output (batch norm in the projector, DINO's centering, Caron et al. "
                "2021) or watch the centred latent.")
    if posterior:
        return ("Posterior collapse: the KL term pushes every unit to the prior faster than the "
                "decoder learns to use it. Anneal the KL weight from 0 (Bowman et al. 2016), "
                "give each unit a KL floor (free bits, Kingma et al. 2016), or weaken an "
                "autoregressive decoder that can ignore the latent.")
    parts = []
    if "contrastive" in present:
        parts.append("give the contrastive loss informative negatives (other groups, a larger "
                     "batch or a memory bank: gradprobe.remedies.info_nce with "
                     "gradprobe.remedies.MemoryBank)")
    if "prototype" in present:
        parts.append("lower the weight of the prototype pull, which contracts every feature "
                     "towards a few points")
    if not parts:
        parts.append("without negatives (SimSiam, BYOL, any loss that only pulls two views "
                     "together) nothing in the loss prevents a constant output: check the "
                     "stop-gradient on the target branch and the predictor head (SimSiam, "
                     "Chen & He 2021; BYOL's momentum target, Grill et al. 2020), or add a "
                     "variance and covariance term (VICReg, Bardes et al. 2022)")
    if spread_shed:
        parts.insert(0, "hold each dimension's spread: a variance term (VICReg's hinge on the "
                        "per-dimension std, Bardes et al. 2022), which neither a correlation "
                        "term, blind to scale, nor a loss pulling views together provides")
    elif kind == "dimensional":
        parts.insert(0, "decorrelate the dimensions: a redundancy or covariance term (Barlow "
                        "Twins' off-diagonal term, Zbontar et al. 2021; VICReg's covariance "
                        "term), or a wider projector (dimensional collapse, Jing et al. 2022)")
    parts.append("balance the losses so that no contracting loss dominates "
                 "(gradprobe.remedies.GradNormBalancer)")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def _orthogonality_losses(run: Run) -> list[str]:
    return [n for n, r in roles(run).items() if r == "orthogonality"]


def orthogonality_vanishing(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    orth = _orthogonality_losses(run)
    orth_grads = {}
    for name in orth:
        s = finite(get(run, GRAD_NORM, name))
        if s is not None and len(s[0]) >= th.min_points:
            peak = nanmax(rolling_median(s[1], th.smooth_points))
            orth_grads[name] = {"peak": peak, "end": start_end(*s, th)["end"]}
    for z, steps, v in recorded_series(run, LATENT_NORM, 2 * th.min_points):
        peak = nanmax(rolling_median(v, th.smooth_points))
        end = start_end(steps, v, th)["end"]
        if not (peak > 0 and end <= th.vanishing_norm_fraction * peak):
            continue
        lost = {n: s for n, s in orth_grads.items()
                if s["peak"] > 0 and s["end"] <= th.vanishing_norm_fraction * s["peak"]}
        severity = "error" if lost else ("warning" if orth else "info")
        held = v <= th.vanishing_norm_fraction * peak
        evidence = {"latent": z, "norm_peak": peak, "norm_end": end, "ratio": end / peak,
                    "threshold": th.vanishing_norm_fraction, "orthogonality_losses": orth,
                    "orthogonality_grad_norms": orth_grads,
                    "orthogonality_gradient_lost": sorted(lost),
                    "latent_norm": thin(steps, v)}
        tail = f"; '{sorted(lost)[0]}' lost its gradient" if lost else ""
        out.append(make_finding(
            "orthogonality-vanishing", severity,
            f"latent '{z}' shrinks towards 0: its norm fell to {pct(end / peak)} of its "
            f"peak{tail}", z, f"norm x{g(end / peak)} of peak", evidence,
            trailing_range(steps, held),
            plot=PlotHint(LATENT_NORM, names=[z], threshold=th.vanishing_norm_fraction * peak)))
    out.extend(_unnormalised_orthogonality(run, th, orth))
    return out


def _unnormalised_orthogonality(run: Run, th: Thresholds, orth: list[str]) -> list[Finding]:
    """An orthogonality loss whose value tracks |z_a|^2 |z_b|^2: it measures scale, not angle."""
    out = []
    pairs = [p for p in run.names(CKA)] or []
    latents = run.names(LATENT_NORM)
    if not pairs and len(latents) >= 2:
        pairs = [pair_name(latents[0], latents[1])]
    for name in orth:
        loss = finite(get(run, LOSS, name))
        if loss is None:
            continue
        for pair in pairs:
            a, b = pair_parts(pair)
            na, nb = get(run, LATENT_NORM, a), get(run, LATENT_NORM, b)
            if na is None or nb is None:
                continue
            steps, (lv, av, bv) = align(loss, na, nb)
            keep = (lv > 0) & (av > 0) & (bv > 0) & np.isfinite(av) & np.isfinite(bv)
            if keep.sum() < 2 * th.min_points:
                continue
            scale = (av * bv) ** 2
            spread = float(scale[keep].max() / scale[keep].min())
            if spread < th.unnormalised_norm_range:
                continue
            log_loss, log_scale = np.log(lv[keep]), np.log(scale[keep])
            corr = float(np.corrcoef(log_loss, log_scale)[0, 1])
            # Proportional, not only correlated: a normalised loss that rises with the
            # dependence while the norms grow correlates too, at a slope near 0 (ASP-MTL's
            # unweighted difference loss: 0.09-0.17); a loss that is |z_a|^2 |z_b|^2 times
            # an angle term has slope 1.
            slope = float(np.polyfit(log_scale, log_loss, 1)[0])
            if not (corr >= th.unnormalised_correlation and slope >= th.unnormalised_slope):
                continue
            evidence = {"loss": name, "latents": [a, b], "log_correlation": corr,
                        "log_slope": slope, "norm_product_range": spread,
                        "thresholds": {"correlation": th.unnormalised_correlation,
                                       "slope": th.unnormalised_slope,
                                       "range": th.unnormalised_norm_range},
                        "loss_values": thin(steps[keep], lv[keep])}
            out.append(make_finding(
                "orthogonality-vanishing", "warning",
                f"orthogonality loss '{name}' is not normalised: it follows |{a}|^2 |{b}|^2 "
                f"(log correlation {g(corr)}, slope {g(slope)}) over a {g(spread)}x range",
                name, f"log corr {g(corr, 2)}", evidence,
                (int(steps[keep][0]), int(steps[keep][-1])),
                plot=PlotHint(LOSS, names=[name])))
            break
    return out


def latent_dependence(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    decoupling = [n for n, r in roles(run).items()
                  if r in ("orthogonality", "decorrelation", "adversarial")]
    for pair in sorted(set(run.names(CKA)) | set(run.names(MAX_ABS_CORRELATION))):
        cka = finite(get(run, CKA, pair))
        corr = finite(get(run, MAX_ABS_CORRELATION, pair))
        null = get(run, MAX_ABS_CORRELATION_NULL, pair)
        base = cka or corr
        if base is None or len(base[0]) < th.min_points:
            continue
        steps = base[0]
        held = np.zeros(len(steps), dtype=bool)
        evidence: dict = {"pair": pair, "decoupling_losses": decoupling,
                          "thresholds": {"cka": th.dependence_cka,
                                         "corr_excess": th.dependence_corr_excess}}
        if cka is not None:
            cv = np.interp(steps, cka[0], cka[1])
            held |= cv >= th.dependence_cka
            evidence.update(median_cka=median(cka[1]), cka_end=start_end(*cka, th)["end"],
                            cka=thin(*cka))
        if corr is not None and null is not None:
            _, (rv, nv) = align(corr, null)
            excess = rv - nv
            held |= np.interp(steps, corr[0][np.isin(corr[0], null[0])], excess) >= \
                th.dependence_corr_excess
            evidence.update(median_max_abs_correlation=median(rv),
                            median_null=median(nv), median_excess=median(excess),
                            max_abs_correlation=thin(*corr))
        if not persistent(steps, held, None, th):
            continue
        a, b = pair_parts(pair)
        evidence["held_share"] = held_share(steps, held)
        severity = "warning" if decoupling else "info"
        cka_txt = f"CKA {g(evidence['median_cka'])}" if "median_cka" in evidence else \
            f"max |corr| {g(evidence['median_max_abs_correlation'])}"
        out.append(make_finding(
            "latent-dependence", severity,
            f"'{a}' and '{b}' stay dependent: {cka_txt} (median) over "
            f"{pct(evidence['held_share'])} of the run", pair, cka_txt, evidence,
            held_range(steps, held),
            plot=PlotHint(CKA, names=[pair], threshold=th.dependence_cka) if cka is not None
            else PlotHint(MAX_ABS_CORRELATION, names=[pair])))
    return out
