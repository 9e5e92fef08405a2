"""The ``sigmoid-saturation`` rule: a saturated sigmoid is judged on harm (saturated on the
wrong side of its targets), not on saturation alone."""

from __future__ import annotations

import numpy as np

from gradprobe.record import Run
from gradprobe.record.quantities import (ENERGY_SCALE_RATIO, MEAN_SIGMOID_GRAD, SATURATED_FRACTION,
                                         SATURATED_WRONG_CLASS_FRACTION, SATURATED_WRONG_FRACTION,
                                         SATURATION_THRESHOLD_USED, TEMPERATURE)

from .._series import (finite, g, get, held_range, held_share, median, pct, persistent,
                       recorded_series, thin, trailing_range)
from ..findings import Finding, PlotHint
from ..thresholds import Thresholds
from .common import Earlier, make_finding, series_end


def sigmoid_saturation(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    for s, steps, v in recorded_series(run, SATURATED_FRACTION, th.min_points):
        held = v >= th.saturation_fraction
        med = median(v)
        evidence: dict = {"watch": s, "median_saturated_fraction": med,
                          "held_share": held_share(steps, held),
                          "thresholds": {"fraction": th.saturation_fraction,
                                         "wrong_fraction": th.saturation_wrong_fraction,
                                         "wrong_class_fraction":
                                             th.saturation_wrong_class_fraction,
                                         "error_fraction": th.saturation_error_fraction,
                                         "energy_ratio": th.saturation_energy_ratio},
                          "saturated_fraction": thin(steps, v)}
        grad = finite(get(run, MEAN_SIGMOID_GRAD, s))
        if grad is not None:
            evidence["median_sigmoid_grad"] = median(grad[1])
        thr = get(run, SATURATION_THRESHOLD_USED, s)
        if thr is not None:
            evidence["saturation_threshold"] = median(thr[1])
        temp = finite(get(run, TEMPERATURE, s))
        fixed = None
        if temp is not None:
            fixed = bool(np.ptp(temp[1]) <= 1e-12 * max(1.0, abs(float(temp[1][0]))))
            evidence.update(temperature_start=float(temp[1][0]),
                            temperature_end=float(temp[1][-1]), temperature_fixed=fixed)
        energy = finite(get(run, ENERGY_SCALE_RATIO, s))
        if energy is not None:
            evidence["median_energy_scale_ratio"] = median(energy[1])
        extra = []
        if fixed:
            extra.append(f"temperature fixed at {g(float(temp[1][0]))}")
        if energy is not None and median(energy[1]) >= th.saturation_energy_ratio:
            extra.append(f"energy terms differ {g(median(energy[1]))}x in scale")
        causes = " (" + "; ".join(extra) + ")" if extra else ""
        wrong = finite(get(run, SATURATED_WRONG_FRACTION, s))
        harmful = False
        if wrong is not None and len(wrong[0]) >= th.min_points:
            w_steps, wv = wrong
            wrong_held = wv >= th.saturation_wrong_fraction
            w_end = series_end(wrong, th)
            evidence.update(median_saturated_wrong_fraction=median(wv),
                            saturated_wrong_fraction_end=w_end,
                            saturated_wrong_fraction=thin(w_steps, wv))
            # Harm is what stays wrong: cross-entropy corrects a saturated start, so only the
            # end of the run counts.
            harmful = w_end >= th.saturation_wrong_fraction
        # The share over all inputs cannot exceed the rarer class's frequency (n positives
        # among a pairwise sigmoid loss's n^2 logits), so a rare class is judged on its own.
        by_class = finite(get(run, SATURATED_WRONG_CLASS_FRACTION, s))
        rare_class = None
        if by_class is not None and len(by_class[0]) >= th.min_points and not harmful:
            c_end = series_end(by_class, th)
            evidence["saturated_wrong_class_fraction_end"] = c_end
            if c_end >= th.saturation_wrong_class_fraction:
                rare_class = c_end
                w_steps, wrong_held = by_class[0], by_class[1] >= th.saturation_wrong_class_fraction
        plot = PlotHint(SATURATED_FRACTION, names=[s], threshold=th.saturation_fraction)
        if harmful or rare_class is not None:
            severity = "error" if med >= th.saturation_error_fraction else "warning"
            what = f"{pct(w_end)} of its inputs at the end" if harmful else \
                f"{pct(rare_class)} of the inputs of one target class at the end, a class too " \
                f"rare for the share over all inputs ({pct(w_end)}) to show it"
            out.append(make_finding(
                "sigmoid-saturation", severity,
                f"sigmoid '{s}' stays saturated on the wrong side of its targets: {what} "
                f"({pct(med)} saturated in all)" + causes, s,
                f"wrong and saturated {pct(w_end)}" if harmful else
                f"wrong and saturated {pct(rare_class)} of a class", evidence,
                trailing_range(w_steps, wrong_held), plot=plot,
                remedy=_FIXED_TEMPERATURE_REMEDY.format(g(float(temp[1][0]))) if fixed
                else None))
        elif persistent(steps, held, None, th):
            verdict = "towards its targets (harmless: their gradient has nothing left to do)" \
                if wrong is not None else \
                "(harm not judged: pass target= to watch_saturation to tell a saturation " \
                "towards the targets from one against them)"
            out.append(make_finding(
                "sigmoid-saturation", "info",
                f"sigmoid '{s}' is saturated {verdict}: {pct(med)} of its inputs lie in the "
                "flat region" + causes, s, f"saturated {pct(med)} (median)", evidence,
                held_range(steps, held), plot=plot))
        elif energy is not None and median(energy[1]) >= th.saturation_energy_ratio:
            out.append(make_finding(
                "sigmoid-saturation", "info",
                f"energy terms of sigmoid '{s}' differ {g(median(energy[1]))}x in scale (not "
                "saturated yet)", s, f"scale ratio {g(median(energy[1]))}", evidence,
                (int(energy[0][0]), int(energy[0][-1])),
                plot=PlotHint(ENERGY_SCALE_RATIO, names=[s], threshold=th.saturation_energy_ratio)))
    return out


# Where the temperature is recorded fixed, it leads the remedy: a wrong saturation kept to the
# end of the run is no longer corrected by cross-entropy's gradient alone (a pairwise sigmoid
# loss is already a log-sigmoid on the logits).
_FIXED_TEMPERATURE_REMEDY = (
    "Learn the temperature, fixed here at {}, or start it lower "
    "(gradprobe.remedies.LearnableTemperature; SigLIP learns t' and a bias, started at log 10 "
    "and -10), so that wrong outputs leave the flat region; if the loss is not yet "
    "cross-entropy on the logits (binary_cross_entropy_with_logits), make it so; bring energy "
    "terms to one scale (gradprobe.remedies.interaction_energy).")
