"""The failure report's "Sigmoid saturation" page: the saturated share and mean sigmoid
gradient of each watch, the histogram of its inputs at the first and last probe step with the
flat regions hatched, the temperature and the energy-scale ratio."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from gradprobe.metrics.saturation_grid import SATURATION_THRESHOLD, histogram_edges

from ..context import ReportContext
from ..data import RunData
from ..style import REFERENCE_COLOUR, Palette
from ..text import step_label
from .panels import panel_pages

HOW_TO_READ = ("How to read: inputs in the shaded flat regions get almost no gradient. The "
               "diagnosis reports sigmoid-saturation when a large share of inputs stays there; "
               "with a large energy-scale ratio at a fixed temperature it names the temperature.")
HISTOGRAMS = 2  # watches whose histograms share the panel


def saturation_pages(ctx: ReportContext) -> list[Figure]:
    d = ctx.data
    watches = sorted(set(d.names("saturated_fraction")) |
                     set(d.array_names("saturation_histogram")))
    if not watches:
        return []
    panels = [
        dict(quantity="saturated_fraction", names=watches, ylim=(-0.02, 1.02),
             ylabel="share of |x| > threshold", title="Saturated share of sigmoid inputs"),
        dict(quantity="mean_sigmoid_grad", names=watches, ylim=(0, 0.26),
             refs=[(0.25, "maximum 0.25"), (0.2067, "standard-normal inputs 0.207")],
             ylabel="mean σ′(x)", title="Mean sigmoid gradient"),
    ]
    if any(n in d.array_names("saturation_histogram") for n in watches):
        panels.append(dict(quantity="saturation_histogram", names=watches, span=2,
                           threshold_axis="x",
                           draw=lambda ax: _histogram(ax, d, ctx.palette, watches)))
    panels += [
        dict(quantity="temperature", names=watches, ylabel="temperature T",
             title="Temperature"),
        dict(quantity="energy_scale_ratio", names=watches, log=True, refs=[(1.0, "matched 1")],
             ylabel="std ratio of the energy terms", title="Energy-scale ratio (U vs R)"),
    ]
    return panel_pages(ctx, "saturation", panels, HOW_TO_READ)


def _histogram(ax, d: RunData, palette: Palette, watches: list[str]) -> None:
    for k, name in enumerate(watches[:HISTOGRAMS]):
        steps, hists = d.arrays("saturation_histogram", name)
        if not len(steps):
            continue
        style = palette.other(name)
        last = np.asarray(hists[-1], float)
        edges = histogram_edges(bins=len(last))
        with np.errstate(invalid="ignore", over="ignore"):  # a histogram holding inf
            share = last / max(last.sum(), 1)
        ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color=style["color"],
               alpha=0.55 if k == 0 else 0.35, edgecolor=style["color"], linewidth=0.6,
               label=f"{name}: last probe step {step_label(steps[-1])}")
        if len(steps) > 1:
            first = np.asarray(hists[0], float)
            with np.errstate(invalid="ignore", over="ignore"):
                first = first / max(first.sum(), 1)
            ax.stairs(first, edges, color=REFERENCE_COLOUR,
                      linestyle=(0, (4, 2)), linewidth=1.0,
                      label=f"{name}: first probe step {step_label(steps[0])}")
        threshold = SATURATION_THRESHOLD
        if d.has("saturation_threshold", name):
            threshold = float(d.series("saturation_threshold", name)[1][-1])
        lim = edges[-1]
        for a, b in ((-lim, -threshold), (threshold, lim)):
            ax.axvspan(a, b, facecolor="#999999", alpha=0.18, hatch="///", edgecolor="#bbbbbb",
                       linewidth=0, zorder=0)
    ax.annotate("flat region of the sigmoid (|x| > threshold): gradient < 1/25 of its maximum",
                xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, -3),
                textcoords="offset points", ha="center", va="top", fontsize=6.5,
                color="#444444")
    ax.set_xlabel("sigmoid input x (logit, clipped to ±20)")
    ax.set_ylabel("share of inputs")
    ax.set_title("Sigmoid inputs at the last probe step (dashed: first probe step)")
    ax.legend(loc="upper left", fontsize=7, bbox_to_anchor=(0, 0.93))
