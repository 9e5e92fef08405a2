"""Rules on the loss curves and weights: ``constraint-neglect``, ``static-loss-weights``
(which reads the earlier swamping and conflict findings), ``overfitting`` and ``non-finite``."""

from __future__ import annotations

import numpy as np

from gradprobe.record import Run, pair_parts
from gradprobe.record.quantities import GRAD_NORM, LOGGED, LOSS, WEIGHT, WEIGHTED_GRAD_NORM

from .._series import (finite, g, get, is_fixed_weight, level_after_start, median, pct, roles,
                       rolling_median, start_end, start_low, task_name, thin, window_size)
from ..findings import Finding, PlotHint
from ..thresholds import Thresholds
from .common import Earlier, make_finding, satisfied_constraints
from .purpose import objective_of_its_own
from .remedies import neglected_objective_remedy, static_weights_remedy


def constraint_neglect(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    task = task_name(run)
    task_series = finite(get(run, LOSS, task)) if task else None
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
    satisfied = satisfied_constraints(run, th)
    swamped = {f.subject for f in earlier if f.id == "gradient-swamping" and f.severity != "info"}
    for name, role in roles(run).items():
        # A loss with no constraint role is judged when its graph shows an objective of its
        # own (a boundary term) and its gradient is swamped: swamping says neglect, not the
        # equilibrium of a trade-off.
        from_graph = role not in th.constraint_roles and name in swamped and \
            objective_of_its_own(run, name)
        if name == task or not (role in th.constraint_roles or from_graph) or name in satisfied:
            continue
        series = finite(get(run, LOSS, name))
        if series is None or len(series[0]) < 2 * th.min_points:
            continue
        c = start_end(*series, th)
        if not c["start"] > 0:
            continue  # a relative judgement needs a positive start
        settled = level_after_start(*series, th)
        low = start_low(*series, th)
        if from_graph:
            # Read from its lowest start level: a zero Dirichlet boundary under a network that
            # outputs ~0 starts at its floor, and the swamping pushes it off (an L-shape
            # Poisson boundary at weight 1e-6: 0.03 at the start, 1.9 at the end, 0.4 of its
            # start-window median). Left unmet: above that level by more than the band
            # neglect_constraint_fraction allows a constraint.
            ratio = c["end"] / low if low > 0 else np.nan
            if not ratio >= 1.0 / th.neglect_constraint_fraction:
                continue
        else:
            ratio = c["end"] / c["start"]
            if not ratio >= th.neglect_constraint_fraction:
                continue
            # A constraint that rose from near its floor to an equilibrium during its start
            # window (a center loss whose centres start at the features' origin) and then fell
            # well below that level is being satisfied, whatever its first value (the rise
            # test of gradient-conflict).
            rose_early = settled >= th.conflict_rise_ratio * low
            if rose_early and c["end"] < th.neglect_settled_fraction * settled:
                continue
        rose = ratio > 1.0
        evidence = {
            "task": task, "constraint": name, "role": role, "own_inputs": from_graph,
            "task_start": t["start"], "task_end": t["end"], "task_ratio": t["end"] / t["start"],
            "constraint_start": c["start"], "constraint_end": c["end"],
            "constraint_ratio": ratio, "constraint_settled": settled, "constraint_start_low": low,
            "settled_ratio": c["end"] / settled if settled > 0 else None,
            "start_steps": c["start_steps"], "end_steps": c["end_steps"],
            "task_near_zero_from": near_zero_from,
            "thresholds": {"task": th.neglect_task_fraction,
                           "constraint": th.neglect_constraint_fraction},
            "task_loss": thin(ts, tv), "constraint_loss": thin(*series),
        }
        verb = "rose" if rose else "stayed high"
        out.append(make_finding(
            "constraint-neglect", "error" if rose else "warning",
            f"'{task}' fell to {pct(t['end'] / t['start'])} of its start while '{name}' {verb} "
            f"({pct(ratio)} of its " + ("lowest start level; it runs the shared layers on "
                                        "inputs of its own, read from its graph: an objective "
                                        "to meet, as a boundary condition is, and it is "
                                        "swamped)" if from_graph else "start)"),
            name, f"task x{g(t['end'] / t['start'])}, {name} x{g(ratio)}", evidence,
            (near_zero_from, int(series[0][-1])),
            plot=PlotHint(LOSS, names=[task, name]),
            remedy=neglected_objective_remedy(name) if from_graph else None))
    return out


def static_loss_weights(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    """Fixed weights of the losses that the earlier swamping and harmful-conflict findings
    show suffering (read from ``earlier``, not judged again; an ``info`` one shows no harm)."""
    constant: dict[str, float] = {}
    for name in run.losses:
        series = finite(get(run, WEIGHT, name))
        if series is None or len(series[0]) < th.min_points:
            continue
        # Fixed wherever it is on: a stage schedule that switches a loss off or on (StableMoE's
        # balance loss at weight 0 once its router is frozen) does not balance it.
        on = series[1][series[1] != 0]
        if len(on) >= th.min_points and is_fixed_weight(on, th.static_weight_tolerance):
            constant[name] = float(on[0])
    related, reasons = [], []
    for f in earlier:
        if f.severity == "info":
            continue
        if f.id == "gradient-swamping":
            suffering = [f.subject]
            dominant = f.evidence.get("dominant")
            against = f"swamped by '{dominant}'" + (
                f" (weight {g(constant[dominant])})" if dominant in constant else "")
        elif f.id == "gradient-conflict":
            suffering = list(f.evidence.get("suffering") or [])
            against = "held back by its conflict with " + " and ".join(
                f"'{n}'" for n in pair_parts(f.subject) if n not in suffering) \
                if len(suffering) == 1 else "held on a compromise plateau by their conflict"
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
    swamped = {r["subject"] for r in related if r["id"] == "gradient-swamping"}
    remedy = static_weights_remedy(
        [f.evidence for f in earlier if f.id == "gradient-swamping" and f.subject in swamped],
        any(r["id"] == "gradient-conflict" for r in related))
    return [make_finding(
        "static-loss-weights", "warning",
        f"weight{'s' if len(names) > 1 else ''} {ws} fixed for the whole run while "
        + "; ".join(dict.fromkeys(reasons)),
        ",".join(names), ws, evidence,
        (int(steps[0]), int(steps[-1])) if len(steps) else None,
        plot=PlotHint(WEIGHT, names=names), remedy=remedy)]


# ------------------------------------------------------------------------------ overfitting

# Logged validation series where higher is better: not losses, so a rise is not overfitting.
_SCORE_WORDS = ("acc", "auc", "f1", "precision", "recall", "score", "iou", "map")


def overfitting(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    task = task_name(run)
    for val in run.names(LOGGED):
        lowered = val.lower()
        if not lowered.startswith("val") or any(word in lowered for word in _SCORE_WORDS):
            continue
        series = finite(get(run, LOGGED, val))
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
        train = finite(get(run, LOSS, train_name)) if train_name else None
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
        out.append(make_finding(
            "overfitting", severity,
            f"'{val}' rose {pct(rise)} above its minimum (step {int(vs[i_min])}) while "
            f"'{train_name}' kept falling ({pct(1.0 - t_end / t_at_min)} lower)",
            val, f"val +{pct(rise)}", evidence, (int(vs[i_min]), int(vs[-1])),
            plot=PlotHint(LOGGED, names=[val], threshold=v_min)))
    return out


def non_finite(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    """One finding per loss or watch that went NaN/Inf, naming what went first (the loss
    itself, or only its gradient on the shared parameters, or a watched quantity) and the
    step: the events the probe recorded, and the loss and gradient-norm series."""
    found: dict[str, dict] = {}

    def note(name: str, step: int, what: str, message: str, count: int = 1,
             last: int | None = None) -> None:
        entry = found.get(name)
        if entry is None:
            found[name] = {"first_step": step, "last_step": step if last is None else last,
                           "count": count, "message": message, "what": what}
            return
        entry["count"] += count
        entry["last_step"] = max(entry["last_step"], step if last is None else last)
        if step < entry["first_step"]:
            entry.update(first_step=step, message=message, what=what)

    for e in run.events("non_finite"):
        name, step = e["name"], int(e["step"])
        if name in run.losses:
            note(name, step, f"loss '{name}'", e["message"])
        elif name != "gradient":  # a per-loss gradient: told apart by the series below
            note(name, step, e["message"].removesuffix(" holds NaN or Inf"), e["message"])
    for quantity in (LOSS, GRAD_NORM, WEIGHTED_GRAD_NORM):
        for name in run.names(quantity):
            s, v = run.series(quantity, name)
            bad = ~np.isfinite(v)
            if bad.any() and not (name in found and found[name]["first_step"] <= s[bad][0]):
                what = f"loss '{name}'" if quantity == LOSS else \
                    f"the gradient of loss '{name}' on the shared parameters"
                note(name, int(s[bad][0]), what, f"{quantity} of '{name}' is not finite",
                     0 if name in found else int(bad.sum()), int(s[bad][-1]))
    gradient_events = [e for e in run.events("non_finite") if e["name"] == "gradient"]
    if gradient_events and not any(n in found for n in run.losses):
        note("gradient", int(gradient_events[0]["step"]),
             "a per-loss gradient on the shared parameters", gradient_events[0]["message"],
             len(gradient_events), int(gradient_events[-1]["step"]))
    disabled = run.events("probe_disabled")
    out = []
    for name, entry in found.items():
        first = entry["first_step"]
        out.append(make_finding(
            "non-finite", "error", f"{entry['what']} became NaN or Inf at step {first}", name,
            f"first at step {first}", _with_disabled({"name": name, **entry}, disabled),
            (first, entry["last_step"]),
            plot=PlotHint(LOSS, names=[name]) if entry["what"] == f"loss '{name}'" else
            PlotHint(GRAD_NORM, names=[name] if name in run.losses else run.losses)))
    at_close = run.events("non_finite_at_close")
    if at_close and not found:  # what went first on a probe step tells it; the parameters follow
        step, message = int(at_close[0]["step"]), at_close[0]["message"]
        evidence = {"name": "parameters", "first_step": step, "last_step": step, "count": 1,
                    "message": message, "what": "the model's parameters"}
        out.append(make_finding(
            "non-finite", "error",
            f"{message} (by step {step}, after the last probe step)", "parameters",
            f"by step {step}", _with_disabled(evidence, disabled), (step, step),
            plot=PlotHint(LOSS, names=run.losses)))
    return out


def _with_disabled(evidence: dict, disabled: list[dict]) -> dict:
    if disabled:
        evidence["probe_disabled_at"] = int(disabled[0]["step"])
        evidence["probe_disabled_message"] = disabled[0]["message"]
    return evidence
