"""Rules on watched prototype matrices: ``prototype-stale`` and ``prototype-collapse``."""

from __future__ import annotations


import numpy as np

from gradprobe.metrics.chance import closest_pair_by_chance
from gradprobe.record import Run
from gradprobe.record.quantities import (LATENT_NORM, PROTOTYPE_ASSIGNMENTS, PROTOTYPE_COUNT,
                                         PROTOTYPE_DRIFT, PROTOTYPE_LAG, PROTOTYPE_MEAN_DISTANCE,
                                         PROTOTYPE_MIN_DISTANCE, PROTOTYPE_RANK,
                                         PROTOTYPE_STEPS_SINCE_MOVED, PROTOTYPE_TARGET_SHIFT,
                                         PROTOTYPE_USAGE)

from .._series import (align, finite, g, get, held_range, held_share, median, nanmax,
                       own_parameter_losses, pct, persistent, recorded_series, rolling_median,
                       start_end, thin, trailing_range, window_size)
from ..findings import Finding, PlotHint
from ..thresholds import Thresholds
from .common import Earlier, groups_per_batch_series, make_finding, pooled_usage
from .remedies import prototype_collapse_remedy


def prototype_stale(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    for p, steps, d in recorded_series(run, PROTOTYPE_DRIFT, th.min_points):
        still = d <= th.stale_drift
        shift = finite(get(run, PROTOTYPE_TARGET_SHIFT, p))
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
        since = get(run, PROTOTYPE_STEPS_SINCE_MOVED, p)
        lag = finite(get(run, PROTOTYPE_LAG, p))
        lag_ends = start_end(*lag, th) if lag is not None else None
        # Stale prototypes are left outside their groups by the latent (lag >> 1 group std);
        # still ones that sit within their groups at the end are a target the latent came to
        # (a fixed or implicit codebook, LFQ's, that a commitment term pulls the latent onto).
        converged = lag_ends is not None and lag_ends["end"] <= th.stale_lag_within
        evidence = {
            "prototypes": p, "still_share": share, "judged_steps": int(judged.sum()),
            "never_moved": never, "median_drift": median(d[judged]),
            "median_target_shift": median(sv[judged]) if sv is not None else None,
            "latent_watched": sv is not None,
            "max_steps_since_moved": nanmax(since[1]) if since is not None else None,
            "lag_start": lag_ends["start"] if lag_ends else None,
            "lag_end": lag_ends["end"] if lag_ends else None, "latent_converged": converged,
            "thresholds": {"drift": th.stale_drift, "target_shift": th.stale_min_target_shift,
                           "lag_within": th.stale_lag_within},
            "drift": thin(steps, d),
        }
        if sv is not None:
            evidence["target_shift"] = thin(steps, sv)
        moved = "the latent they summarise moved" if sv is not None else \
            "(their latent is not watched)"
        what = "never moved" if never else f"did not move over {pct(share)} of the run"
        if converged:
            moved = f"the latent came to them (each sits {g(lag_ends['end'])} group std from " \
                f"its group's mean at the end, from {g(lag_ends['start'])}): a fixed table " \
                "the latent converges to, not left behind"
        out.append(make_finding(
            "prototype-stale", "info" if converged else "error" if never else "warning",
            f"prototypes '{p}' {what} while {moved}" if sv is not None or converged else
            f"prototypes '{p}' {what} {moved}",
            p, f"still {pct(share)} of steps", evidence, held_range(steps, held),
            plot=PlotHint(PROTOTYPE_DRIFT, names=[p], threshold=th.stale_drift),
            remedy="Nothing to do for a table fixed by design; one meant to follow the latent "
                   "is updated inside the training loop (momentum)." if converged else None))
    return out


def prototype_collapse(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    latents = run.meta.get("prototypes") or {}
    gpb = groups_per_batch_series(run)
    mixed = gpb is not None and median(gpb[1]) >= 2
    for p, steps, md in recorded_series(run, PROTOTYPE_MEAN_DISTANCE, 2 * th.min_points):
        scale_note = "absolute"
        k = window_size(len(steps), th)
        latent = latents.get(p)
        norm = get(run, LATENT_NORM, latent) if latent else None
        # Relative to the latent's norm the distance also falls when the latent grows away
        # from prototypes that stay apart (centres drawn at random, features starting near
        # 0): collapse needs the prototypes themselves to close in, so the absolute distance
        # must have fallen as well.
        spread_kept, absolute = False, {}
        if norm is not None:
            absolute = {"absolute_mean_distance_peak": nanmax(rolling_median(md, th.smooth_points)),
                        "absolute_mean_distance_end": median(md[-k:])}
            spread_kept = absolute["absolute_mean_distance_end"] > \
                th.proto_collapse_fraction * absolute["absolute_mean_distance_peak"]
            scale = np.interp(steps, norm[0], norm[1])
            with np.errstate(divide="ignore", invalid="ignore"):
                md = np.where(scale > 0, md / scale, np.nan)
            scale_note = f"relative to the norm of '{latent}'"
        peak = nanmax(rolling_median(md, th.smooth_points))
        end = median(md[-k:])
        reasons, keys, severity = [], [], "warning"  # keys: each reason's key number
        usage_collapsed = False
        evidence: dict = {"prototypes": p, "distance_scale": scale_note,
                          "mean_distance_peak": peak, "mean_distance_end": end,
                          "end_steps": [int(steps[-k]), int(steps[-1])],
                          "thresholds": {"collapse_fraction": th.proto_collapse_fraction,
                                         "merge_fraction": th.proto_merge_fraction,
                                         "usage": th.proto_usage}, **absolute}
        held = np.zeros(len(steps), dtype=bool)
        if peak > 0 and end <= th.proto_collapse_fraction * peak and not spread_kept:
            reasons.append(f"their mean distance fell to {pct(end / peak)} of its peak")
            keys.append(f"mean distance x{g(end / peak)} of peak")
            severity = "error"
            held |= md <= th.proto_collapse_fraction * peak
        rank = finite(get(run, PROTOTYPE_RANK, p))
        rank_end = start_end(*rank, th)["end"] if rank is not None else None
        evidence["rank_end"] = rank_end
        min_d = finite(get(run, PROTOTYPE_MIN_DISTANCE, p))
        size = _table_size(run, p)
        if min_d is not None and size is not None and rank_end is not None:
            _, (mn, mean_raw) = align(min_d, get(run, PROTOTYPE_MEAN_DISTANCE, p))
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(mean_raw > 0, mn / mean_raw, np.nan)
            rel_end = median(rel[-window_size(len(rel), th):])
            # Judged against chance: the closest of many rows is close by chance alone (a
            # memory bank with one row per training image holds near-duplicate images).
            chance = closest_pair_by_chance(size, rank_end)
            evidence.update(min_over_mean_distance_end=rel_end, closest_pair_by_chance=chance,
                            table_rows=size)
            if rel_end <= th.proto_merge_fraction * chance:
                reasons.append(f"two of them merged (closest pair at {pct(rel_end)} of the mean "
                               f"distance, {g(rel_end / chance)} of the {pct(chance)} that chance "
                               f"gives {size} rows over rank {g(rank_end)})")
                keys.append(f"closest pair x{g(rel_end / chance)} of chance")
                held |= np.interp(steps, min_d[0], rel) <= th.proto_merge_fraction * chance
        pooled = pooled_usage(run, p, th)
        usage = finite(get(run, PROTOTYPE_USAGE, p))
        if pooled is not None:
            evidence["pooled_usage"] = pooled
            collapsed = _pooled_collapse(pooled, th)
            if collapsed is not None:
                reasons.append(collapsed[0])
                keys.append(collapsed[1])
                usage_collapsed = True
                held[steps >= pooled["steps"][0]] = True
        elif usage is not None and mixed and len(usage[0]) >= th.min_points:
            # A run file without assignment counts: judge each batch, on mixed batches only.
            u_end = start_end(*usage, th)["end"]
            evidence["usage_end"] = u_end
            if u_end <= th.proto_usage:
                reasons.append(f"usage entropy is {g(u_end)} on mixed batches")
                keys.append(f"usage entropy {g(u_end)}")
                usage_collapsed = True
                held |= np.interp(steps, usage[0], usage[1]) <= th.proto_usage
        if not reasons:
            continue
        # A merged pair in a table whose pooled usage holds is a redundancy, not a collapse:
        # the table still tells the inputs apart (SoftTriple's regulariser merges the centers
        # of a class by design while 33 of 50 centers stay in use, usage entropy 0.72).
        redundant = len(reasons) == 1 and keys[0].startswith("closest pair") and \
            pooled is not None
        if redundant:
            severity = "info"
            reasons.append(f"their usage pooled over steps {pooled['steps'][0]}-"
                           f"{pooled['steps'][1]} holds (entropy {g(pooled['usage'])}, "
                           f"{pooled['used']} of {pooled['prototypes']} used): a redundant "
                           "pair, not a collapse")
        evidence["merged_pair_only"] = redundant
        evidence["mean_distance"] = thin(steps, md)
        out.append(make_finding(
            "prototype-collapse", severity,
            f"prototypes '{p}'{'' if redundant else ' collapse'}: " + "; ".join(reasons),
            p, keys[0], evidence,
            trailing_range(steps, held),
            plot=PlotHint(PROTOTYPE_MEAN_DISTANCE, names=[p]),
            remedy=_REDUNDANT_REMEDY if redundant else prototype_collapse_remedy(
                usage_collapsed, own_parameter_losses(run))))
    return out


_REDUNDANT_REMEDY = ("None needed while the table's usage holds: two rows that merged share "
                     "their inputs (a regulariser that merges a class's centers does it by "
                     "design); prototype-collapse reports the table as an alarm if its usage "
                     "goes.")


def _pooled_collapse(pooled: dict, th: Thresholds) -> tuple[str, str] | None:
    """The reason and key number of a collapse read from the usage pooled over the end window
    (``pooled_usage``), or None: its entropy at most ``proto_usage``, or, where the entropy
    holds, most of the set dead, a partial collapse the entropy misses: at most
    ``proto_used_fraction`` of the prototypes assigned any row, with ``proto_dead_rows`` rows
    or more pooled per prototype, so that a prototype left unassigned is dead and not
    unlucky (a codebook started far from the encoder's outputs keeps 19-41 of its 64-128
    codes, pooled entropy 0.50-0.69 of log P; its published start keeps 58-125)."""
    window = f"over steps {pooled['steps'][0]}-{pooled['steps'][1]}"
    size, used = pooled["prototypes"], pooled["used"]
    if pooled["usage"] <= th.proto_usage:
        return (f"usage entropy pooled {window} is {g(pooled['usage'])} (one of {size} takes "
                f"{pct(pooled['largest_share'])} of the rows, {used} used)",
                f"pooled usage entropy {g(pooled['usage'])}")
    if pooled["rows"] >= th.proto_dead_rows * size and used <= th.proto_used_fraction * size:
        return (f"{size - used} of {size} were assigned no row {window} ({pooled['rows']} rows "
                f"pooled, {g(pooled['rows'] / size)} per prototype; usage entropy "
                f"{g(pooled['usage'])} over the {used} used)", f"{used} of {size} used")
    return None


def _table_size(run: Run, prototypes: str) -> int | None:
    """The rows of a watched table: recorded, or (older run files) the width of its
    assignment counts; None where neither was recorded."""
    count = finite(get(run, PROTOTYPE_COUNT, prototypes))
    if count is not None:
        return int(count[1][-1])
    if prototypes in run.array_names(PROTOTYPE_ASSIGNMENTS):
        return int(run.arrays(PROTOTYPE_ASSIGNMENTS, prototypes)[1][-1].size)
    return None
