"""The failure report's "Gradient balance" page: each loss's weighted gradient norm on the
shared parameters, its ratio to the largest (or to the dominant loss a finding names), the
cosine of each loss's gradient with the task's, and the cosine matrix at three moments."""

from __future__ import annotations

import warnings

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from ..axes import dashed_level, has_positive, plot_series
from ..context import PAGE_TITLES, ReportContext
from ..data import decimate, finding_value, judged_ratio, moment_indices
from ..diagnosis import DEFAULT_THRESHOLDS
from ..style import PAGE_SIZE, REFERENCE_COLOUR
from ..text import clip, fit, plain, step_label

PAIR_COLOURS = ["#222222", "#7f3c8d", "#3969ac"]  # flagged loss pairs not involving the task

HOW_TO_READ = ("How to read: every loss should move the shared parameters. The diagnosis "
               "reports gradient-swamping when an auxiliary loss's ratio to the largest stays "
               "below the dashed line while the task still learns, gradient-conflict when "
               "two losses' cosine stays negative (opposite pulls on the shared parameters), "
               "and inert-loss when a loss's gradient never reaches them.")


def cosine_matrix_from_gram(gram: np.ndarray) -> np.ndarray:
    """cos(g_i, g_j) = G_ij / sqrt(G_ii G_jj) from a Gram matrix; NaN where a norm is 0."""
    d = np.sqrt(np.clip(np.diag(gram), 0, None))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cos = gram / np.outer(d, d)
    cos[~np.isfinite(cos)] = np.nan
    return np.clip(cos, -1, 1)


def cosine_snapshots(ctx: ReportContext) -> list[tuple[str, int, np.ndarray]]:
    """The loss-by-loss cosine matrix at the start, middle and end: from the recorded Gram
    matrices, else assembled from the recorded pairwise cosines."""
    data, losses = ctx.data, ctx.run.losses
    n = len(losses)
    if "shared" in data.array_names("grad_gram"):
        snaps = []
        for label, step, gram in data.snapshots("grad_gram", "shared"):
            if gram.shape == (n, n):
                snaps.append((label, step, cosine_matrix_from_gram(np.asarray(gram, float))))
        if snaps:
            return snaps
    pairs = {(a, b): f"{a}|{b}" for i, a in enumerate(losses) for b in losses[i + 1:]}
    recorded = [p for p in pairs.values() if data.has("grad_cosine", p)]
    if not recorded:
        return []
    steps, _ = data.series("grad_cosine", recorded[0])
    snaps = []
    for label, i in moment_indices(steps):
        step = int(steps[i])
        mat = np.eye(n)
        for (a, b), key in pairs.items():
            value = np.nan
            if data.has("grad_cosine", key):
                s, v = data.series("grad_cosine", key)
                j = np.searchsorted(s, step)
                if j < len(s) and s[j] == step:
                    value = v[j]
            ia, ib = losses.index(a), losses.index(b)
            mat[ia, ib] = mat[ib, ia] = value
        snaps.append((label, step, mat))
    return snaps


def gradient_pages(ctx: ReportContext) -> list[Figure]:
    data, losses = ctx.data, ctx.run.losses
    norms = [n for n in losses if data.has("weighted_grad_norm", n)]
    snaps = cosine_snapshots(ctx)
    if not norms and not snaps:
        return []
    hits = ctx.preview([("weighted_grad_norm", False), ("weighted_grad_norm", True),
                        ("grad_cosine", False)])
    page = ctx.start_page("gradients", hits, HOW_TO_READ)
    task = ctx.run.task if ctx.run.task in losses else (losses[0] if losses else None)
    pairs = [f"{task}|{n}" if f"{task}|{n}" in data.names("grad_cosine") else f"{n}|{task}"
             for n in losses if n != task]
    pairs = [p for p in pairs if data.has("grad_cosine", p)]
    flagged_pairs = [p for p in ctx.flagged_names("grad_cosine") if data.has("grad_cosine", p)]
    rows: list[str] = []
    if norms:
        rows += ["norms", "ratio"]
    if pairs or flagged_pairs:
        rows.append("cosine")
    if snaps:
        rows.append("heatmaps")
    heights = [1.0 if r != "heatmaps" else 1.15 for r in rows]
    gs = page.grid(len(rows), 1, height_ratios=heights, hspace=0.62)
    for r, row in enumerate(rows):
        if row == "norms":
            _norms_panel(ctx, page.fig.add_subplot(gs[r]), norms)
        elif row == "ratio":
            _ratio_panel(ctx, page.fig.add_subplot(gs[r]), norms, task)
        elif row == "cosine":
            _cosine_panel(ctx, page.fig.add_subplot(gs[r]), pairs, flagged_pairs, task)
        elif row == "heatmaps":
            _heatmaps(ctx, page.fig, gs[r], snaps)
    return [page.fig]


def _norms_panel(ctx: ReportContext, ax, norms: list[str]) -> None:
    flagged = ctx.flagged_names("weighted_grad_norm")
    values = []
    for name in norms:
        x, y = ctx.data.plotted("weighted_grad_norm", name)
        values.append(y)
        plot_series(ax, x, y, ctx.palette.loss(name), emphasis=name in flagged)
    if has_positive(values):
        ax.set_yscale("log", nonpositive="mask")
    ax.set_ylabel("‖w·g‖ (L2 norm)")
    ax.set_title("Weighted gradient norm of each loss on the shared parameters")
    ctx.mark(ax, "weighted_grad_norm", PAGE_TITLES["gradients"])
    ctx.step_axis(ax)


def _ratio_panel(ctx: ReportContext, ax, norms: list[str], task: str | None) -> None:
    data, pal = ctx.data, ctx.palette
    ratio_hits = ctx.matching("weighted_grad_norm", ratio=True)
    to = finding_value(ratio_hits[0], "plot").get("ratio_to") if ratio_hits else None
    flagged = ctx.flagged_names("weighted_grad_norm", ratio=True)
    # A finding's own ratio, where its evidence has it, in place of the recorded norms' ratio:
    # the rule judges per layer, which the ratio of the norms on the whole set can hide.
    judged = {j.loss: j for j in map(judged_ratio, ratio_hits) if j}
    values = []
    if to and data.has("weighted_grad_norm", to):
        for name in [n for n in norms if n != to and n not in judged]:
            x, y = decimate(*data.ratio("weighted_grad_norm", name, to))
            values.append(y)
            plot_series(ax, x, y, pal.loss(name), emphasis=name in flagged)
        for j in judged.values():
            values.append(j.values)
            plot_series(ax, j.steps, j.values, pal.loss(j.loss), label=plain(j.label),
                        emphasis=True)
        ax.set_ylabel(f"‖w·g‖ / ‖w·g‖ of {clip(to, 14)} (ratio)")
        ax.set_title(f"Each loss's weighted gradient norm relative to {to}")
        if judged:
            overs = " / ".join(dict.fromkeys(j.over for j in judged.values()))
            ax.set_title(fit(f"thick: the ratio judged ({overs})",
                             0.4 * ax.get_position().width * PAGE_SIZE[0], 7),
                         loc="right", fontsize=7, color=REFERENCE_COLOUR)
    else:
        ratios = data.ratio_to_largest("weighted_grad_norm", norms)
        for name in [n for n in norms if n != task] or norms:
            if name in ratios:
                x, y = decimate(*ratios[name])
                values.append(y)
                plot_series(ax, x, y, pal.loss(name), emphasis=name in flagged)
        ax.set_ylabel("‖w·g‖ / largest ‖w·g‖ (ratio)")
        ax.set_title("Each auxiliary loss's weighted gradient norm relative to the largest")
    if has_positive(values):
        ax.set_yscale("log", nonpositive="mask")
    if not ratio_hits:
        threshold = DEFAULT_THRESHOLDS.swamping_ratio
        dashed_level(ax, threshold, f"swamping threshold {threshold:g}")
    ctx.mark(ax, "weighted_grad_norm", PAGE_TITLES["gradients"], ratio=True)
    ctx.step_axis(ax)


def _cosine_panel(ctx: ReportContext, ax, pairs: list[str], flagged_pairs: list[str],
                  task: str | None) -> None:
    data, pal = ctx.data, ctx.palette
    for p in pairs:
        other = [n for n in p.split("|") if n != task]
        x, y = data.plotted("grad_cosine", p)
        plot_series(ax, x, y, pal.loss(other[0] if other else p), emphasis=p in flagged_pairs)
    extra = [p for p in flagged_pairs if p not in pairs]
    for k, p in enumerate(extra):
        x, y = data.plotted("grad_cosine", p)
        style = {**pal.other(p), "color": PAIR_COLOURS[k % len(PAIR_COLOURS)]}
        plot_series(ax, x, y, style, label=f"{p} (flagged pair)", emphasis=True)
    if extra:
        ax.legend(loc="lower right", fontsize=7, ncol=3)
    ax.axhline(0, color=REFERENCE_COLOUR, linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("cos(g_i, g_j) (−1 to 1)")
    ax.set_title(f"Gradient cosine of each loss with {task} (colour: the other loss)")
    ctx.mark(ax, "grad_cosine", PAGE_TITLES["gradients"])
    ctx.step_axis(ax)


def _heatmaps(ctx: ReportContext, fig: Figure, cell, snaps) -> None:
    losses = ctx.run.losses
    n = len(losses)
    sub = cell.subgridspec(1, 4, width_ratios=[1, 1, 1, 0.06], wspace=0.35)
    cbar_ax = fig.add_subplot(sub[0, 3])
    annot = n <= 8
    fmt = ".2f" if n <= 5 else ".1f"
    size = 7 if n <= 5 else (6 if n <= 6 else 5)
    # tick labels are formatted when drawn, after the page is finished: plain from the start
    labels = [plain(name if len(name) <= 10 else f"{name[:4]}…{name[-5:]}") for name in losses]
    heat_axes = []
    for k, (label, step, mat) in enumerate(snaps):
        ax = fig.add_subplot(sub[0, k])
        mask = np.triu(np.ones_like(mat, dtype=bool), k=1)
        with warnings.catch_warnings():  # seaborn's own use of Colormap.set_bad
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(mat, ax=ax, vmin=-1, vmax=1, center=0, cmap="vlag", mask=mask,
                        annot=annot, fmt=fmt, annot_kws={"size": size}, square=True,
                        linewidths=0.4, linecolor="white", cbar=k == 0,
                        cbar_ax=cbar_ax if k == 0 else None,
                        cbar_kws={"label": "cosine (−1 to 1)"}, xticklabels=labels,
                        yticklabels=labels if k == 0 else False)
        ax.set_title(f"{label}: step {step_label(step)}", fontsize=8.5)
        heat_axes.append(ax)
        ax.tick_params(axis="x", labelrotation=90 if n > 3 else 0, labelsize=7 if n <= 6 else 6)
        ax.tick_params(axis="y", labelrotation=0, labelsize=7 if n <= 6 else 6)
        ax.grid(False)
    for k in range(len(snaps), 3):
        fig.add_subplot(sub[0, k]).set_axis_off()
    # the heatmaps are square: give the colour bar their height, not the whole row's
    if heat_axes:
        first = heat_axes[0]
        first.apply_aspect()
        box, cb = first.get_position(), cbar_ax.get_position()
        cbar_ax.set_position([cb.x0 - 0.03, box.y0, cb.width, box.height])
