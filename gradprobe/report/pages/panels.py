"""A page of step panels from panel specs: the layout the prototypes, saturation and batches
pages share.

A spec is a dict: ``quantity`` and ``names`` (what it draws and what its findings are marked
on), then either ``draw(ax)`` or ``ylabel``, ``title`` and optionally ``log``, ``ylim``,
``refs`` (``[(value, label)]`` dotted reference levels) and ``legend``; ``span=2`` makes a
panel take a whole row, ``threshold_axis="x"`` draws its findings' thresholds vertically.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from ..axes import has_positive, plot_series
from ..context import PAGE_TITLES, ReportContext
from ..style import REFERENCE_COLOUR

NCOLS = 2


def panel_pages(ctx: ReportContext, key: str, panels: list[dict], how_to_read: str
                ) -> list[Figure]:
    """The page ``key`` with one panel per spec whose quantity was recorded (none: no page)."""
    panels = [p for p in panels if p.get("draw") or any(ctx.data.has(p["quantity"], n)
                                                         for n in p["names"])]
    if not panels:
        return []
    slots: list[dict | None] = []  # row by row; a full-width panel starts a row and fills it
    for p in panels:
        if p.get("span") == 2:
            slots += [None] * (-len(slots) % NCOLS) + [p] + [None] * (NCOLS - 1)
        else:
            slots.append(p)
    page = ctx.start_page(key, ctx.preview([(p["quantity"], False) for p in panels]),
                          how_to_read, loss_legend=False)
    gs = page.grid(max(math.ceil(len(slots) / NCOLS), 2), NCOLS, hspace=0.55)
    for k, p in enumerate(slots):
        if p is None:
            continue
        row, col = divmod(k, NCOLS)
        ax = page.fig.add_subplot(gs[row, :] if p.get("span") == 2 else gs[row, col])
        if p.get("draw"):
            p["draw"](ax)
        else:
            _series_panel(ctx, ax, p)
        ctx.mark(ax, p["quantity"], PAGE_TITLES[key],
                 threshold_axis=p.get("threshold_axis", "y"))
    return [page.fig]


def _series_panel(ctx: ReportContext, ax, p: dict) -> None:
    """One panel of step series from a panel spec."""
    flagged = ctx.flagged_names(p["quantity"])
    values = []
    for name in p["names"]:
        if not ctx.data.has(p["quantity"], name):
            continue
        x, y = ctx.data.plotted(p["quantity"], name)
        values.append(y)
        plot_series(ax, x, y, ctx.palette.other(name), label=name, emphasis=name in flagged)
    if p.get("log") and has_positive(values):
        ax.set_yscale("log", nonpositive="mask")
    if p.get("ylim"):
        ax.set_ylim(*p["ylim"])
    _include_refs(ax, p)
    for value, label in p.get("refs", []):
        ax.axhline(value, color=REFERENCE_COLOUR, linestyle=(0, (1, 1.5)), linewidth=1.0)
        ax.annotate(label, xy=(0.0, value), xycoords=("axes fraction", "data"),
                    xytext=(2, 2), textcoords="offset points", fontsize=6.5,
                    color=REFERENCE_COLOUR)
    if len(p["names"]) > 1 or p.get("legend"):
        ax.legend(loc="best", fontsize=7)
    ax.set_ylabel(p["ylabel"])
    ax.set_title(p["title"])
    ctx.step_axis(ax)


def _include_refs(ax, p: dict) -> None:
    """Keep reference lines (and their labels) inside the axes, with room above them."""
    refs = [v for v, _ in p.get("refs", [])]
    if not refs:
        return
    lo, hi = ax.get_ylim()
    top = max(refs)
    if ax.get_yscale() == "log":
        if top * 1.6 > hi:
            ax.set_ylim(lo, top * 1.6)
        if min(refs) < lo:
            ax.set_ylim(min(refs) / 1.6, ax.get_ylim()[1])
    else:
        span = max(hi - lo, abs(top) * 0.1, 1e-12)
        if top + 0.08 * span > hi:
            ax.set_ylim(lo, top + 0.1 * span)
        if min(refs) < lo:
            ax.set_ylim(min(refs) - 0.05 * span, ax.get_ylim()[1])
