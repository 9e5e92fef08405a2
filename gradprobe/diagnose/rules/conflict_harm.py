"""The harm test of ``gradient-conflict``: whether a persistent opposition holds a loss back,
read from the two losses' curves (stall, compromise plateau), a per-task metric the user logged,
and the graph (a term on the other loss's representation, whose trade-off is the design).

Levels are read against references that hold whatever a loss's floor is: a ratio to a start
level (a 3-fold rise from a start-window low, an end over a start) means something only for a
loss whose floor is 0, so a loss that takes negative values is never judged by one; whether a
loss settled above where it began needs no floor at all."""

from __future__ import annotations

import math

import numpy as np

from gradprobe.record import Run, pair_parts
from gradprobe.record.quantities import (COMBINED_GRAD_NORM, LATENT_GRAD_NORM, LOSS, SHARED,
                                         WEIGHTED_GRAD_NORM)

from .._series import (SETTLED_SOURCES, align, at_floor, began, finite, get,
                       level_after_start, median, role_record, start_end, start_low)
from ..thresholds import Thresholds
from .task_metrics import linked_metrics, metric_progress


def _loss_ratio(run: Run, name: str, lo: int, hi: int, th: Thresholds) -> float:
    """A loss's end / start (medians of its windows) between steps ``lo`` and ``hi``."""
    series = finite(get(run, LOSS, name))
    if series is None:
        return math.nan
    keep = (series[0] >= lo) & (series[0] <= hi)
    if keep.sum() < 2 * th.min_points:
        return math.nan
    ends = start_end(series[0][keep], series[1][keep], th)
    return ends["end"] / ends["start"] if ends["start"] > 0 else math.nan


def _loss_levels(run: Run, name: str, th: Thresholds) -> dict:
    """A loss's lowest level in its start window, its level after the start window and its end,
    over the whole run; ``began``, the highest of its first ``min_points`` values (where it
    began, above its noise), ``negative``, whether any value is below 0, and ``at_floor``,
    whether it ended at its floor (``_series.at_floor``)."""
    series = finite(get(run, LOSS, name))
    if series is None or len(series[0]) < 2 * th.min_points:
        return {"start_low": math.nan, "settled": math.nan, "end": math.nan, "began": math.nan,
                "negative": False, "at_floor": False}
    return {"start_low": start_low(*series, th), "settled": level_after_start(*series, th),
            "end": start_end(*series, th)["end"], "began": began(series[1], th),
            "negative": bool((series[1] < 0).any()), "at_floor": at_floor(*series, th)}


def _fraction(end: float, reference: float) -> float:
    return end / reference if reference > 0 else math.nan


def _took_the_descent(name: str, ratios: dict, settled: dict, th: Thresholds) -> bool:
    """Whether ``name`` fell over the judged steps and still falls after its start window:
    a stall is harm only where the other loss keeps descending in the phase the run settled
    into. A loss that fell in its start window and has been flat since sits at its balance
    with the stalled one; what rose meanwhile was pushed by something else (VIbCReg's
    covariance term climbs back while its variance term, a third loss, falls and the
    invariance term stays flat). Unmeasured after the start window (NaN): as before."""
    return ratios[name] < th.conflict_stall_fraction and \
        not settled[name] >= th.conflict_stall_fraction


def conflict_harm(run: Run, th: Thresholds, pair: tuple[str, str], judged: np.ndarray,
                  role: dict[str, str], undone: dict[str, float],
                  swamped: set[str] = frozenset()) -> dict:
    """Whether a conflict holds a loss back: it stalls (or rises) while the other falls,
    both over the judged steps and after the other's start window, with at least
    ``conflict_undone_fraction`` of its own descent undone by the other (held by this
    conflict: with more of its descent left, its stall has another cause, such as a
    reversed gradient), or both settle together on a compromise plateau where each undoes
    most of the other's descent, neither above where it began unless declared a task. A loss
    that rose from near its floor to an equilibrium during its start window (a commitment,
    redundancy or KL term) is settled by design, neither stalled nor stuck; so is a pair that
    rose together: both settled above every one of their first values. A loss that ended at
    its floor is satisfied, never stalled."""
    lo, hi = int(judged[0]), int(judged[-1])
    ratios = {name: _loss_ratio(run, name, lo, hi, th) for name in pair}
    levels = {name: _loss_levels(run, name, th) for name in pair}
    settled = {name: _fraction(lv["end"], lv["settled"]) for name, lv in levels.items()}
    rose = [name for name, lv in levels.items() if not lv["negative"] and
            lv["settled"] >= th.conflict_rise_ratio * lv["start_low"]]
    # Two tasks reach a compromise by descending to it from where they began (two digits on
    # one set of logits fall from ln 10 to ln 2). A pair whose losses both settle above
    # where they began never descended: its terms rose together to the equilibrium of one
    # objective (TiCo's invariance and covariance contrast both rise as the embedding leaves
    # its initial common direction), which no test of a floor-0 ratio sees when a term's
    # floor is not 0.
    rose_together = all(lv["settled"] > lv["began"] for lv in levels.values())
    if rose_together:
        rose = list(pair)
    stalled = []
    for name, other in (pair, pair[::-1]):
        # A loss at its floor is satisfied: flat there, it has nothing left to be held from
        # (NSFnet's continuity residual at 1.5% of its start while the boundary loss falls).
        if name in rose or name in swamped or levels[name]["at_floor"]:
            continue
        # An adversary that does not fall is doing its job (the features defeat it).
        if role.get(name) != "adversarial" and ratios[name] >= th.conflict_stall_fraction and \
                _took_the_descent(other, ratios, settled, th) and \
                not undone[name] < th.conflict_undone_fraction:
            stalled.append(name)
    cancel = math.nan
    parts = [get(run, WEIGHTED_GRAD_NORM, n) for n in run.losses]
    combined = get(run, COMBINED_GRAD_NORM, SHARED)
    if combined is not None and all(p is not None for p in parts):
        steps, (total, *norms) = align(combined, *parts)
        at = np.isin(steps, judged)
        with np.errstate(divide="ignore", invalid="ignore"):
            cancel = median((total / np.sum(norms, axis=0))[at])
    cancelled = bool(cancel <= th.conflict_cancel_ratio)
    # A compromise plateau: each loss's descent is mostly undone by the other, and neither is
    # still falling after its start window nor settled there by design. Terms of one objective
    # at their equilibrium differ by outcome: one of them is barely held or still falls. A
    # min-max game's equilibrium is its design.
    # A per-task metric the user logged that stopped improving while the conflict holds:
    # the task is held back whatever its loss curve shows.
    metrics = {n: {m: metric_progress(run, m, lo, hi, th) for m in linked_metrics(run, n)}
               for n in pair}
    # A metric that turned back (a validation loss rising while its training loss falls) is
    # memorisation, the overfitting rule's; held back is a metric that stopped.
    metric_stalled = [n for n in pair if role.get(n) != "adversarial" and metrics[n] and all(
        abs(p) <= th.conflict_metric_progress for p in metrics[n].values())]
    held = all(undone[n] >= th.conflict_undone_fraction for n in pair)
    # A compromise is reached by descending to it: two tasks on one output both fall from
    # where they began (ln 10) and stop together above their floors. A term that settled
    # above where it began never descended: it was satisfied at the start (a decorrelation
    # or log-det term on a random embedding) and rose as its partner fell, the outcome of
    # the terms of one objective at their equilibrium (CorInfoMax's covariance term). A task
    # pushed above where it began looks the same; only a declaration tells it apart.
    above_start = [name for name, lv in levels.items() if lv["settled"] > lv["began"] and
                   not _declared_task(run, name)]
    plateau = held and not above_start and not rose and \
        "adversarial" not in (role.get(a) for a in pair) and \
        all(settled[n] >= th.conflict_plateau_fraction for n in pair)
    return {"loss_ratios": ratios, "settled_ratios": settled, "rose_to_equilibrium": rose,
            "rose_together": rose_together, "settled_above_start": above_start,
            "stalled": stalled, "descent_undone": undone, "cancel_ratio": cancel,
            "cancelled": cancelled, "plateau": plateau, "metric_progress": metrics,
            "metric_stalled": metric_stalled,
            "suffering": list(pair) if plateau else sorted(set(stalled) | set(metric_stalled),
                                                           key=pair.index)}


def _declared_task(run: Run, name: str) -> bool:
    record = role_record(run, name)
    return record["role"] == "task" and record["source"] == "declared"


def terms_on_representation(run: Run, pair: tuple[str, str]) -> dict[str, list[str]]:
    """The losses of ``pair`` that the graph reads as a term on the other's representation,
    each with the watched latents both reach: one that reaches no parameter of its own while
    the other reaches some (a decoder, a classifier: an output of its own), and whose
    gradient reaches a watched latent that the other's reaches too (``latent_grad_norm``), so
    what it trains is the representation the other computes its output from (a commitment
    term on a codebook's input, a center loss on a feature). Never the task, declared or
    first. Both conditions are needed: a loss that reads a derivative of a network's output
    (a PINN's residual) never reaches the output bias, so the loss that reads the output
    itself has a parameter of its own without having an output of its own. Two losses with
    the same reach (two tasks on one head, the terms of one objective on one embedding) are
    told apart by outcome instead."""
    records = {name: role_record(run, name) for name in pair}
    out = {}
    for name, other in (pair, pair[::-1]):
        own, other_own = ((records[n].get("counts") or {}).get("own") for n in (name, other))
        settled_task = records[name]["role"] == "task" and records[name]["source"] in \
            SETTLED_SOURCES
        if records[name].get("reach") != "shared" or own != 0 or not other_own or settled_task:
            continue
        both = sorted(_latents_reached(run, name) & _latents_reached(run, other))
        if both:
            out[name] = both
    return out


def _latents_reached(run: Run, loss: str) -> set[str]:
    """The watched latents that ``loss``'s gradient reached at some probe step."""
    reached = set()
    for pair in run.names(LATENT_GRAD_NORM):
        latent, name = pair_parts(pair)
        series = finite(get(run, LATENT_GRAD_NORM, pair))
        if name == loss and series is not None and float(np.max(series[1])) > 0:
            reached.add(latent)
    return reached
