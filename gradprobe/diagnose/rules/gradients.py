"""Rules on the per-loss gradients at the shared parameters: ``gradient-swamping`` and
``gradient-conflict`` (``inert-loss``, whose tests swamping reads, in inert.py)."""

from __future__ import annotations

import functools
import math
from collections import Counter

import numpy as np

from gradprobe.record import Run, pair_parts, role_declaration
from gradprobe.record.quantities import (GRAD_COSINE, GRAD_NORM, LOSS, MAGNITUDE_SIMILARITY,
                                         WEIGHT, WEIGHTED_GRAD_NORM)

from .._series import (align, at_floor, descent_undone, exempt_losses, finite, g, get,
                       held_range, held_share, median, pct, persistent, recorded_series,
                       role_origin, role_record, roles, rolling_median, task_learning, thin,
                       window_counts)
from ..findings import Finding, PlotHint
from ..thresholds import Thresholds
from .common import Earlier, loss_start, make_finding, pooled_usage, satisfied_constraints
from .conflict_harm import conflict_harm, terms_on_representation
from .layers import layer_blocks, layer_ratios, layer_weights, pair_on_layers
from .purpose import (adversary_at_chance, carried_by, end_fraction, head_on_another,
                      held_back, held_back_by, own_measure_alarms, reach_failing,
                      serves_another, swamped_before_learning)
from .inert import on_whole_set, rounding_residue
from .remedies import (brief_swamping_remedy, conflict_remedy, serving_remedy,
                       swamping_remedy)


def gradient_swamping(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    """A loss whose weighted gradient is a negligible share of a competing loss's, judged on the
    layers the two both reach where the run holds per-layer blocks (layers.py), else on the
    whole shared set."""
    names = [n for n in run.losses if run.has(WEIGHTED_GRAD_NORM, n)]
    if len(names) < 2:
        return []
    steps, wn = align(*[get(run, WEIGHTED_GRAD_NORM, n) for n in names])
    if len(steps) < th.min_points:
        return []
    W = np.vstack(wn)  # K x T
    _, raw = align(*[get(run, GRAD_NORM, n) for n in names]) if all(
        run.has(GRAD_NORM, n) for n in names) else (None, [W[k] for k in range(len(names))])
    raw = on_whole_set(run, names, steps, np.vstack(raw))
    exempt = exempt_losses(run, th)
    # A regulariser's pull (weight decay) is not a loss competing for the shared layers: the
    # swamping ratio is taken against the largest of the others, unless the outcome shows the
    # regulariser held that loss back (``_rivals``).
    balance = {}
    learning = task_learning(run, steps, th)
    satisfied = satisfied_constraints(run, th)
    alarms = functools.cache(lambda: own_measure_alarms(run, th))  # once a serving loss asks
    residue = rounding_residue(run, th)
    out = []
    for k, name in enumerate(names):
        if name in exempt or name in satisfied or name in residue:
            continue  # a gradient that is rounding residue moves nothing: that is inert-loss
        raw_k = np.asarray(raw[k])
        if not np.any(np.isfinite(raw_k) & (raw_k > 0)):
            continue  # no gradient at all on the shared parameters: that is inert-loss
        competing = _rivals(run, names, exempt, name, th)
        key = tuple(bool(c) for c in competing)
        if key not in balance:
            balance[key] = _balance(run, names, steps, W, competing)
        ratios, dominant_idx, by_layer = balance[key]
        ratio = ratios[k]
        to_learn = _left_to_learn(run, name, steps, th)
        if to_learn is None:
            continue  # at its floor: satisfied
        weight_on = np.ones(len(steps), dtype=bool)
        if run.has(WEIGHT, name):
            ws, wv = get(run, WEIGHT, name)
            weight_on = np.interp(steps, ws, np.abs(wv)) > 0  # a weight of 0: switched off
        # The steps this loss leads are judged too (ratio 1, not swamped): leaving them out
        # would count a loss that leads most of the run and trails the rest as always swamped.
        judged = learning & to_learn & weight_on & np.isfinite(ratio) & \
            np.isfinite(raw_k) & (raw_k > 0)
        held = judged & (ratio < th.swamping_ratio)
        # The losses that swamp it, the most frequent first.
        rivals = [names[d] for d, _ in Counter(
            dominant_idx[k][held & (dominant_idx[k] >= 0)].tolist()).most_common()]
        # Read once, where a test below first asks for it.
        held_by = functools.cache(lambda: held_back_by(run, name, rivals, th))
        unlearned = None
        if not persistent(steps, held, judged, th):
            unlearned = swamped_before_learning(run, name, steps, held, judged, held_by, th)
            if unlearned is None:
                continue
        # How swamped, read where it is swamped: over all judged steps the median sits at
        # the held/not-held boundary when the held share is near min_share.
        med = median(ratio[held])
        dominant = rivals[0] if rivals else names[int(np.argmax(np.nanmedian(W, axis=1)))]
        dom = names.index(dominant)
        share = held_share(steps, held, judged)
        # A ratio whose own spread over the judged window straddles the threshold is too
        # close to call: info, so that one healthy setup cannot flip between seeds. The
        # window: the end window of the judged steps, where the balance the run settled on is
        # read (its start is no evidence of where it settles); the ratio smoothed over
        # smooth_points steps, as the loss curves are, so that one batch's noise is not read
        # as spread.
        judged_steps = steps[judged]
        last = window_counts(judged_steps, th)[1]
        settled = rolling_median(ratio[judged], th.smooth_points)[-last:]
        quartiles = [float(q) for q in np.quantile(settled, [0.25, 0.75])]
        # Too close to call, unless the outcome calls it: a loss that never recovered its fit
        # while a loss that swamps it learned was held back whatever its ratio's spread.
        stalled = held_by()
        close = quartiles[0] < th.swamping_ratio < quartiles[1] and not stalled
        protected = _usage_it_keeps(run, name, th)
        at_chance = adversary_at_chance(run, name, th)
        carried = None if stalled else carried_by(
            run, name, dominant, steps, held, None if by_layer is None else by_layer["blocks"], th)
        # A term on another loss's forward pass: its small share is a regulariser's trade-off
        # or an objective held back, as intended; only what it reaches failing says harm, and
        # for one with a head of its own, its own loss failing to descend.
        head = head_on_another(run, name, th)
        failing = reach_failing(run, name, th, alarms(), at_chance) \
            if serves_another(run, name) or head is not None else None
        trade_off = failing == [] and not (protected or at_chance or carried is not None)
        severity = "info" if close or protected or at_chance or carried is not None or \
            trade_off else "error" if med < th.swamping_error_ratio else "warning"
        first, last = held_range(steps, held)
        evidence = {
            "loss": name, "dominant": dominant, "median_ratio": med,
            "median_ratio_judged": median(ratio[judged]),
            "ratio_quartiles": quartiles, "straddles_threshold": close,
            "judged_on": "whole shared set" if by_layer is None else "layers it shares",
            "threshold": th.swamping_ratio, "held_share": share,
            "held_steps": int(held.sum()), "judged_steps": int(judged.sum()),
            "first_step": first, "last_step": last,
            "median_weighted_grad_norm": median(W[k][judged]),
            "median_dominant_weighted_grad_norm": median(W[dom][judged]),
            "median_weight": median(get(run, WEIGHT, name)[1]) if run.has(WEIGHT, name)
            else None,
            "task_memorised_at": int(steps[~learning][0]) if (~learning).any() else None,
            "ratio": thin(steps[judged], ratio[judged]),
            "prototype_usage_kept": protected, "adversary_at_chance": at_chance,
            "held_back": stalled, "carried_cosine": carried, "never_learned": unlearned,
            "serves_another_pass": failing is not None, "own_head_end_fraction": head,
            "reach_failing": failing,
        }
        if by_layer is not None:
            # Over the held steps, as the headline median: its spread reads the same steps.
            evidence["layer_ratios"] = {
                layer: median(by_layer["per_layer"][k][i][held])
                for i, layer in enumerate(by_layer["layers"])
                if np.isfinite(by_layer["per_layer"][k][i][held]).any()}
        where = ""
        if by_layer is not None:
            spread = sorted(evidence["layer_ratios"].values())
            where = " on the layers they share" + (
                f" ({pct(spread[0])} to {pct(spread[-1])} on its {len(spread)} layers)"
                if len(spread) > 1 else "")
        out.append(make_finding(
            "gradient-swamping", severity,
            f"'{name}' is swamped: its weighted gradient is {pct(med)} of that of '{dominant}'"
            + where + (" (its spread straddles the threshold)" if close else "")
            + "".join(f"; the prototypes '{p}' it reaches keep their usage (pooled entropy "
                      f"{g(u)} of its maximum)" for p, u in (protected or {}).items())
            + (f"; its discriminator is at chance (its loss ends at {g(at_chance['end'])}, "
               f"{pct(at_chance['end_fraction'])} of its start; adversarial "
               f"{at_chance['role']})" if at_chance else "")
            + (f"; its gradient points with that of '{dominant}' (cosine {g(carried)}): the "
               f"descent of '{dominant}' carries it" if carried is not None else "")
            + ("; it is computed on the other losses' forward pass " + (
                "with no parameters of its own and" if head is None else "through a head of its "
                f"own, its loss still descends (it ends at {pct(head)} of its start) and")
               + " nothing it reaches fails by its own measure: "
               + ("a regulariser's" if head is None else "an auxiliary term's") + " small share "
               "is the design, an objective's is harm, and the graph looks the same"
               if trade_off else "")
            + (f"; its discriminator wins (its loss ends at "
               f"{pct(end_fraction(run, name, th))} of its start; adversarial "
               f"{role_origin(role_record(run, name))})" if name in (failing or ()) else "")
            + (f"; what it reaches fails: {', '.join(repr(f) for f in failing if f != name)}"
               if set(failing or ()) - {name} else "")
            + (f"; swamped from the start, it never learned (its loss stayed above "
               f"{pct(unlearned['lowest'])} of its start)" if unlearned and "lowest" in unlearned
               else f"; swamped from its first steps by '{unlearned['by']}', which then fell to "
               f"{pct(unlearned['dominant_end_fraction'])} of its start, it ends at "
               f"{pct(unlearned['end_fraction'])} of its own" if unlearned else "")
            + (f"; it is held back: it ends at {g(stalled['end_fraction'])} of its start, "
               f"'{stalled['by']}' at {g(stalled['dominant_end_fraction'])}"
               if stalled and (quartiles[0] < th.swamping_ratio < quartiles[1]
                               or dominant in exempt) and not (protected or at_chance) else ""),
            name, f"ratio {g(med)} (median)", evidence, (first, last),
            plot=PlotHint(WEIGHTED_GRAD_NORM, names=[name, dominant], threshold=th.swamping_ratio,
                          ratio_to=dominant),
            remedy=_KEPT_REMEDY if protected else _AT_CHANCE_REMEDY if at_chance
            else _CARRIED_REMEDY if carried is not None else serving_remedy(name) if trade_off
            else brief_swamping_remedy(name, unlearned["by"]) if unlearned and "by" in unlearned
            else swamping_remedy(evidence)))
    return out


_KEPT_REMEDY = ("None needed while the prototypes it reaches keep their usage: a small "
                "gradient share that does its job (a balancing loss keeping the experts in use) "
                "is the design; prototype-collapse reports them if their usage goes.")


_CARRIED_REMEDY = ("None needed while the dominant loss's descent is its descent too: a "
                   "small share of the gradient pointing the same way does its job (a center "
                   "loss beside a prototype loss that also pulls each embedding to its class).")


_AT_CHANCE_REMEDY = ("None needed while its discriminator stays at chance: the shared features "
                     "carry nothing it can read, which is what an adversarial loss is for; if "
                     "the loss is not adversarial, declare its role.")


def _rivals(run: Run, names: list[str], exempt: set[str], name: str,
            th: Thresholds) -> np.ndarray:
    """Which losses count as competitors of ``name`` [K]: every loss that is not exempt, and an
    exempt one (a penalty, a regulariser) only where the outcome shows it held ``name`` back
    (``purpose.held_back``: it fell below swamping_stall_fraction of its start while ``name``
    ended at or above it). A penalty against a loss is a trade-off by design, until the loss
    it trades against fails by its own measure: an L0 penalty at 100 times its published
    weight falls to 8% of its start while the task rises back to 1.8 times its start window
    (to chance); at the published weight the task ends at 12-16% of its start."""
    return np.array([n not in exempt or held_back(run, name, n, th) is not None
                     for n in names])


def _balance(run: Run, names: list[str], steps: np.ndarray, W: np.ndarray,
             competing: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """Per loss and step, its weighted gradient's ratio to the largest competing loss's and
    which loss that is [K, T] each, on the layers they share (``_where_they_act``, returned
    third) where the run holds per-layer blocks, else on the whole shared set (None)."""
    by_layer = _where_they_act(run, names, steps, competing)
    if by_layer is not None:
        return by_layer["ratio"], by_layer["dominant"], by_layer
    candidates = np.where(np.isfinite(W) & competing[:, None], W, -np.inf)
    with np.errstate(invalid="ignore"):
        largest = np.max(candidates, axis=0)
        dominant_idx = np.tile(np.argmax(candidates, axis=0), (len(names), 1))
        ratios = W / largest
    ratios[:, ~(largest > 0)] = np.nan
    return ratios, dominant_idx, None


def _usage_it_keeps(run: Run, name: str, th: Thresholds) -> dict[str, float] | None:
    """For a loss other than the task that reaches watched prototypes (a balancing loss on a
    router, a commitment or codebook loss on a codebook: read from its graph at the first
    probe step), the pooled usage of each, when every one keeps at least
    ``usage_held_fraction`` of its maximum entropy: the quantity the loss is for holds, so a
    small gradient share is not harm (a Switch Transformer balancing loss at alpha 1e-2
    keeps 8 experts in use at 1-3% of the task's gradient on the router). None otherwise."""
    if name == run.task:
        return None
    reached = role_record(run, name).get("prototypes_reached") or []
    usage = {p: pooled_usage(run, p, th) for p in reached}
    if not usage or any(u is None or u["usage"] < th.usage_held_fraction
                        for u in usage.values()):
        return None
    return {p: u["usage"] for p, u in usage.items()}


def _where_they_act(run: Run, names: list[str], steps: np.ndarray,
                    competing: np.ndarray) -> dict | None:
    """The per-layer ratios (layers.py) at ``steps``, or None where the run holds no blocks
    (an older run file, FSDP2) or they miss a step."""
    found = layer_blocks(run)
    if found is None or names != run.losses:
        return None
    block_steps, layers, blocks = found
    if not np.isin(steps, block_steps).all():
        return None
    blocks = blocks[np.searchsorted(block_steps, steps)]
    ratio, per_layer, dominant = layer_ratios(blocks, layer_weights(run, steps), competing)
    return {"ratio": ratio, "per_layer": per_layer, "dominant": dominant, "layers": layers,
            "blocks": blocks}


def _left_to_learn(run: Run, name: str, steps: np.ndarray, th: Thresholds) -> np.ndarray | None:
    """Per step: something left to learn (the smoothed loss above learned_fraction of its
    start); None where the loss ends at its floor (``at_floor``): satisfied, not held back."""
    to_learn = np.ones(len(steps), dtype=bool)
    series = finite(get(run, LOSS, name))
    if series is None or len(series[0]) < 2 * th.min_points:
        return to_learn
    ls, lv = series
    if at_floor(ls, lv, th):
        return None
    start = loss_start(run, name, th)
    if start > 0:
        smooth = rolling_median(lv, th.smooth_points)
        at = np.interp(steps, ls, np.where(np.isfinite(smooth), smooth, np.inf))
        to_learn = at > th.learned_fraction * start
    return to_learn


def gradient_conflict(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    role, exempt, blocks = roles(run), exempt_losses(run, th), layer_blocks(run)
    # A swamped loss that stalls is held back by the loss that swamps it, named by
    # gradient-swamping: its stall is no evidence of this conflict.
    swamped = {f.subject for f in earlier if f.id == "gradient-swamping" and f.severity != "info"}
    for pair, steps, cos in recorded_series(run, GRAD_COSINE, th.min_points):
        a, b = pair_parts(pair)
        if a in exempt or b in exempt:
            continue  # a regulariser opposes the task by design (weight decay pulls to 0)
        # Judged: while the task still learns (at convergence two losses balance, cos -> -1
        # by necessity), where both losses have a gradient and a non-zero weight, and where
        # neither weighted gradient is swamped by the other (a negligible gradient cannot
        # conflict in effect; that case is gradient-swamping).
        judged = task_learning(run, steps, th)
        wn = []
        for name in (a, b):
            for q in (GRAD_NORM, WEIGHT):
                s = get(run, q, name)
                if s is not None:
                    judged &= np.interp(steps, s[0], np.nan_to_num(np.abs(s[1]))) > 0
            s = get(run, WEIGHTED_GRAD_NORM, name)
            if s is not None:
                wn.append(np.interp(steps, s[0], np.nan_to_num(s[1])))
        if len(wn) == 2:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                balance = np.minimum(wn[0], wn[1]) / np.maximum(wn[0], wn[1])
            judged &= np.nan_to_num(balance) >= th.swamping_ratio
        # Where the run holds per-layer blocks the pair is judged where it fights: on the
        # layers both reach whose cosine is persistently negative (layers.py), not on the
        # nearest shared layer alone (two digits fighting over a shared trunk look
        # orthogonal on the shared head's output layer), nor on the whole shared set (two
        # tasks fighting over a shared output layer agree on the trunk below it).
        layered = pair_on_layers(run, blocks, (a, b), steps, judged,
                                 th.conflict_median_cosine, th.conflict_share)
        if layered is not None:
            if not layered["layers"]:
                continue
            cos = layered["cosine"]
        if judged.sum() < th.min_points:
            continue
        c = cos[judged]
        med = median(c)
        negative = (c < 0)
        share = held_share(steps[judged], negative)
        if not (med <= th.conflict_median_cosine and share >= th.conflict_share):
            continue
        mag = get(run, MAGNITUDE_SIMILARITY, pair)
        tragic_share = None
        if layered is not None:
            tragic_share = held_share(steps[judged], layered["tragic"][judged])
        elif mag is not None:
            m = np.interp(steps[judged], mag[0], mag[1])
            tragic_share = held_share(steps[judged], c <= -m)
        tragic = tragic_share is not None and tragic_share >= th.conflict_tragic_share
        undone = {}
        if layered is not None:
            undone = {n: median(layered[n][judged]) for n in (a, b)}
        elif len(wn) == 2:
            undone = {a: median(descent_undone(c, wn[0][judged], wn[1][judged])),
                      b: median(descent_undone(c, wn[1][judged], wn[0][judged]))}
        harm = conflict_harm(run, th, (a, b), steps[judged], role,
                             {n: undone.get(n, math.nan) for n in (a, b)}, swamped)
        # A regulariser or KL term known only from its name is judged (a name never exempts),
        # but its trade-off against the other loss is the design: noted, as the issue's
        # "loss against a regulariser" (the quantity it protects is judged by its own rule).
        trade_off = [n for n in (a, b) if role.get(n) in th.exempt_roles]
        # So is a term that the graph reads as acting on the other loss's representation.
        on_representation = {n: latents for n, latents in
                             terms_on_representation(run, (a, b)).items() if n not in trade_off}
        if layered is not None and not layered["everywhere"] and not harm["suffering"]:
            continue  # an opposition on some of the shared layers that holds nothing back
        severity = ("error" if tragic else "warning") if harm["suffering"] and not (
            trade_off or on_representation) else "info"
        held = np.zeros(len(steps), dtype=bool)
        held[np.flatnonzero(judged)[negative]] = True
        evidence = {
            "pair": pair, "median_cosine": med, "negative_share": share,
            "tragic_share": tragic_share, "judged_steps": int(judged.sum()), **harm,
            "judged_on": "nearest shared layer" if layered is None else "layers where they fight",
            "layers": None if layered is None else layered["layers"],
            "layer_cosines": None if layered is None else layered["layer_cosines"],
            "trade_off_by_name": trade_off, "term_on_representation": on_representation,
            "thresholds": {"median_cosine": th.conflict_median_cosine,
                           "share": th.conflict_share, "tragic_share": th.conflict_tragic_share,
                           "stall_fraction": th.conflict_stall_fraction,
                           "rise_ratio": th.conflict_rise_ratio,
                           "undone_fraction": th.conflict_undone_fraction,
                           "plateau_fraction": th.conflict_plateau_fraction,
                           "cancel_ratio": th.conflict_cancel_ratio},
            "cosine": thin(steps[judged], c),
        }
        what = f"'{a}' and '{b}' pull against each other: gradient cosine < 0 over " \
            f"{pct(share)} of the run"
        if harm["rose_together"]:
            what += "; both rose from where they began and settled, as the terms of one " \
                "objective do at their equilibrium"
        elif harm["settled_above_start"] and all(
                harm["descent_undone"][n] >= th.conflict_undone_fraction for n in (a, b)):
            risen = harm["settled_above_start"][0]
            what += f"; '{risen}' settled above where it began while the other fell, as the " \
                "terms of one objective do at their equilibrium (judge it as a task: " \
                f"{role_declaration(risen, 'task')})"
        if harm["stalled"]:
            what += f"; {' and '.join(repr(n) for n in harm['stalled'])} stalled while the " \
                "other fell"
        if harm["plateau"]:
            what += "; both settled on a compromise plateau, each undoing " + " and ".join(
                f"{pct(harm['descent_undone'][n])} of '{n}'s" for n in (a, b)) + " descent"
        if harm["metric_stalled"]:
            what += "; " + " and ".join(
                f"'{n}'s logged {', '.join(repr(m) for m in harm['metric_progress'][n])}"
                for n in harm["metric_stalled"]) + " stopped improving"
        if harm["cancelled"]:
            what += f"; the weighted gradients cancel (combined norm {pct(harm['cancel_ratio'])}" \
                " of their sum)"
        if not harm["suffering"]:
            what += ", but neither loss is held back by it"
        elif trade_off:
            what += "; " + ", ".join(
                f"'{n}' is a {role[n]} term {role_origin(role_record(run, n))}, whose trade-off "
                f"is the design (judge it as a task: {role_declaration(n, 'task')})"
                for n in trade_off)
        elif on_representation:
            what += "; " + ", ".join(
                f"'{n}' reaches no parameter of its own while the other does, and acts on the "
                f"watched {', '.join(repr(z) for z in latents)} that both reach (from the "
                "graph): a term on that representation, whose trade-off is the design and "
                "whose purpose is judged there by its own rules (judge it as a task: "
                f"{role_declaration(n, 'task')})" for n, latents in on_representation.items())
        elif tragic:
            what += " (tragic: cos <= -magnitude similarity)"
        out.append(make_finding(
            "gradient-conflict", severity, what, pair, f"cos {g(med)} (median)", evidence,
            held_range(steps, held),
            plot=PlotHint(GRAD_COSINE, names=[pair], threshold=0.0),
            remedy=conflict_remedy(role.get(n) for n in (a, b)) if severity != "info" else None))
    return out
