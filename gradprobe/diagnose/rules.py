"""One small rule per finding id. Each reads only what it needs from the Run and returns a
list of findings (empty when its quantities were not recorded). A rule also receives the
findings of the rules before it in :data:`RULES` (``earlier``), so that a rule about a cause
(static weights) reads the findings of the harm it explains instead of judging them again.
docs/findings.md states every rule precisely."""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from gradprobe.record import Run

from ._series import (align, finite, g, get, held_range, held_share, median, nanmax, pct,
                      persistent, roles, rolling_median, start_end, task_learning, task_name,
                      thin, trailing_range, window_size)
from .findings import REMEDY, WHY, Finding
from .recording import probe_incomplete
from .thresholds import Thresholds

Earlier = Sequence[Finding]  # the findings of the rules before this one, in RULES order
Rule = Callable[[Run, Thresholds, Earlier], list[Finding]]


def _finding(id: str, severity: str, title: str, subject: str, key_number: str, evidence: dict,
             steps, plot=None, remedy: str | None = None) -> Finding:
    """A finding with the id's mechanism as its why; ``remedy`` replaces the id's generic
    remedy when the losses present call for a specific one."""
    return Finding(id=id, severity=severity, title=title, subject=subject, key_number=key_number,
                   evidence=evidence, why=WHY[id], remedy=remedy or REMEDY[id], steps=steps,
                   plot=plot)


def _loss_start(run: Run, name: str, th: Thresholds) -> float:
    series = finite(get(run, "loss", name))
    if series is None:
        return math.nan
    return start_end(*series, th)["start"]


def _end(series: tuple[np.ndarray, np.ndarray] | None, th: Thresholds) -> float:
    """Median of a series' last window (NaN when it was not recorded)."""
    if series is None:
        return math.nan
    return median(series[1][-window_size(len(series[1]), th):])


def _decoupled_pairs(run: Run, th: Thresholds) -> bool:
    """True when latent pairs were recorded and all of them end independent (CKA and max |corr|
    at their null): a decorrelation/orthogonality loss is then satisfied, at its noise floor."""
    pairs = run.names("cka")
    if not pairs:
        return False
    for pair in pairs:
        cka = finite(get(run, "cka", pair))
        if cka is None or len(cka[0]) < th.min_points:
            return False
        if start_end(*cka, th)["end"] >= th.dependence_cka:
            return False
        corr, null = get(run, "max_abs_correlation", pair), get(run, "max_abs_correlation_null", pair)
        if corr is not None and null is not None:
            _, (rv, nv) = align(corr, null)
            if median(rv[-window_size(len(rv), th):] - nv[-window_size(len(nv), th):]) >= \
                    th.dependence_corr_excess:
                return False
    return True


def _satisfied(run: Run, th: Thresholds) -> set[str]:
    """Constraint losses already at their floor by recorded evidence (decoupled latents)."""
    if not _decoupled_pairs(run, th):
        return set()
    return {n for n, r in roles(run).items() if r in ("orthogonality", "decorrelation")}


# ------------------------------------------------------------------------ gradient-swamping

def gradient_swamping(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    names = [n for n in run.losses if run.has("weighted_grad_norm", n)]
    if len(names) < 2:
        return []
    steps, wn = align(*[get(run, "weighted_grad_norm", n) for n in names])
    if len(steps) < th.min_points:
        return []
    W = np.vstack(wn)  # K x T
    _, raw = align(*[get(run, "grad_norm", n) for n in names]) if all(
        run.has("grad_norm", n) for n in names) else (None, [W[k] for k in range(len(names))])
    role = roles(run)
    # A regulariser's pull (weight decay) is not a loss competing for the shared layers: the
    # swamping ratio is taken against the largest of the others.
    competing = np.array([role[n] not in th.exempt_roles for n in names])[:, None]
    candidates = np.where(np.isfinite(W) & competing, W, -np.inf)
    with np.errstate(invalid="ignore"):
        largest = np.max(candidates, axis=0)
        dominant_idx = np.argmax(candidates, axis=0)
    learning = task_learning(run, steps, th)
    satisfied = _satisfied(run, th)
    out = []
    for k, name in enumerate(names):
        if role[name] in th.exempt_roles or name in satisfied:
            continue
        raw_k = np.asarray(raw[k])
        if not np.any(np.isfinite(raw_k) & (raw_k > 0)):
            continue  # no gradient at all on the shared parameters: that is inert-loss
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = W[k] / largest
        # Something left to learn: the loss is above learned_fraction of its start.
        to_learn = np.ones(len(steps), dtype=bool)
        start = _loss_start(run, name, th)
        loss_series = get(run, "loss", name)
        if start > 0 and loss_series is not None:
            ls, lv = loss_series
            smooth = rolling_median(lv, th.smooth_points)
            at = np.interp(steps, ls, np.where(np.isfinite(smooth), smooth, np.inf))
            to_learn = at > th.learned_fraction * start
        weight_on = np.ones(len(steps), dtype=bool)
        if run.has("weight", name):
            ws, wv = get(run, "weight", name)
            weight_on = np.interp(steps, ws, np.abs(wv)) > 0  # a weight of 0: switched off
        judged = learning & to_learn & weight_on & np.isfinite(ratio) & (largest > 0) & \
            np.isfinite(raw_k) & (raw_k > 0) & (dominant_idx != k)
        held = judged & (ratio < th.swamping_ratio)
        if not persistent(steps, held, judged, th):
            continue
        med = median(ratio[judged])
        dom = Counter(dominant_idx[held].tolist()).most_common(1)[0][0]
        dominant = names[dom]
        share = held_share(steps, held, judged)
        severity = "error" if med < th.swamping_error_ratio else "warning"
        first, last = held_range(steps, held)
        evidence = {
            "loss": name, "dominant": dominant, "median_ratio": med,
            "threshold": th.swamping_ratio, "held_share": share,
            "held_steps": int(held.sum()), "judged_steps": int(judged.sum()),
            "first_step": first, "last_step": last,
            "median_weighted_grad_norm": median(W[k][judged]),
            "median_dominant_weighted_grad_norm": median(W[dom][judged]),
            "median_weight": median(get(run, "weight", name)[1]) if run.has("weight", name)
            else None,
            "task_memorised_at": int(steps[~learning][0]) if (~learning).any() else None,
            "ratio": thin(steps[judged], ratio[judged]),
        }
        out.append(_finding(
            "gradient-swamping", severity,
            f"'{name}' is swamped: its weighted gradient is {pct(med)} of '{dominant}''s",
            name, f"ratio {g(med)} (median)", evidence, (first, last),
            plot={"quantity": "weighted_grad_norm", "names": [name, dominant],
                  "threshold": th.swamping_ratio, "ratio_to": dominant}))
    return out


# ----------------------------------------------------------------------- constraint-neglect

def constraint_neglect(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    task = task_name(run)
    task_series = finite(get(run, "loss", task)) if task else None
    if task_series is None or len(task_series[0]) < 2 * th.min_points:
        return []
    t = start_end(*task_series, th)
    if not t["start"] > 0 or not t["end"] / t["start"] <= th.neglect_task_fraction:
        return []
    ts, tv = task_series
    smooth = rolling_median(tv, th.smooth_points)
    low = np.flatnonzero(smooth <= th.neglect_task_fraction * t["start"])
    near_zero_from = int(ts[low[0]]) if len(low) else t["end_steps"][0]
    out = []
    satisfied = _satisfied(run, th)
    for name, role in roles(run).items():
        if name == task or role not in th.constraint_roles or name in satisfied:
            continue
        series = finite(get(run, "loss", name))
        if series is None or len(series[0]) < 2 * th.min_points:
            continue
        c = start_end(*series, th)
        if not c["start"] > 0:
            continue  # a relative judgement needs a positive start
        ratio = c["end"] / c["start"]
        if not ratio >= th.neglect_constraint_fraction:
            continue
        rose = ratio > 1.0
        evidence = {
            "task": task, "constraint": name, "role": role,
            "task_start": t["start"], "task_end": t["end"], "task_ratio": t["end"] / t["start"],
            "constraint_start": c["start"], "constraint_end": c["end"],
            "constraint_ratio": ratio,
            "start_steps": c["start_steps"], "end_steps": c["end_steps"],
            "task_near_zero_from": near_zero_from,
            "thresholds": {"task": th.neglect_task_fraction,
                           "constraint": th.neglect_constraint_fraction},
            "task_loss": thin(ts, tv), "constraint_loss": thin(*series),
        }
        verb = "rose" if rose else "stayed high"
        out.append(_finding(
            "constraint-neglect", "error" if rose else "warning",
            f"'{task}' fell to {pct(t['end'] / t['start'])} of its start while '{name}' {verb} "
            f"({pct(ratio)} of its start)",
            name, f"task x{g(t['end'] / t['start'])}, {name} x{g(ratio)}", evidence,
            (near_zero_from, int(series[0][-1])),
            plot={"quantity": "loss", "names": [task, name], "threshold": None, "ratio_to": None}))
    return out


# ------------------------------------------------------------------------ gradient-conflict

def gradient_conflict(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    role = roles(run)
    for pair in run.names("grad_cosine"):
        series = finite(get(run, "grad_cosine", pair))
        if series is None or len(series[0]) < th.min_points:
            continue
        steps, cos = series
        a, _, b = pair.partition("|")
        if role.get(a) in th.exempt_roles or role.get(b) in th.exempt_roles:
            continue  # a regulariser opposes the task by design (weight decay pulls to 0)
        # Judged: while the task still learns (at convergence two losses balance, cos -> -1
        # by necessity), where both losses have a gradient and a non-zero weight, and where
        # neither weighted gradient is swamped by the other (a negligible gradient cannot
        # conflict in effect; that case is gradient-swamping).
        judged = task_learning(run, steps, th)
        wn = []
        for name in (a, b):
            for q in ("grad_norm", "weight"):
                s = get(run, q, name)
                if s is not None:
                    judged &= np.interp(steps, s[0], np.nan_to_num(np.abs(s[1]))) > 0
            s = get(run, "weighted_grad_norm", name)
            if s is not None:
                wn.append(np.interp(steps, s[0], np.nan_to_num(s[1])))
        if len(wn) == 2:
            with np.errstate(divide="ignore", invalid="ignore"):
                balance = np.minimum(wn[0], wn[1]) / np.maximum(wn[0], wn[1])
            judged &= np.nan_to_num(balance) >= th.swamping_ratio
        if judged.sum() < th.min_points:
            continue
        c = cos[judged]
        med = median(c)
        negative = (c < 0)
        share = held_share(steps[judged], negative)
        if not (med <= th.conflict_median_cosine and share >= th.conflict_share):
            continue
        mag = get(run, "magnitude_similarity", pair)
        tragic_share = None
        if mag is not None:
            m = np.interp(steps[judged], mag[0], mag[1])
            tragic_share = held_share(steps[judged], c <= -m)
        tragic = tragic_share is not None and tragic_share >= th.conflict_tragic_share
        harm = _conflict_harm(run, th, (a, b), steps[judged], role)
        severity = ("error" if tragic else "warning") if harm["suffering"] else "info"
        held = np.zeros(len(steps), dtype=bool)
        held[np.flatnonzero(judged)[negative]] = True
        evidence = {
            "pair": pair, "median_cosine": med, "negative_share": share,
            "tragic_share": tragic_share, "judged_steps": int(judged.sum()), **harm,
            "thresholds": {"median_cosine": th.conflict_median_cosine,
                           "share": th.conflict_share, "tragic_share": th.conflict_tragic_share,
                           "stall_fraction": th.conflict_stall_fraction,
                           "cancel_ratio": th.conflict_cancel_ratio},
            "cosine": thin(steps[judged], c),
        }
        what = f"'{a}' and '{b}' pull against each other: gradient cosine < 0 on {pct(share)} " \
            "of probe steps"
        if harm["stalled"]:
            what += f"; {' and '.join(repr(n) for n in harm['stalled'])} stalled while the " \
                "other fell"
        if harm["cancelled"]:
            what += f"; the weighted gradients cancel (combined norm {pct(harm['cancel_ratio'])}" \
                " of their sum)"
        if not harm["suffering"]:
            what += ", but neither loss is held back by it"
        elif tragic:
            what += " (tragic: cos <= -magnitude similarity)"
        out.append(_finding(
            "gradient-conflict", severity, what, pair, f"cos {g(med)} (median)", evidence,
            held_range(steps, held),
            plot={"quantity": "grad_cosine", "names": [pair], "threshold": 0.0,
                  "ratio_to": None}))
    return out


def _loss_ratio(run: Run, name: str, lo: int, hi: int, th: Thresholds) -> float:
    """A loss's end / start (medians of its windows) between steps ``lo`` and ``hi``."""
    series = finite(get(run, "loss", name))
    if series is None:
        return math.nan
    keep = (series[0] >= lo) & (series[0] <= hi)
    if keep.sum() < 2 * th.min_points:
        return math.nan
    ends = start_end(series[0][keep], series[1][keep], th)
    return ends["end"] / ends["start"] if ends["start"] > 0 else math.nan


def _conflict_harm(run: Run, th: Thresholds, pair: tuple[str, str], judged: np.ndarray,
                   role: dict[str, str]) -> dict:
    """Whether a conflict holds a loss back: it stalls (or rises) while the other falls, or
    the weighted gradients of all losses cancel on the shared parameters."""
    lo, hi = int(judged[0]), int(judged[-1])
    ratios = {name: _loss_ratio(run, name, lo, hi, th) for name in pair}
    stalled = []
    for name, other in (pair, pair[::-1]):
        # An adversary that does not fall is doing its job (the features defeat it).
        if role.get(name) != "adversarial" and ratios[name] >= th.conflict_stall_fraction and \
                ratios[other] < th.conflict_stall_fraction:
            stalled.append(name)
    cancel = math.nan
    parts = [get(run, "weighted_grad_norm", n) for n in run.losses]
    combined = get(run, "combined_grad_norm", "shared")
    if combined is not None and all(p is not None for p in parts):
        steps, (total, *norms) = align(combined, *parts)
        at = np.isin(steps, judged)
        with np.errstate(divide="ignore", invalid="ignore"):
            cancel = median((total / np.sum(norms, axis=0))[at])
    cancelled = bool(cancel <= th.conflict_cancel_ratio)
    return {"loss_ratios": ratios, "stalled": stalled, "cancel_ratio": cancel,
            "cancelled": cancelled, "suffering": list(pair) if cancelled else stalled}


# ------------------------------------------------------------------ representation-collapse

def representation_collapse(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    role = roles(run)
    kl_losses = [n for n, r in role.items() if r == "kl"]
    for z in run.names("rankme_centred"):
        rank = finite(get(run, "rankme_centred", z))
        if rank is None or len(rank[0]) < 2 * th.min_points:
            continue
        steps, r = rank
        k = window_size(len(r), th)
        peak = nanmax(rolling_median(r, th.smooth_points))
        end = median(r[-k:])
        # Centring moves the isotropic sample's RankMe by O(1/n): the recorded one serves.
        iso_s = get(run, "effective_rank_isotropic", z)
        iso = median(iso_s[1]) if iso_s is not None else math.nan
        d = median(get(run, "latent_dim", z)[1]) if run.has("latent_dim", z) else math.nan
        # Centred measures only: a common offset that grows (a drifting mean) is no collapse.
        rank_limit = th.collapse_peak_fraction * peak
        if math.isfinite(iso):
            rank_limit = min(rank_limit, th.collapse_rank_fraction * iso)
        classes = nanmax(get(run, "latent_classes", z)[1]) if run.has("latent_classes", z) \
            else math.nan
        if classes >= 2:
            # Neural collapse (Papyan et al. 2020): a supervised latent's class means span
            # classes - 1 directions; a rank settling there is the geometry training aims at.
            rank_limit = min(rank_limit, th.collapse_class_fraction * (classes - 1))
        held = r <= rank_limit
        rank_cond = end <= rank_limit
        point = _collapse_to_a_point(run, z, d, steps, th)
        active = _inactive_units(run, z, d, kl_losses, steps, th)
        if point["held"] is not None:
            held = held | point["held"] if rank_cond else point["held"]
        if active["held"] is not None:
            held = held | active["held"] if rank_cond or point["condition"] else active["held"]
        if not (rank_cond or point["condition"] or active["condition"]):
            continue
        severity = "error" if end <= th.collapse_error_rank or point["condition"] or \
            active.get("active_end") == 0 else "warning"
        evidence = {
            "latent": z, "dim": d, "rank_peak": peak, "rank_end": end,
            "rank_isotropic": iso, "classes": classes if classes >= 2 else None,
            "rank_limit": rank_limit, "rank_condition": bool(rank_cond),
            "point_condition": point["condition"], "active_units_condition": active["condition"],
            "end_steps": [int(steps[-k]), int(steps[-1])],
            "thresholds": {"peak_fraction": th.collapse_peak_fraction,
                           "rank_fraction": th.collapse_rank_fraction,
                           "class_fraction": th.collapse_class_fraction,
                           "std_fraction": th.collapse_std_fraction,
                           "active_fraction": th.collapse_active_fraction},
            "rankme_centred": thin(steps, r),
            **{key: v for key, v in {**point, **active}.items()
               if key not in ("held", "condition")},
        }
        if active["condition"]:
            what = f"{g(active['active_end'])} of {g(d)} units active (posterior collapse under " \
                f"{', '.join(repr(n) for n in active['kl_losses'])})"
            key = f"active units {g(active['active_end'])} of {g(d)}"
            plot = {"quantity": "active_units", "names": [z], "threshold": active["active_limit"],
                    "ratio_to": None}
        elif point["condition"]:
            spread = point["variance_end"] / point["variance_peak"]
            what = f"its spread shrank to {pct(spread)} of its peak and its normalised std to " \
                f"{g(point['normalized_std_end'])} (healthy " \
                f"{g(point['healthy_normalized_std'])}): all inputs map to one point"
            key = f"spread x{g(spread)} of peak"
            plot = {"quantity": "normalized_std", "names": [z],
                    "threshold": point["std_limit"] / math.sqrt(d), "ratio_to": None}
        else:
            what = f"centred RankMe fell from {g(peak)} to {g(end)} (isotropic {g(iso)}, " \
                f"dim {g(d)}" + (f", {g(classes)} classes" if classes >= 2 else "") + ")"
            key = f"rank {g(end)} of {g(d)}"
            plot = {"quantity": "rankme_centred", "names": [z], "threshold": rank_limit,
                    "ratio_to": None}
        out.append(_finding(
            "representation-collapse", severity, f"latent '{z}' collapsed: {what}", z,
            key, evidence, trailing_range(steps, held), plot=plot,
            remedy=_collapse_remedy(role, active["condition"])))
    return out


def _collapse_to_a_point(run: Run, z: str, d: float, steps: np.ndarray,
                         th: Thresholds) -> dict:
    """Every input mapped to (nearly) one vector: the rows' directions concentrate (SimSiam's
    normalised std falls) and their spread itself shrinks. A mean that drifts away from a
    spread that stays lowers the normalised std too; it keeps its total variance."""
    std_s = finite(get(run, "normalized_std", z))
    var_s = finite(get(run, "total_variance", z))
    if std_s is None or var_s is None or not (math.isfinite(d) and d > 0) or \
            len(var_s[0]) < th.min_points:
        return {"condition": False, "held": None}
    scaled = std_s[1] * math.sqrt(d)
    s_peak = nanmax(rolling_median(scaled, th.smooth_points))
    v_peak = nanmax(rolling_median(var_s[1], th.smooth_points))
    std_limit = min(th.collapse_peak_fraction * s_peak, th.collapse_std_fraction)
    var_limit = th.collapse_peak_fraction * v_peak
    s_end, v_end = _end((std_s[0], scaled), th), _end(var_s, th)
    held = (np.interp(steps, std_s[0], scaled) <= std_limit) & \
        (np.interp(steps, var_s[0], var_s[1]) <= var_limit)
    return {"condition": bool(s_end <= std_limit and v_end <= var_limit), "held": held,
            "std_limit": std_limit, "std_scaled_peak": s_peak, "std_scaled_end": s_end,
            "normalized_std_end": s_end / math.sqrt(d), "healthy_normalized_std": 1 / math.sqrt(d),
            "variance_peak": v_peak, "variance_end": v_end,
            "normalized_std": thin(std_s[0], std_s[1]), "total_variance": thin(*var_s)}


def _inactive_units(run: Run, z: str, d: float, kl_losses: list[str], steps: np.ndarray,
                    th: Thresholds) -> dict:
    """Posterior collapse: with a KL term to a unit prior, (almost) no unit of the latent
    varies with the input any more (active units, Burda et al. 2016)."""
    units = finite(get(run, "active_units", z))
    if not kl_losses or units is None or not (math.isfinite(d) and d > 0) or \
            len(units[0]) < th.min_points:
        return {"condition": False, "held": None}
    reached = [n for n in kl_losses
               if not run.has("latent_grad_norm", f"{z}|{n}")
               or nanmax(run.series("latent_grad_norm", f"{z}|{n}")[1]) > 0]
    if not reached:
        return {"condition": False, "held": None}  # the KL term does not act on this latent
    limit = th.collapse_active_fraction * d
    a_end = _end(units, th)
    return {"condition": bool(a_end <= limit), "held": np.interp(steps, *units) <= limit,
            "active_end": a_end, "active_peak": nanmax(units[1]), "active_limit": limit,
            "kl_losses": reached, "active_units": thin(*units)}


def _collapse_remedy(role: dict[str, str], posterior: bool) -> str:
    """What prevents collapse depends on the losses the model has."""
    present = set(role.values())
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
    parts.append("balance the losses so that no contracting loss dominates "
                 "(gradprobe.remedies.GradNormBalancer)")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


# ----------------------------------------------------------------- weak-contrastive-signal

def _groups_per_batch(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    return finite(get(run, "groups_per_batch", "batch"))


def weak_contrastive_signal(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    watches = run.names("contrastive_loss_ratio")
    gpb = _groups_per_batch(run)
    for c in watches:
        evidence: dict = {"watch": c}
        reasons = []
        steps_range = None
        share = finite(get(run, "contrastive_same_group_share", c))
        single = None
        if share is not None and len(share[0]) >= th.min_points:
            s, v = share
            held = v >= th.contrastive_same_group_share
            evidence["median_same_group_share"] = median(v)
            if persistent(s, held, None, th):
                reasons.append(f"{pct(median(v))} of its negatives come from the anchor's own "
                               "group")
                steps_range = held_range(s, held)
        elif gpb is not None and len(gpb[0]) >= th.min_points:
            s, v = gpb
            held = v <= 1
            if persistent(s, held, None, th):
                single = True
                reasons.append("every batch holds a single group, so all negatives share the "
                               "anchor's group")
                steps_range = held_range(s, held)
        if gpb is not None:
            evidence["median_groups_per_batch"] = median(gpb[1])
        ratio = finite(get(run, "contrastive_loss_ratio", c))
        gap = finite(get(run, "contrastive_gap", c))
        if ratio is not None and gap is not None and len(ratio[0]) >= th.min_points:
            r_end = start_end(*ratio, th)
            gp_end = start_end(*gap, th)
            evidence.update(loss_ratio_end=r_end["end"], gap_end=gp_end["end"],
                            end_steps=r_end["end_steps"], gap=thin(*gap),
                            loss_ratio=thin(*ratio))
            if r_end["end"] >= th.contrastive_loss_ratio and gp_end["end"] <= th.contrastive_gap:
                reasons.append(f"the positive/negative gap is {g(gp_end['end'])} and the loss is "
                               f"{pct(r_end['end'])} of chance")
                steps_range = steps_range or tuple(r_end["end_steps"])
        if not reasons:
            continue
        evidence["single_group_batches"] = single
        evidence["thresholds"] = {"same_group_share": th.contrastive_same_group_share,
                                  "loss_ratio": th.contrastive_loss_ratio,
                                  "gap": th.contrastive_gap}
        key = f"same-group {pct(evidence['median_same_group_share'])}" \
            if "median_same_group_share" in evidence and evidence["median_same_group_share"] \
            >= th.contrastive_same_group_share else f"gap {g(evidence.get('gap_end', math.nan))}"
        out.append(_finding(
            "weak-contrastive-signal", "warning",
            f"contrastive '{c}' gets a weak signal: " + "; ".join(reasons), c, key, evidence,
            steps_range,
            plot={"quantity": "contrastive_same_group_share" if share is not None
                  else "contrastive_gap", "names": [c], "threshold": None, "ratio_to": None}))
    if watches or gpb is None or len(gpb[0]) < th.min_points:
        return out
    # No contrastive watch: judge the contrastive losses by the batch composition alone.
    s, v = gpb
    held = v <= 1
    if not persistent(s, held, None, th):
        return out
    for name, role in roles(run).items():
        if role != "contrastive":
            continue
        evidence = {"loss": name, "median_groups_per_batch": median(v),
                    "single_group_share": held_share(s, held), "groups_per_batch": thin(s, v),
                    "single_group_batches": True}
        out.append(_finding(
            "weak-contrastive-signal", "warning",
            f"contrastive loss '{name}' sees single-group batches: all its in-batch negatives "
            "come from the anchor's own group",
            name, f"groups/batch {g(median(v))}", evidence, held_range(s, held),
            plot={"quantity": "groups_per_batch", "names": ["batch"], "threshold": 1.0,
                  "ratio_to": None}))
    return out


# ------------------------------------------------------------------------- prototype-stale

def prototype_stale(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    for p in run.names("prototype_drift"):
        drift = finite(get(run, "prototype_drift", p))
        if drift is None or len(drift[0]) < th.min_points:
            continue
        steps, d = drift
        still = d <= th.stale_drift
        shift = finite(get(run, "prototype_target_shift", p))
        if shift is not None:
            common, (dv, sv) = align((steps, d), shift)
            steps, d = common, dv
            still = dv <= th.stale_drift
            judged = sv > th.stale_min_target_shift
        else:
            judged = np.ones(len(steps), dtype=bool)
            sv = None
        held = still & judged
        if not persistent(steps, held, judged, th):
            continue
        share = held_share(steps, held, judged)
        never = bool(held[judged].all())
        since = get(run, "prototype_steps_since_moved", p)
        lag = finite(get(run, "prototype_lag", p))
        evidence = {
            "prototypes": p, "still_share": share, "judged_steps": int(judged.sum()),
            "never_moved": never, "median_drift": median(d[judged]),
            "median_target_shift": median(sv[judged]) if sv is not None else None,
            "latent_watched": sv is not None,
            "max_steps_since_moved": nanmax(since[1]) if since is not None else None,
            "lag_start": start_end(*lag, th)["start"] if lag is not None else None,
            "lag_end": start_end(*lag, th)["end"] if lag is not None else None,
            "thresholds": {"drift": th.stale_drift, "target_shift": th.stale_min_target_shift},
            "drift": thin(steps, d),
        }
        if sv is not None:
            evidence["target_shift"] = thin(steps, sv)
        moved = "the latent they summarise moved" if sv is not None else \
            "(their latent is not watched)"
        what = "never moved" if never else f"did not move on {pct(share)} of probe steps"
        out.append(_finding(
            "prototype-stale", "error" if never else "warning",
            f"prototypes '{p}' {what} while {moved}" if sv is not None else
            f"prototypes '{p}' {what} {moved}",
            p, f"still {pct(share)} of steps", evidence, held_range(steps, held),
            plot={"quantity": "prototype_drift", "names": [p], "threshold": th.stale_drift,
                  "ratio_to": None}))
    return out


# ---------------------------------------------------------------------- prototype-collapse

def prototype_collapse(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    latents = run.meta.get("prototypes") or {}
    gpb = _groups_per_batch(run)
    for p in run.names("prototype_mean_distance"):
        mean_d = finite(get(run, "prototype_mean_distance", p))
        if mean_d is None or len(mean_d[0]) < 2 * th.min_points:
            continue
        steps, md = mean_d
        scale_note = "absolute"
        latent = latents.get(p)
        norm = get(run, "latent_norm", latent) if latent else None
        if norm is not None:
            scale = np.interp(steps, norm[0], norm[1])
            with np.errstate(divide="ignore", invalid="ignore"):
                md = np.where(scale > 0, md / scale, np.nan)
            scale_note = f"relative to the norm of '{latent}'"
        k = window_size(len(steps), th)
        peak = nanmax(rolling_median(md, th.smooth_points))
        end = median(md[-k:])
        reasons, severity = [], "warning"
        evidence: dict = {"prototypes": p, "distance_scale": scale_note,
                          "mean_distance_peak": peak, "mean_distance_end": end,
                          "end_steps": [int(steps[-k]), int(steps[-1])],
                          "thresholds": {"collapse_fraction": th.proto_collapse_fraction,
                                         "merge_fraction": th.proto_merge_fraction,
                                         "usage": th.proto_usage}}
        held = np.zeros(len(steps), dtype=bool)
        if peak > 0 and end <= th.proto_collapse_fraction * peak:
            reasons.append(f"their mean distance fell to {pct(end / peak)} of its peak")
            severity = "error"
            held |= md <= th.proto_collapse_fraction * peak
        min_d = finite(get(run, "prototype_min_distance", p))
        if min_d is not None:
            _, (mn, mean_raw) = align(min_d, get(run, "prototype_mean_distance", p))
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(mean_raw > 0, mn / mean_raw, np.nan)
            rel_end = median(rel[-window_size(len(rel), th):])
            evidence["min_over_mean_distance_end"] = rel_end
            if rel_end <= th.proto_merge_fraction:
                reasons.append(f"two of them merged (closest pair at {pct(rel_end)} of the mean "
                               "distance)")
                held |= np.interp(steps, min_d[0], rel) <= th.proto_merge_fraction
        usage = finite(get(run, "prototype_usage", p))
        mixed = gpb is not None and median(gpb[1]) >= 2
        if usage is not None and mixed and len(usage[0]) >= th.min_points:
            u_end = start_end(*usage, th)["end"]
            evidence["usage_end"] = u_end
            if u_end <= th.proto_usage:
                reasons.append(f"usage entropy is {g(u_end)} on mixed batches")
                held |= np.interp(steps, usage[0], usage[1]) <= th.proto_usage
        rank = finite(get(run, "prototype_rank", p))
        if rank is not None:
            evidence["rank_end"] = start_end(*rank, th)["end"]
        if not reasons:
            continue
        evidence["mean_distance"] = thin(steps, md)
        out.append(_finding(
            "prototype-collapse", severity, f"prototypes '{p}' collapse: " + "; ".join(reasons),
            p, f"mean distance x{g(end / peak if peak > 0 else math.nan)} of peak", evidence,
            trailing_range(steps, held),
            plot={"quantity": "prototype_mean_distance", "names": [p], "threshold": None,
                  "ratio_to": None}))
    return out


# ------------------------------------------------------------------ orthogonality-vanishing

def _orthogonality_losses(run: Run) -> list[str]:
    return [n for n, r in roles(run).items() if r == "orthogonality"]


def orthogonality_vanishing(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    orth = _orthogonality_losses(run)
    orth_grads = {}
    for name in orth:
        s = finite(get(run, "grad_norm", name))
        if s is not None and len(s[0]) >= th.min_points:
            peak = nanmax(rolling_median(s[1], th.smooth_points))
            orth_grads[name] = {"peak": peak, "end": start_end(*s, th)["end"]}
    for z in run.names("latent_norm"):
        series = finite(get(run, "latent_norm", z))
        if series is None or len(series[0]) < 2 * th.min_points:
            continue
        steps, v = series
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
        out.append(_finding(
            "orthogonality-vanishing", severity,
            f"latent '{z}' shrinks towards 0: its norm fell to {pct(end / peak)} of its "
            f"peak{tail}", z, f"norm x{g(end / peak)} of peak", evidence,
            trailing_range(steps, held),
            plot={"quantity": "latent_norm", "names": [z],
                  "threshold": th.vanishing_norm_fraction * peak, "ratio_to": None}))
    out.extend(_unnormalised_orthogonality(run, th, orth))
    return out


def _unnormalised_orthogonality(run: Run, th: Thresholds, orth: list[str]) -> list[Finding]:
    """An orthogonality loss whose value tracks |z_a|^2 |z_b|^2: it measures scale, not angle."""
    out = []
    pairs = [p for p in run.names("cka")] or []
    latents = run.names("latent_norm")
    if not pairs and len(latents) >= 2:
        pairs = [f"{latents[0]}|{latents[1]}"]
    for name in orth:
        loss = finite(get(run, "loss", name))
        if loss is None:
            continue
        for pair in pairs:
            a, _, b = pair.partition("|")
            na, nb = get(run, "latent_norm", a), get(run, "latent_norm", b)
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
            corr = float(np.corrcoef(np.log(lv[keep]), np.log(scale[keep]))[0, 1])
            if not corr >= th.unnormalised_correlation:
                continue
            evidence = {"loss": name, "latents": [a, b], "log_correlation": corr,
                        "norm_product_range": spread,
                        "thresholds": {"correlation": th.unnormalised_correlation,
                                       "range": th.unnormalised_norm_range},
                        "loss_values": thin(steps[keep], lv[keep])}
            out.append(_finding(
                "orthogonality-vanishing", "warning",
                f"orthogonality loss '{name}' is not normalised: it follows |{a}|^2 |{b}|^2 "
                f"(log correlation {g(corr)}) over a {g(spread)}x range",
                name, f"log corr {g(corr, 2)}", evidence,
                (int(steps[keep][0]), int(steps[keep][-1])),
                plot={"quantity": "loss", "names": [name], "threshold": None, "ratio_to": None}))
            break
    return out


# ------------------------------------------------------------------------ latent-dependence

def latent_dependence(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    decoupling = [n for n, r in roles(run).items()
                  if r in ("orthogonality", "decorrelation", "adversarial")]
    for pair in sorted(set(run.names("cka")) | set(run.names("max_abs_correlation"))):
        cka = finite(get(run, "cka", pair))
        corr = finite(get(run, "max_abs_correlation", pair))
        null = get(run, "max_abs_correlation_null", pair)
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
        a, _, b = pair.partition("|")
        evidence["held_share"] = held_share(steps, held)
        severity = "warning" if decoupling else "info"
        cka_txt = f"CKA {g(evidence['median_cka'])}" if "median_cka" in evidence else \
            f"max |corr| {g(evidence['median_max_abs_correlation'])}"
        out.append(_finding(
            "latent-dependence", severity,
            f"'{a}' and '{b}' stay dependent: {cka_txt} (median) over "
            f"{pct(evidence['held_share'])} of the run", pair, cka_txt, evidence, held_range(steps, held),
            plot={"quantity": "cka" if cka is not None else "max_abs_correlation",
                  "names": [pair], "threshold": th.dependence_cka if cka is not None else None,
                  "ratio_to": None}))
    return out


# ----------------------------------------------------------------------- sigmoid-saturation

def sigmoid_saturation(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    for s in run.names("saturated_fraction"):
        series = finite(get(run, "saturated_fraction", s))
        if series is None or len(series[0]) < th.min_points:
            continue
        steps, v = series
        held = v >= th.saturation_fraction
        med = median(v)
        evidence: dict = {"watch": s, "median_saturated_fraction": med,
                          "held_share": held_share(steps, held),
                          "thresholds": {"fraction": th.saturation_fraction,
                                         "wrong_fraction": th.saturation_wrong_fraction,
                                         "error_fraction": th.saturation_error_fraction,
                                         "energy_ratio": th.saturation_energy_ratio},
                          "saturated_fraction": thin(steps, v)}
        grad = finite(get(run, "mean_sigmoid_grad", s))
        if grad is not None:
            evidence["median_sigmoid_grad"] = median(grad[1])
        thr = get(run, "saturation_threshold", s)
        if thr is not None:
            evidence["saturation_threshold"] = median(thr[1])
        temp = finite(get(run, "temperature", s))
        fixed = None
        if temp is not None:
            fixed = bool(np.ptp(temp[1]) <= 1e-12 * max(1.0, abs(float(temp[1][0]))))
            evidence.update(temperature_start=float(temp[1][0]),
                            temperature_end=float(temp[1][-1]), temperature_fixed=fixed)
        energy = finite(get(run, "energy_scale_ratio", s))
        if energy is not None:
            evidence["median_energy_scale_ratio"] = median(energy[1])
        extra = []
        if fixed:
            extra.append(f"temperature fixed at {g(float(temp[1][0]))}")
        if energy is not None and median(energy[1]) >= th.saturation_energy_ratio:
            extra.append(f"energy terms differ {g(median(energy[1]))}x in scale")
        causes = " (" + "; ".join(extra) + ")" if extra else ""
        wrong = finite(get(run, "saturated_wrong_fraction", s))
        harmful = False
        if wrong is not None and len(wrong[0]) >= th.min_points:
            w_steps, wv = wrong
            wrong_held = wv >= th.saturation_wrong_fraction
            w_end = _end(wrong, th)
            evidence.update(median_saturated_wrong_fraction=median(wv),
                            saturated_wrong_fraction_end=w_end,
                            saturated_wrong_fraction=thin(w_steps, wv))
            # Harm is what stays wrong: cross-entropy corrects a saturated start, so only the
            # end of the run counts.
            harmful = w_end >= th.saturation_wrong_fraction
        plot = {"quantity": "saturated_fraction", "names": [s],
                "threshold": th.saturation_fraction, "ratio_to": None}
        if harmful:
            severity = "error" if med >= th.saturation_error_fraction else "warning"
            out.append(_finding(
                "sigmoid-saturation", severity,
                f"sigmoid '{s}' stays saturated on the wrong side of its targets: "
                f"{pct(w_end)} of its inputs at the end ({pct(med)} saturated in all)"
                + causes, s, f"wrong and saturated {pct(w_end)}", evidence,
                trailing_range(w_steps, wrong_held), plot=plot))
        elif persistent(steps, held, None, th):
            verdict = "towards its targets (harmless: their gradient has nothing left to do)" \
                if wrong is not None else \
                "(harm not judged: pass target= to watch_saturation to tell a saturation " \
                "towards the targets from one against them)"
            out.append(_finding(
                "sigmoid-saturation", "info",
                f"sigmoid '{s}' is saturated {verdict}: {pct(med)} of its inputs lie in the "
                "flat region" + causes, s, f"saturated {pct(med)} (median)", evidence,
                held_range(steps, held), plot=plot))
        elif energy is not None and median(energy[1]) >= th.saturation_energy_ratio:
            out.append(_finding(
                "sigmoid-saturation", "info",
                f"energy terms of sigmoid '{s}' differ {g(median(energy[1]))}x in scale (not "
                "saturated yet)", s, f"scale ratio {g(median(energy[1]))}", evidence,
                (int(energy[0][0]), int(energy[0][-1])),
                plot={"quantity": "energy_scale_ratio", "names": [s],
                      "threshold": th.saturation_energy_ratio, "ratio_to": None}))
    return out


# --------------------------------------------------------------------- static-loss-weights

def static_loss_weights(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    """Fixed weights of the losses that the earlier swamping and harmful-conflict findings
    show suffering (read from ``earlier``, not judged again)."""
    constant: dict[str, float] = {}
    for name in run.losses:
        series = finite(get(run, "weight", name))
        if series is None or len(series[0]) < th.min_points:
            continue
        w = series[1]
        scale = max(float(np.abs(w).max()), 1e-300)
        if float(np.ptp(w)) <= th.static_weight_tolerance * scale and w[0] != 0:
            constant[name] = float(w[0])
    related, reasons = [], []
    for f in earlier:
        if f.id == "gradient-swamping":
            suffering = [f.subject]
            dominant = f.evidence.get("dominant")
            against = f"swamped by '{dominant}'" + (
                f" (weight {g(constant[dominant])})" if dominant in constant else "")
        elif f.id == "gradient-conflict" and f.severity != "info":
            suffering = list(f.evidence.get("suffering") or [])
            against = "held back by its conflict with " + " and ".join(
                f"'{n}'" for n in f.subject.split("|") if n not in suffering) \
                if len(suffering) == 1 else "cancelled by their conflict"
        else:
            continue
        hit = [n for n in suffering if n in constant]
        if hit:
            related.append({"id": f.id, "subject": f.subject, "static": hit,
                            "steps": list(f.steps) if f.steps else None})
            reasons.append(f"{' and '.join(repr(n) for n in hit)} "
                           f"{'is' if len(hit) == 1 else 'are'} {against}")
    if not related:
        return []
    names = sorted({n for r in related for n in r["static"]})
    steps = run.probe_steps()
    evidence = {"weights": {n: constant[n] for n in names},
                "other_constant_weights": {n: w for n, w in constant.items() if n not in names},
                "related_findings": related, "tolerance": th.static_weight_tolerance}
    ws = ", ".join(f"{n}={g(constant[n])}" for n in names)
    return [_finding(
        "static-loss-weights", "warning",
        f"weight{'s' if len(names) > 1 else ''} {ws} fixed for the whole run while "
        + "; ".join(dict.fromkeys(reasons)),
        ",".join(names), ws, evidence,
        (int(steps[0]), int(steps[-1])) if len(steps) else None,
        plot={"quantity": "weight", "names": names, "threshold": None, "ratio_to": None})]


# -------------------------------------------------------------- batch-composition-mismatch

def batch_composition_mismatch(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    expect = run.meta.get("expect_groups_per_batch")
    gpb = _groups_per_batch(run)
    if expect is None or gpb is None or len(gpb[0]) < th.min_points:
        return []
    expect = int(expect)
    steps, v = gpb
    held = ((v <= 1) != (expect <= 1)) | (v > expect)
    if not persistent(steps, held, None, th):
        return []
    med = median(v)
    share = held_share(steps, held)
    if expect <= 1:
        title = f"batches were declared single-group but mix {g(med)} groups (median): the " \
                "sampler did not take effect"
        severity = "error"
    elif med <= 1:
        title = f"batches were declared to mix {expect} groups but hold a single group"
        severity = "warning"
    else:
        title = f"batches hold {g(med)} groups (median), {expect} were declared"
        severity = "warning"
    evidence = {"declared": expect, "median_observed": med, "max_observed": nanmax(v),
                "min_observed": float(np.min(v)), "mismatch_share": share,
                "groups_per_batch": thin(steps, v)}
    entropy = finite(get(run, "group_entropy", "batch"))
    if entropy is not None:
        evidence["median_group_entropy"] = median(entropy[1])
    return [_finding(
        "batch-composition-mismatch", severity, title, "batch",
        f"{g(med)} groups/batch vs {expect} declared", evidence, held_range(steps, held),
        plot={"quantity": "groups_per_batch", "names": ["batch"], "threshold": float(expect),
              "ratio_to": None})]


# ------------------------------------------------------------------------------ overfitting

# Logged validation series where higher is better: not losses, so a rise is not overfitting.
_SCORE_WORDS = ("acc", "auc", "f1", "precision", "recall", "score", "iou", "map")


def overfitting(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    task = task_name(run)
    for val in run.names("logged"):
        lowered = val.lower()
        if not lowered.startswith("val") or any(word in lowered for word in _SCORE_WORDS):
            continue
        series = finite(get(run, "logged", val))
        if series is None or len(series[0]) < 2 * th.min_points:
            continue
        vs, vv = series
        smooth = rolling_median(vv, th.smooth_points)
        i_min = int(np.nanargmin(smooth))
        v_min = float(smooth[i_min])
        if not v_min > 0 or len(vv) - 1 - i_min < th.min_points:
            continue
        v_end = median(vv[-window_size(len(vv), th):])
        rise = v_end / v_min - 1.0
        if not rise >= th.overfit_val_rise:
            continue
        stem = val[3:].lstrip("_-.:/ ")
        train_name = stem if stem in run.losses else task
        train = finite(get(run, "loss", train_name)) if train_name else None
        if train is None or len(train[0]) < 2 * th.min_points:
            continue
        ts, tv = train
        t_smooth = rolling_median(tv, th.smooth_points)
        t_at_min = float(np.interp(vs[i_min], ts, t_smooth))
        t_end = start_end(ts, tv, th)["end"]
        if not (t_at_min > 0 and t_end <= (1.0 - th.overfit_train_drop) * t_at_min):
            continue
        severity = "error" if rise >= th.overfit_error_rise else "warning"
        evidence = {"validation": val, "training": train_name, "val_min": v_min,
                    "val_min_step": int(vs[i_min]), "val_end": v_end, "val_rise": rise,
                    "train_at_val_min": t_at_min, "train_end": t_end,
                    "train_drop": 1.0 - t_end / t_at_min,
                    "thresholds": {"val_rise": th.overfit_val_rise,
                                   "train_drop": th.overfit_train_drop},
                    "val_curve": thin(vs, vv), "train_curve": thin(ts, tv)}
        out.append(_finding(
            "overfitting", severity,
            f"'{val}' rose {pct(rise)} above its minimum (step {int(vs[i_min])}) while "
            f"'{train_name}' kept falling ({pct(1.0 - t_end / t_at_min)} lower)",
            val, f"val +{pct(rise)}", evidence, (int(vs[i_min]), int(vs[-1])),
            plot={"quantity": "logged", "names": [val], "threshold": v_min, "ratio_to": None}))
    return out


# ------------------------------------------------------------------------------ inert-loss

def inert_loss(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    role = roles(run)
    # A regulariser may touch only its own parameters (an L2 penalty on one head) by design;
    # that it misses the shared ones is no wiring fault. A fully inert one still is.
    local_by_design = {n for n in run.losses if role[n] in th.exempt_roles}
    out, seen = [], set()
    for kind, severity in (("inert_loss", "error"), ("no_shared_path", "warning")):
        by_name: dict[str, list[dict]] = {}
        for e in run.events(kind):
            by_name.setdefault(e["name"], []).append(e)
        for name, events in by_name.items():
            if name in seen or (kind == "no_shared_path" and name in local_by_design):
                continue
            seen.add(name)
            grad = finite(get(run, "grad_norm", name))
            evidence = {"loss": name, "event": kind, "events": len(events),
                        "first_step": int(events[0]["step"]), "last_step": int(events[-1]["step"]),
                        "message": events[0]["message"],
                        "max_grad_norm": nanmax(grad[1]) if grad is not None else None}
            out.append(_finding(
                "inert-loss", severity, " ".join(str(events[0]["message"]).split()), name,
                f"{len(events)} probe steps", evidence,
                (int(events[0]["step"]), int(events[-1]["step"])),
                plot={"quantity": "grad_norm", "names": [name], "threshold": None,
                      "ratio_to": None}))
    for name in run.losses:
        if name in seen or name in local_by_design:
            continue
        grad = finite(get(run, "grad_norm", name))
        if grad is None or len(grad[0]) < th.min_points:
            continue
        if float(np.abs(grad[1]).max()) == 0.0:
            evidence = {"loss": name, "event": None, "probe_steps": int(len(grad[0])),
                        "max_grad_norm": 0.0}
            out.append(_finding(
                "inert-loss", "warning",
                f"loss '{name}' has a zero gradient on the shared parameters at every probe step",
                name, "grad norm 0", evidence, (int(grad[0][0]), int(grad[0][-1])),
                plot={"quantity": "grad_norm", "names": [name], "threshold": None,
                      "ratio_to": None}))
    return out


# ------------------------------------------------------------------------------ non-finite

def non_finite(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    found: dict[str, dict] = {}
    for e in run.events("non_finite"):
        entry = found.setdefault(e["name"], {"first_step": int(e["step"]), "count": 0,
                                             "message": e["message"], "source": "event"})
        entry["count"] += 1
        entry["last_step"] = int(e["step"])
    for q in ("loss", "grad_norm", "weighted_grad_norm"):
        for name in run.names(q):
            s, v = run.series(q, name)
            bad = ~np.isfinite(v)
            if not bad.any():
                continue
            key = name if q == "loss" else "gradient"
            entry = found.get(key)
            first = int(s[bad][0])
            if entry is None:
                found[key] = {"first_step": first, "count": int(bad.sum()),
                              "last_step": int(s[bad][-1]),
                              "message": f"{q} of {name!r} is {v[bad][0]}", "source": q}
            else:
                entry["first_step"] = min(entry["first_step"], first)
    disabled = run.events("probe_disabled")
    out = []
    for name, entry in found.items():
        evidence = {"name": name, **entry}
        if disabled:
            evidence["probe_disabled_at"] = int(disabled[0]["step"])
            evidence["probe_disabled_message"] = disabled[0]["message"]
        kind = "loss" if name in run.losses else ("gradient" if name == "gradient" else "watch")
        subject = f"loss '{name}'" if kind == "loss" else \
            ("a per-loss gradient" if kind == "gradient" else f"'{name}'")
        out.append(_finding(
            "non-finite", "error",
            f"{subject} became NaN/Inf at step {entry['first_step']}", name,
            f"first at step {entry['first_step']}", evidence,
            (entry["first_step"], entry.get("last_step", entry["first_step"])),
            plot={"quantity": "loss" if kind == "loss" else "grad_norm",
                  "names": [name] if kind == "loss" else list(run.losses), "threshold": None,
                  "ratio_to": None}))
    return out


RULES: dict[str, Rule] = {
    "gradient-swamping": gradient_swamping,
    "constraint-neglect": constraint_neglect,
    "gradient-conflict": gradient_conflict,
    "representation-collapse": representation_collapse,
    "weak-contrastive-signal": weak_contrastive_signal,
    "prototype-stale": prototype_stale,
    "prototype-collapse": prototype_collapse,
    "orthogonality-vanishing": orthogonality_vanishing,
    "latent-dependence": latent_dependence,
    "sigmoid-saturation": sigmoid_saturation,
    "static-loss-weights": static_loss_weights,
    "batch-composition-mismatch": batch_composition_mismatch,
    "overfitting": overfitting,
    "inert-loss": inert_loss,
    "non-finite": non_finite,
    "probe-incomplete": probe_incomplete,
}
