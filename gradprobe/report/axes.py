"""What the plot pages draw on an axes, written once: a recorded series, the step axis, a
dashed level with its label, and room above the data for labels."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .style import REFERENCE_COLOUR
from .text import step_label

DASHED = (0, (4, 2))  # thresholds and declared levels; dotted lines are healthy references


def has_positive(values: Iterable[np.ndarray]) -> bool:
    """Whether any series holds a finite value above 0 (a log axis can show it)."""
    return any(np.any(np.isfinite(v) & (v > 0)) for v in values)


def all_positive(values: Iterable[np.ndarray]) -> bool:
    """Whether every finite value of every series is above 0 (nothing a log axis would hide)."""
    return all(np.all(y[np.isfinite(y)] > 0) for y in values)


def plot_series(ax, x, y, style: dict, label: str | None = None, emphasis: bool = False,
                **extra):
    """One recorded series in its style; ``emphasis`` (a flagged series) draws it thicker, and
    a series of one point is drawn as its marker alone."""
    kw = dict(style)
    if emphasis:
        kw["linewidth"] = kw.get("linewidth", 1.3) + 1.0
    kw.update(extra)
    if len(x) == 1:
        kw["linestyle"] = "none"
        kw["markevery"] = None
    return ax.plot(x, y, label=label, **kw)


def dashed_level(ax, value: float, label: str | None, colour: str = REFERENCE_COLOUR, *,
                 linewidth: float = 1.0, zorder: tuple[float, float] | None = None) -> None:
    """A dashed horizontal level (a threshold, a declared value), labelled at its right end
    on a white box (no label when ``label`` is None: the level was labelled already).
    ``zorder``: the (line, label) drawing order, matplotlib's defaults when not given."""
    line_order, label_order = ({}, {}) if zorder is None else \
        ({"zorder": zorder[0]}, {"zorder": zorder[1]})
    ax.axhline(value, color=colour, linestyle=DASHED, linewidth=linewidth, **line_order)
    if label is not None:
        ax.annotate(label, xy=(1.0, value), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=6.5,
                    color=colour, bbox=dict(boxstyle="square,pad=0.1", facecolor="white",
                                            edgecolor="none", alpha=0.8), **label_order)


def step_axis(ax, xlim: tuple[int, int] | None, label: bool = True) -> None:
    """A step x axis over ``xlim`` (1% padding), with 1k/1M tick labels."""
    if xlim is not None and xlim[1] > xlim[0]:
        pad = 0.01 * (xlim[1] - xlim[0])
        ax.set_xlim(xlim[0] - pad, xlim[1] + pad)
    ax.xaxis.set_major_formatter(FuncFormatter(step_label))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    if label:
        ax.set_xlabel("step")


def headroom(ax, points: float, include: Iterable[float] = ()) -> None:
    """Raise the top of ``ax``'s y range so the data stays below a band ``points`` high.

    Works in the axis' own scale (linear or log) and always from the y range the axes had
    before the first call (widened to ``include``, e.g. threshold lines drawn since), so
    repeated calls never compound.
    """
    base = getattr(ax, "_gradprobe_ylim", None) or ax.get_ylim()
    values = [v for v in include if np.isfinite(v)]
    if ax.get_yscale() == "log":
        values = [v for v in values if v > 0]
    if values:
        base = (min(base[0], min(values)), max(base[1], max(values)))
    ax._gradprobe_ylim = base
    fig: Any = ax.get_figure()
    height_pt = ax.get_position().height * fig.get_figheight() * 72
    if height_pt <= 0:
        return
    band = min(points / height_pt, 0.5)
    scale = ax.yaxis.get_transform()
    lo, hi = scale.transform([base[0], base[1]])
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return
    top = scale.inverted().transform([lo + (hi - lo) / (1 - band)])[0]
    if np.isfinite(top):
        ax.set_ylim(base[0], top)
