"""Rules on batch composition: ``weak-contrastive-signal`` (a contrastive watch, or the
groups per batch) and ``batch-composition-mismatch``."""

from __future__ import annotations

import math

import numpy as np

from gradprobe.record import Run
from gradprobe.record.quantities import (BATCH, CONTRASTIVE_GAP, CONTRASTIVE_LOSS_RATIO,
                                         CONTRASTIVE_SAME_GROUP_SHARE, GROUPS_PER_BATCH,
                                         GROUP_ENTROPY)

from .._series import (finite, g, get, held_range, held_share, median, nanmax, pct, persistent,
                       roles, start_end, thin)
from ..findings import Finding, PlotHint
from ..thresholds import Thresholds
from .common import Earlier, groups_per_batch_series, make_finding


def weak_contrastive_signal(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    out = []
    watches = run.names(CONTRASTIVE_LOSS_RATIO)
    gpb = groups_per_batch_series(run)
    for c in watches:
        evidence: dict = {"watch": c}
        reasons = []
        steps_range = None
        share = finite(get(run, CONTRASTIVE_SAME_GROUP_SHARE, c))
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
        ratio = finite(get(run, CONTRASTIVE_LOSS_RATIO, c))
        gap = finite(get(run, CONTRASTIVE_GAP, c))
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
        out.append(make_finding(
            "weak-contrastive-signal", "warning",
            f"contrastive '{c}' gets a weak signal: " + "; ".join(reasons), c, key, evidence,
            steps_range,
            plot=PlotHint(CONTRASTIVE_SAME_GROUP_SHARE if share is not None else CONTRASTIVE_GAP,
                          names=[c])))
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
        out.append(make_finding(
            "weak-contrastive-signal", "warning",
            f"contrastive loss '{name}' sees single-group batches: all its in-batch negatives "
            "come from the anchor's own group",
            name, f"groups/batch {g(median(v))}", evidence, held_range(s, held),
            plot=PlotHint(GROUPS_PER_BATCH, names=[BATCH], threshold=1.0)))
    return out


def batch_composition_mismatch(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    expect = run.meta.get("expect_groups_per_batch")
    gpb = groups_per_batch_series(run)
    if expect is None or gpb is None or len(gpb[0]) < th.min_points:
        return []
    expect = int(expect)
    steps, v = gpb
    # A sampler that did not take effect shows as one group where several were declared, more
    # groups than declared, or (a class-sorted loader read in order) a small part of them.
    too_few = (expect > 1) & (v <= th.composition_fewer_fraction * expect)
    held = ((v <= 1) != (expect <= 1)) | (v > expect) | too_few
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
    entropy = finite(get(run, GROUP_ENTROPY, BATCH))
    if entropy is not None:
        evidence["median_group_entropy"] = median(entropy[1])
    return [make_finding(
        "batch-composition-mismatch", severity, title, BATCH,
        f"{g(med)} groups/batch vs {expect} declared", evidence, held_range(steps, held),
        plot=PlotHint(GROUPS_PER_BATCH, names=[BATCH], threshold=float(expect)))]
