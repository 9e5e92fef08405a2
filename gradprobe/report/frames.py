"""The pages themselves: the plot-page frame, the flowing text page, and what every page gets
at the end (its footer and the guards that let it draw whatever the run holds).

The failure report and the comparison build all their pages from :class:`Frame` (a plot page:
title, corner label, "what to look at" sentences, legend, grid) and :class:`TextFlow` (a text
page: lines placed top-down, with the legend swatch and the severity badge of the tables).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from gradprobe._version import __version__

from .style import PAGE_SIZE, SEVERITY_COLOURS
from .text import clip, fit, plain, wrap

LEFT, RIGHT = 0.1, 0.95  # the plot grid's margins, in page fractions
GREY = "#666666"


class Frame:
    """An A4 plot page: title, a grey corner label, 'what to look at' sentences and a legend.

    The report's pages have the losses in the legend, the comparison's the runs.
    """

    def __init__(self, title: str, corner: str, legend: list[tuple[str, dict]] | None = None,
                 *, more: str = "… (more on the 'Findings in detail' page)"):
        self.title = title
        self.fig = Figure(figsize=PAGE_SIZE)
        self.fig.text(0.06, 0.972, title, fontsize=15, fontweight="bold", va="top")
        self.fig.text(0.94, 0.968, clip(corner, 50), fontsize=8, ha="right", va="top",
                      color=GREY)
        self.legend = list(legend or [])
        self.more = more
        self.top = 0.935

    def header(self, sentences: list[str]) -> None:
        """Write the 'what to look at' sentences and the legend; sets where the plots start."""
        y = 0.945
        lines: list[str] = []
        for s in sentences:
            lines.extend(wrap(s, 0.88 * PAGE_SIZE[0], 8.5))
        for line in lines[:9]:
            self.fig.text(0.06, y, line, fontsize=8.5, va="top")
            y -= 0.0145
        if len(lines) > 9:
            self.fig.text(0.06, y, self.more, fontsize=8, va="top", color=GREY)
            y -= 0.0145
        if self.legend:
            labels = [label for label, _ in self.legend]
            handles = [Line2D([], [], **{**style, "markevery": None}) for _, style in self.legend]
            ncol = min(len(labels), 6)
            rows = math.ceil(len(labels) / ncol)
            self.fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, y - 0.002),
                            ncol=ncol, fontsize=8, frameon=False, handlelength=3.2,
                            columnspacing=1.6, title=None)
            y -= 0.0175 * rows + 0.008
        self.top = y - 0.035

    def grid(self, nrows: int, ncols: int, **kw) -> GridSpec:
        return GridSpec(nrows, ncols, figure=self.fig, left=LEFT, right=RIGHT, top=self.top,
                        bottom=0.075, **{"hspace": 0.55, "wspace": 0.3, **kw})


class TextFlow:
    """Lines of text placed top-down in inches; a new A4 page when one is full."""

    MARGIN_TOP, MARGIN_BOTTOM, X0 = 0.7, 0.7, 0.55
    X1 = 7.72  # the right edge of the text (the page width less X0)

    def __init__(self, corner: str, title: str, *, title_first: bool = True):
        """``corner``: the grey label top right; ``title``: each page's heading (the first
        page's only with ``title_first``; later pages say "(continued)")."""
        self.corner = corner
        self.title = title
        self.title_first = title_first
        self.figs: list[Figure] = []
        self._new_page()

    def _new_page(self) -> None:
        self.fig = Figure(figsize=PAGE_SIZE)
        self.figs.append(self.fig)
        self.y = self.MARGIN_TOP
        title = self.title + (" (continued)" if len(self.figs) > 1 else "")
        self.fig.text(0.94, 1 - 0.35 / PAGE_SIZE[1], clip(self.corner, 50), fontsize=8,
                      ha="right", va="top", color=GREY)
        if len(self.figs) > 1 or self.title_first:
            self.text(title, size=15, weight="bold", gap=0.42)

    def need(self, inches: float) -> bool:
        """Start a new page unless ``inches`` fit on this one; True when it did."""
        if self.y + inches > PAGE_SIZE[1] - self.MARGIN_BOTTOM:
            self._new_page()
            return True
        return False

    def fy(self, y_in: float) -> float:
        return 1 - y_in / PAGE_SIZE[1]

    def fx(self, x_in: float) -> float:
        return x_in / PAGE_SIZE[0]

    def text(self, s: str, *, size: float = 8.5, weight: str = "normal", colour: str = "black",
             x: float | None = None, gap: float | None = None, family: str | None = None,
             **kw) -> None:
        height = gap if gap is not None else size * 1.45 / 72
        self.need(height)
        self.fig.text(self.fx(self.X0 if x is None else x), self.fy(self.y), s, fontsize=size,
                      fontweight=weight, color=colour, va="top", family=family, **kw)
        self.y += height

    def paragraph(self, s: str, *, size: float = 8.5, x: float | None = None,
                  weight: str = "normal", family: str | None = None, max_lines: int = 0,
                  **kw) -> None:
        x0 = self.X0 if x is None else x
        lines = wrap(s, PAGE_SIZE[0] - self.X0 - x0, size, weight, family)
        if max_lines and len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = fit(lines[-1] + " …", PAGE_SIZE[0] - self.X0 - x0, size, weight, family)
        for line in lines:
            self.text(line, size=size, x=x, weight=weight, family=family, **kw)

    def fit(self, s: Any, x_from: float, x_to: float, size: float = 8.5,
            weight: str = "normal", family: str | None = None) -> str:
        return fit(s, x_to - x_from, size, weight, family)

    def space(self, inches: float) -> None:
        self.y += inches

    def document_title(self, title: str) -> None:
        """The document's title at the top of its first page, cut to the width."""
        self.text(self.fit(title, self.X0, self.X1, 17, "bold"), size=17, weight="bold", gap=0.36)

    def heading(self, title: str) -> None:
        """A section heading ("The run", "Findings")."""
        self.text(title, size=11, weight="bold", gap=0.26)

    def rule(self, x0: float, x1: float, *, drop: float = 0.0, colour: str = "#dddddd",
             linewidth: float = 0.6) -> None:
        """A horizontal rule from ``x0`` to ``x1`` inches, ``drop`` inches below the line."""
        self.fig.lines.append(Line2D([self.fx(x0), self.fx(x1)], [self.fy(self.y + drop)] * 2,
                                     transform=self.fig.transFigure, color=colour,
                                     linewidth=linewidth))

    def swatch(self, x0: float, x1: float, style: dict, *, drop: float = 0.065,
               linewidth: float = 1.6, markersize: float = 3.5) -> None:
        """A legend swatch: a series' line style from ``x0`` to ``x1`` inches with its marker
        in the middle, ``drop`` inches below the line's top (a loss, a run)."""
        y = self.fy(self.y + drop)
        self.fig.lines.append(Line2D([self.fx(x0), self.fx(x1)], [y, y],
                                     transform=self.fig.transFigure, color=style["color"],
                                     linestyle=style["linestyle"], linewidth=linewidth))
        self.fig.lines.append(Line2D([self.fx((x0 + x1) / 2)], [y],
                                     transform=self.fig.transFigure, color=style["color"],
                                     marker=style["marker"], markersize=markersize))

    def badge(self, x: float, severity: str) -> None:
        """A severity badge at ``x`` inches on the current line: the severity in capitals,
        white on the severity's colour."""
        colour = SEVERITY_COLOURS.get(severity, "black")
        self.fig.patches.append(Rectangle((self.fx(x), self.fy(self.y + 0.2)), self.fx(0.7),
                                          0.18 / PAGE_SIZE[1], transform=self.fig.transFigure,
                                          facecolor=colour, edgecolor="none"))
        self.fig.text(self.fx(x + 0.35), self.fy(self.y + 0.11), severity.upper(), fontsize=7,
                      fontweight="bold", color="white", ha="center", va="center")


# Axis limits matplotlib's tick code can work with: beyond them it overflows float64 (the
# span of [-1.7e308, 1.7e308] is inf; log ticks a stride beyond 1e-302 underflow to 0).
# Values past them lie outside the drawn range.
AXIS_LIMIT, LOG_AXIS_LIMIT = 1e300, 1e150


def _finite_span(lo: float, hi: float, log: bool) -> tuple[float, float] | None:
    """Limits within what matplotlib's tick code can work with; None when they already are."""
    low, high = (1 / LOG_AXIS_LIMIT, LOG_AXIS_LIMIT) if log else (-AXIS_LIMIT, AXIS_LIMIT)
    if low <= lo and hi <= high:
        return None
    lo, hi = min(max(lo, low), high), max(min(hi, high), low)
    if lo < hi:
        return lo, hi
    return (high / 10, high) if lo >= high else (low, low * 10 if log else low / 10)


def _texts(artist: Any) -> Iterable[Text]:
    """The texts placed on a page, down to axis labels (an axis' tick labels are made when it
    is drawn, from its formatter: asking for them would make every tick now)."""
    for child in artist.get_children():
        if isinstance(child, Axis):
            yield child.label
        elif isinstance(child, Text):
            yield child
        else:
            yield from _texts(child)


def _finish_page(fig: Figure) -> None:
    """What every page needs to draw whatever the run holds: its texts plain (the report's own
    texts hold no ``$`` and only characters its font has; names may not), axis limits whose
    span is a finite number, and markers a line can draw (markers spaced along a line in
    display space, a float ``markevery``, fail in matplotlib on a line with no drawable point:
    empty, all NaN or Inf, or all zero on a log axis; such a line draws nothing either way)."""
    for ax in fig.axes:
        for axis, get, set_ in ((ax.xaxis, ax.get_xlim, ax.set_xlim),
                                (ax.yaxis, ax.get_ylim, ax.set_ylim)):
            limits = _finite_span(*get(), axis.get_scale() == "log")
            if limits is not None:
                set_(*limits)
    for text in _texts(fig):
        text.set_text(plain(text.get_text()))
    for ax in fig.axes:
        for line in ax.get_lines():
            if not isinstance(line.get_markevery(), float):
                continue
            with np.errstate(all="ignore"):
                points = line.get_transform().transform(line.get_xydata())
            if not np.isfinite(points).all(axis=1).any():
                line.set_markevery(None)


def number_pages(pages: list[tuple[str, Figure]], footer: str) -> list[tuple[str, Figure]]:
    """Name the pages (a key's second page gets ``-2``...), write each one's footer and
    finish it for drawing (texts plain, finite axis limits, drawable markers)."""
    named: list[tuple[str, Figure]] = []
    seen: dict[str, int] = {}
    total = len(pages)
    for number, (key, fig) in enumerate(pages, 1):
        seen[key] = seen.get(key, 0) + 1
        name = key if seen[key] == 1 else f"{key}-{seen[key]}"
        fig.text(0.5, 0.018, f"{clip(footer, 40)} · gradprobe {__version__} · page {number} "
                 f"of {total}", fontsize=7, ha="center", color="#888888")
        _finish_page(fig)
        named.append((name, fig))
    return named
