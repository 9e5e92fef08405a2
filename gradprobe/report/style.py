"""The report's look: one fixed palette keyed by loss order, print-safe line styles, page sizes.

Every loss keeps its colour, line style and marker on every page (keyed by its position in
``run.losses``), so a reader can follow ``cont`` from the gradient page to the loss page, and
the line style and marker tell the losses apart when the report is printed in grayscale.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import matplotlib as mpl
import seaborn as sns

# Page: A4 portrait, in inches.
PAGE_SIZE = (8.27, 11.69)

# seaborn "colorblind" (10) plus two darker tones, so 12 losses never share a colour.
LOSS_COLOURS = ['#0173b2', '#de8f05', '#029e73', '#d55e00', '#cc78bc', '#ca9161',
                '#fbafe4', '#949494', '#ece133', '#56b4e9', '#3b3b3b', '#6a3d9a']
LINE_STYLES = ["-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1)),
               (0, (8, 3)), "-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)),
               (0, (3, 1, 1, 1, 1, 1)), (0, (8, 3))]
OTHER_STYLES = ["-", (0, (5, 2)), (0, (6, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1)), (0, (8, 3)),
                (0, (2, 1))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]

# Latents, prototype sets, saturation watches...: a second palette, so they are never
# mistaken for losses.
OTHER_COLOURS = ['#1b9e77', '#d95f02', '#7570b3', '#e7298a', '#66a61e', '#e6ab02',
                 '#a6761d', '#666666']

# start / middle / end snapshots: light to dark, with distinct line styles.
MOMENT_COLOURS = ["#9ecae1", "#3182bd", "#08306b"]
MOMENT_STYLES = [(0, (1, 1.5)), (0, (5, 2)), "-"]

SEVERITY_COLOURS = {"error": "#c0392b", "warning": "#e08e0b", "info": "#2e86c1"}
CLEAR_COLOUR = "#1e8449"  # good news: no failure mode, a finding cleared

# Runs in a comparison (``gradprobe compare``): strongly contrasting colours (the first two,
# blue and vermillion, are the before/after pair), each with its own line style and marker.
RUN_COLOURS = ['#0173b2', '#d55e00', '#029e73', '#cc78bc', '#3b3b3b', '#de8f05', '#56b4e9',
               '#6a3d9a']

REFERENCE_COLOUR = "#555555"
MARKEVERY = 0.12  # markers spaced along the line in display space (readable in grayscale)


def series_style(index: int, palette: list[str] | None = None) -> dict:
    """Matplotlib keyword arguments for the ``index``-th loss (or other named series)."""
    colours = palette or LOSS_COLOURS
    return {
        "color": colours[index % len(colours)],
        "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
        "marker": MARKERS[index % len(MARKERS)],
        "markersize": 3.5,
        "markevery": MARKEVERY,
        "linewidth": 1.3,
    }


def run_style(index: int) -> dict:
    """Matplotlib keyword arguments for the ``index``-th run of a comparison (never dotted:
    dotted lines are the references)."""
    style = series_style(index, RUN_COLOURS)
    style["linestyle"] = OTHER_STYLES[index % len(OTHER_STYLES)]
    style["linewidth"] = 1.5
    return style


class Palette:
    """Styles keyed by name: losses by their order in the run, other names in first-seen order."""

    def __init__(self, losses: list[str]):
        self.losses = list(losses)
        self._others: dict[str, int] = {}

    def loss(self, name: str) -> dict:
        if name in self.losses:
            return series_style(self.losses.index(name))
        return self.other(name)

    def other(self, name: str) -> dict:
        """A non-loss series (latent, prototype set, watch): numbered afresh on every page."""
        index = self._others.setdefault(name, len(self._others))
        style = series_style(index, OTHER_COLOURS)
        # never plain dotted: dotted lines are the references (isotropic rank, null levels)
        style["linestyle"] = OTHER_STYLES[index % len(OTHER_STYLES)]
        style["marker"] = MARKERS[(index + 5) % len(MARKERS)]
        return style

    def new_page(self) -> None:
        self._others.clear()

    def colour(self, name: str) -> str:
        return self.loss(name)["color"]


@contextlib.contextmanager
def report_style() -> Iterator[None]:
    """seaborn's whitegrid/paper look, with fonts sized for an A4 page; restored afterwards."""
    rc = {
        "font.size": 8.5, "axes.titlesize": 9.5, "axes.labelsize": 8.5, "xtick.labelsize": 7.5,
        "ytick.labelsize": 7.5, "legend.fontsize": 7.5, "legend.title_fontsize": 8,
        "axes.titleweight": "bold", "axes.titlelocation": "left", "figure.dpi": 100,
        "pdf.fonttype": 3, "svg.fonttype": "none", "axes.formatter.limits": (-4, 5),
        "axes.formatter.use_mathtext": True, "legend.frameon": False,
        "grid.linewidth": 0.5, "lines.solid_capstyle": "round",
        # unhinted glyphs: PNG renderings have the same text widths as the PDF
        "text.hinting": "no_hinting",
    }
    with mpl.rc_context():
        sns.set_theme(context="paper", style="whitegrid", rc=rc)
        yield
