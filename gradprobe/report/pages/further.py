"""The failure report's "Further evidence" pages: one panel per finding whose quantity no
other page draws, four to a page."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..axes import all_positive, has_positive, plot_series
from ..context import PAGE_TITLES, ReportContext
from ..data import decimate, finding_value
from ..style import PAGE_SIZE
from ..text import clip, wrap

PANELS_PER_PAGE = 4


def further_evidence_pages(ctx: ReportContext) -> list[Figure]:
    """Call after every other plot page: it draws the findings none of them marked."""
    left = [f for f in ctx.plotted_findings() if id(f) not in ctx.marked]
    figs = []
    for start in range(0, len(left), PANELS_PER_PAGE):
        chunk = left[start:start + PANELS_PER_PAGE]
        page = ctx.start_page("evidence", chunk, "", loss_legend=False)
        gs = page.grid(max(len(chunk), 2), 1, hspace=0.6)  # the panels fill the page
        for k, f in enumerate(chunk):
            _finding_panel(ctx, page.fig.add_subplot(gs[k]), f)
        figs.append(page.fig)
    return figs


def _finding_panel(ctx: ReportContext, ax, f) -> None:
    """The series finding ``f`` names (as a ratio where it has one), marked with ``f`` alone."""
    plot = finding_value(f, "plot")
    quantity, to = plot["quantity"], plot.get("ratio_to")
    names = [n for n in plot.get("names") or ctx.data.names(quantity)
             if ctx.data.has(quantity, n)]
    values = []
    for name in names:
        if to and ctx.data.has(quantity, to):
            x, y = decimate(*ctx.data.ratio(quantity, name, to))
        else:
            x, y = ctx.data.plotted(quantity, name)
        values.append(y)
        plot_series(ax, x, y, ctx.palette.loss(name), label=name)
    if values and has_positive(values) and all_positive(values):
        lo = min(np.nanmin(y[y > 0]) for y in values if np.any(y > 0))
        hi = max(np.nanmax(y) for y in values)
        with np.errstate(over="ignore"):
            spans_decades = hi / max(lo, 1e-300) > 100
        if spans_decades:
            ax.set_yscale("log")
    unit = f"{quantity} / {to} (ratio)" if to else quantity
    ax.set_ylabel(clip(unit, 40))
    # the finding's title in full, wrapped over the panel's width
    width = ax.get_position().width * PAGE_SIZE[0]
    ax.set_title("\n".join(wrap(f"{finding_value(f, 'id')}: {finding_value(f, 'title')}", width,
                                 9.5, "bold")), fontsize=9.5, fontweight="bold")
    if names:
        ax.legend(loc="best", fontsize=7)
    ctx.mark(ax, quantity, PAGE_TITLES["evidence"], ratio=bool(to), among=[f])
    ctx.step_axis(ax)
