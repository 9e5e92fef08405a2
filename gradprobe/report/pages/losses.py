"""The failure report's "Losses" page: each loss relative to its first value, the logged
validation series against the training task loss, and the loss weights."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..axes import all_positive, has_positive, plot_series
from ..context import PAGE_TITLES, ReportContext
from ..data import decimate
from ..style import REFERENCE_COLOUR, SEVERITY_COLOURS

HOW_TO_READ = ("How to read: the diagnosis reports constraint-neglect when a constraint loss "
               "stays near 1× its first value while the task falls towards 0, overfitting when "
               "a logged validation loss rises while the training loss keeps falling, and "
               "static-loss-weights when the weights of losses that suffer stay flat.")


def loss_pages(ctx: ReportContext) -> list[Figure]:
    data = ctx.data
    names = [n for n in ctx.run.losses if data.has("loss", n)]
    if not names:
        return []
    val = [n for n in data.names("logged") if n.lower().startswith("val")]
    weights = [n for n in ctx.run.losses if data.has("weight", n)]
    hits = ctx.preview([("loss", False), ("logged", False), ("weight", False)])
    page = ctx.start_page("losses", hits, HOW_TO_READ)
    rows = ["relative"] + (["val"] if val else []) + (["weights"] if weights else [])
    heights = {"relative": 1.3, "val": 1.0, "weights": 0.8}
    gs = page.grid(len(rows), 1, height_ratios=[heights[r] for r in rows], hspace=0.5)
    for r, row in enumerate(rows):
        ax = page.fig.add_subplot(gs[r])
        if row == "relative":
            _relative_panel(ctx, ax, names)
        elif row == "val":
            _validation_panel(ctx, ax, val)
        else:
            _weights_panel(ctx, ax, weights)
        ctx.step_axis(ax)
    return [page.fig]


def _relative_panel(ctx: ReportContext, ax, names: list[str]) -> None:
    flagged = ctx.flagged_names("loss")
    values = []
    for name in names:
        relative = ctx.data.relative_to_first("loss", name)
        if relative is None:
            continue
        x, y = decimate(*relative)
        values.append(y)
        plot_series(ax, x, y, ctx.palette.loss(name), emphasis=name in flagged)
    if values and all_positive(values) and has_positive(values):
        ax.set_yscale("log")
    ax.axhline(1.0, color=REFERENCE_COLOUR, linewidth=0.8)
    ax.set_ylabel("loss / its first value (ratio)")
    ax.set_title("Each loss relative to its first recorded value")
    for event in ctx.run.events():
        if event["kind"] in ("non_finite", "non_finite_at_close", "inert_loss"):
            ax.axvline(event["step"], color=SEVERITY_COLOURS["error"], linewidth=0.8, alpha=0.6)
    ctx.mark(ax, "loss", PAGE_TITLES["losses"])


def _validation_panel(ctx: ReportContext, ax, val: list[str]) -> None:
    data, pal, task = ctx.data, ctx.palette, ctx.run.task
    flagged = ctx.flagged_names("logged")
    acc = [n for n in val if "acc" in n.lower()]
    lossy = [n for n in val if n not in acc]
    if task and data.has("loss", task) and lossy:
        x, y = data.plotted("loss", task)
        plot_series(ax, x, y, pal.loss(task), label=f"{task} (training)")
    for name in lossy:
        x, y = data.plotted("logged", name)
        plot_series(ax, x, y, pal.other(name), label=name, emphasis=name in flagged)
    ax.set_ylabel("loss (value)")
    if acc:
        ax2 = ax.twinx() if lossy else ax
        for name in acc:
            x, y = data.plotted("logged", name)
            plot_series(ax2, x, y, pal.other(name), label=name, emphasis=name in flagged)
        ax2.set_ylabel("accuracy (share)")
        ax2.grid(False)
        if ax2 is not ax:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=7, ncol=2)
        else:
            ax.legend(loc="upper right", fontsize=7)
    else:
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    ax.set_title("Validation (logged) against the training task loss")
    ctx.mark(ax, "logged", PAGE_TITLES["losses"])


def _weights_panel(ctx: ReportContext, ax, weights: list[str]) -> None:
    values = []
    flagged = ctx.flagged_names("weight")
    for name in weights:
        x, y = ctx.data.plotted("weight", name)
        values.append(y)
        plot_series(ax, x, y, ctx.palette.loss(name), emphasis=name in flagged)
    if has_positive(values) and all_positive(values):
        ax.set_yscale("log")
    ax.set_ylabel("loss weight w")
    ax.set_title("Loss weights (flat lines: fixed weights)")
    ctx.mark(ax, "weight", PAGE_TITLES["losses"])
