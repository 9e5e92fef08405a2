"""The report's figures: one A4 page each, conclusions first, then the evidence.

:func:`report_figures` returns every page as ``(name, Figure)``; the PDF writer
(:mod:`gradprobe.report.pdf`) and the docs images (``scripts/report_images.py``) both use it, so
the PNGs in the docs are exactly the pages of the PDF. Pages whose quantities were not recorded
are left out. Every finding with a plot is marked on its plot: the step range where it held is
shaded in its severity colour and its threshold is drawn as a dashed line; each page says in one
sentence per finding what to look at.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot, no global figure state).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Any, Callable, Iterable

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, MaxNLocator

from gradprobe import __version__
from gradprobe.record import Run

from .data import RunData, finding_value, moment_indices
from .evidence import evidence_parts
from .style import (MOMENT_COLOURS, MOMENT_STYLES, PAGE_SIZE, REFERENCE_COLOUR, SEVERITY_COLOURS,
                    SEVERITY_ORDER, Palette, report_style)

__all__ = ["report_figures", "PAGE_TITLES", "sorted_findings", "DEFAULT_SWAMPING_THRESHOLD"]

try:  # the diagnosis' own default, so the line drawn without a finding is the rule's line
    from gradprobe.diagnose import Thresholds as _Thresholds  # type: ignore[attr-defined]
    DEFAULT_SWAMPING_THRESHOLD = float(_Thresholds().swamping_ratio)
except Exception:  # pragma: no cover - diagnose not importable
    DEFAULT_SWAMPING_THRESHOLD = 0.1

PAGE_TITLES = {
    "verdict": "Verdict",
    "findings": "Findings in detail",
    "gradients": "Gradient balance",
    "losses": "Losses",
    "representations": "Representations",
    "prototypes": "Prototypes",
    "saturation": "Sigmoid saturation",
    "batches": "Batches and contrastive negatives",
    "evidence": "Further evidence",
}

LEFT, RIGHT = 0.1, 0.95
PAIR_COLOURS = ["#222222", "#7f3c8d", "#3969ac"]  # flagged loss pairs not involving the task
_TEXT_TO_PATH = TextToPath()

# -- small helpers -----------------------------------------------------------------------------


def sorted_findings(findings: Iterable[Any]) -> list[Any]:
    """Errors first, then warnings, then notes; the diagnosis' own order within a severity."""
    items = list(findings or [])
    return [f for _, f in sorted(enumerate(items), key=lambda p: (
        SEVERITY_ORDER.get(finding_value(p[1], "severity"), 3), p[0]))]


def _fmt_step(x: float, _pos: Any = None) -> str:
    x = float(x)
    if abs(x) >= 1_000_000:
        return f"{x / 1_000_000:g}M"
    if abs(x) >= 10_000:
        return f"{x / 1000:g}k"
    return f"{x:g}"


def _clip(text: str, chars: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= chars else text[: max(chars - 1, 1)].rstrip() + "…"


@functools.lru_cache(maxsize=20000)
def _width_pt(text: str, size: float, weight: str = "normal", family: str | None = None) -> float:
    """Width of ``text`` in points, as the report's font draws it."""
    fp = FontProperties(size=size, weight=weight,
                        family=family or mpl.rcParams["font.family"])
    return _TEXT_TO_PATH.get_text_width_height_descent(text, fp, ismath=False)[0]


def _fit(text: Any, width_in: float, size: float, weight: str = "normal",
         family: str | None = None) -> str:
    """``text`` on one line of at most ``width_in`` inches, cut with an ellipsis if needed."""
    text = " ".join(str(text).split())
    limit = width_in * 72 / 1.03  # a little slack for the renderers' own rounding
    if _width_pt(text, size, weight, family) <= limit:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _width_pt(text[:mid].rstrip() + "…", size, weight, family) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


def _wrap(text: Any, width_in: float, size: float, weight: str = "normal",
          family: str | None = None) -> list[str]:
    """Greedy word wrap by measured width (a word longer than a line is cut)."""
    limit = width_in * 72 / 1.03
    space = _width_pt("a a", size, weight, family) - 2 * _width_pt("a", size, weight, family)
    lines: list[str] = []
    line, used = "", 0.0
    for word in str(text).split():
        w = _width_pt(word, size, weight, family)
        if line and used + space + w > limit:
            lines.append(line)
            line, used = "", 0.0
        if not line and w > limit:
            word = _fit(word, width_in, size, weight, family)
            w = limit
        line = f"{line} {word}" if line else word
        used = used + space + w if used else w
    if line:
        lines.append(line)
    return lines or [""]


def _has_positive(values: Iterable[np.ndarray]) -> bool:
    return any(np.any(np.isfinite(v) & (v > 0)) for v in values)


def _plot_steps(ax, x, y, style: dict, label: str | None = None, emphasis: bool = False, **extra):
    kw = dict(style)
    if emphasis:
        kw["linewidth"] = kw.get("linewidth", 1.3) + 1.0
    kw.update(extra)
    if len(x) == 1:  # a single point: draw the marker alone
        kw["linestyle"] = "none"
        kw["markevery"] = None
    return ax.plot(x, y, label=label, **kw)


# -- the report context: data, palette, findings and where they are marked ---------------------


class _Context:
    def __init__(self, run: Run, findings: Iterable[Any], title: str | None):
        self.run = run
        self.data = RunData(run)
        self.palette = Palette(run.losses)
        self.findings = sorted_findings(findings)
        self.title = title or f"gradprobe report: {run.name}"
        self.marked: dict[int, str] = {}  # id(finding) -> page title
        lo, hi = self.data.step_range()
        self.xlim = None if lo is None else (lo, hi)
        self.page_notes: list[str] = []

    # findings -------------------------------------------------------------------------------

    def plotted_findings(self) -> list[Any]:
        return [f for f in self.findings if isinstance(finding_value(f, "plot"), dict)
                and finding_value(f, "plot").get("quantity")]

    def matching(self, quantity: str, *, ratio: bool = False,
                 names: Iterable[str] | None = None) -> list[Any]:
        wanted = set(names) if names is not None else None
        hits = []
        for f in self.plotted_findings():
            plot = finding_value(f, "plot")
            if plot.get("quantity") != quantity or bool(plot.get("ratio_to")) != ratio:
                continue
            fnames = list(plot.get("names") or [])
            if wanted is not None and fnames and not (set(fnames) & wanted):
                continue
            hits.append(f)
        return hits

    def flagged_names(self, quantity: str, ratio: bool = False) -> set[str]:
        out: set[str] = set()
        for f in self.matching(quantity, ratio=ratio):
            out.update(finding_value(f, "plot").get("names") or [])
        return out

    def mark(self, ax, quantity: str, page: str, *, ratio: bool = False,
             names: Iterable[str] | None = None, threshold_axis: str = "y") -> list[Any]:
        """Shade each matching finding's steps and draw its threshold on ``ax``."""
        hits = self.matching(quantity, ratio=ratio, names=names)
        labelled = getattr(ax, "_gradprobe_labels", set())
        ax._gradprobe_labels = labelled
        for f in hits:
            colour = SEVERITY_COLOURS.get(finding_value(f, "severity"), REFERENCE_COLOUR)
            steps = finding_value(f, "steps")
            fid = finding_value(f, "id")
            if steps is not None and threshold_axis == "y":
                a, b = int(steps[0]), int(steps[1])
                if a == b:
                    ax.axvline(a, color=colour, linewidth=2.0, alpha=0.5, zorder=0)
                else:
                    ax.axvspan(a, b, facecolor=colour, alpha=0.12, edgecolor=colour,
                               linewidth=0.8, zorder=0)
                if ("span", fid) not in labelled:
                    labelled.add(("span", fid))
                    stacked = sum(1 for k in labelled if k[0] == "span")
                    ax.annotate(f"shaded: {fid}", xy=(0.0, 1.0), xycoords="axes fraction",
                                xytext=(3, -3 - 10 * (stacked - 1)), textcoords="offset points",
                                ha="left", va="top", fontsize=6.5, color=colour,
                                fontweight="bold", zorder=5,
                                bbox=dict(boxstyle="square,pad=0.15", facecolor="white",
                                          edgecolor="none", alpha=0.8))
            threshold = finding_value(f, "plot").get("threshold")
            if threshold is not None and np.isfinite(threshold):
                if threshold_axis == "y":
                    ax.axhline(threshold, color=colour, linestyle=(0, (4, 2)), linewidth=1.2,
                               zorder=1)
                    if ("threshold", fid, threshold) not in labelled:
                        labelled.add(("threshold", fid, threshold))
                        ax.annotate(f"{fid} threshold {threshold:g}", xy=(1.0, threshold),
                                    xycoords=("axes fraction", "data"), xytext=(-3, 2),
                                    textcoords="offset points", ha="right", va="bottom",
                                    fontsize=6.5, color=colour, zorder=5,
                                    bbox=dict(boxstyle="square,pad=0.1", facecolor="white",
                                              edgecolor="none", alpha=0.8))
                else:
                    ax.axvline(threshold, color=colour, linestyle=(0, (4, 2)), linewidth=1.2)
            self.marked.setdefault(id(f), page)
        spans = sum(1 for k in labelled if k[0] == "span")
        if spans:  # the 'shaded:' labels get a band of their own above the data, never on a line
            headroom(ax, 3 + 10 * spans + 2,
                     include=[k[2] for k in labelled if k[0] == "threshold"])
        return hits

    def step_axis(self, ax, label: bool = True) -> None:
        step_axis(ax, self.xlim, label)


def step_axis(ax, xlim: tuple[int, int] | None, label: bool = True) -> None:
    """A step x axis over ``xlim`` (1% padding), with 1k/1M tick labels."""
    if xlim is not None and xlim[1] > xlim[0]:
        pad = 0.01 * (xlim[1] - xlim[0])
        ax.set_xlim(xlim[0] - pad, xlim[1] + pad)
    ax.xaxis.set_major_formatter(FuncFormatter(_fmt_step))
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
    fig = ax.get_figure()
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


def _look_sentence(f: Any) -> str:
    plot = finding_value(f, "plot") or {}
    names = [n for n in plot.get("names") or [] if n != plot.get("ratio_to")]
    what = ", ".join(names[:4]) + (" …" if len(names) > 4 else "") if names else \
        plot.get("quantity", "the marked series")
    if plot.get("ratio_to"):
        what = f"{what} relative to {plot['ratio_to']}"
    steps = finding_value(f, "steps")
    where = f" in the shaded steps {_fmt_step(steps[0])}–{_fmt_step(steps[1])}" if steps else ""
    threshold = plot.get("threshold")
    against = f" against the dashed threshold {threshold:g}" \
        if threshold is not None and np.isfinite(threshold) else ""
    key = finding_value(f, "key_number")
    return (f"{finding_value(f, 'severity', '').upper()} {finding_value(f, 'id')}: look at {what}"
            f"{where}{against}" + (f" ({key})." if key else "."))


# -- page frame ---------------------------------------------------------------------------------


class _Frame:
    """An A4 page frame: title, a grey corner label, 'what to look at' sentences and a legend.

    Shared by the report's pages (legend: the losses) and the comparison's (legend: the runs).
    """

    def __init__(self, title: str, corner: str, legend: list[tuple[str, dict]] | None = None,
                 *, more: str = "… (more on the 'Findings in detail' page)"):
        self.title = title
        self.fig = Figure(figsize=PAGE_SIZE)
        self.fig.text(0.06, 0.972, title, fontsize=15, fontweight="bold", va="top")
        self.fig.text(0.94, 0.968, _clip(corner, 50), fontsize=8, ha="right", va="top",
                      color="#666666")
        self.legend = list(legend or [])
        self.more = more
        self.top = 0.935

    def header(self, sentences: list[str]) -> None:
        """Write the 'what to look at' sentences and the legend; sets where the plots start."""
        y = 0.945
        lines: list[str] = []
        for s in sentences:
            wrapped = _wrap(s, 0.88 * PAGE_SIZE[0], 8.5)
            lines.extend(wrapped)
        for line in lines[:9]:
            self.fig.text(0.06, y, line, fontsize=8.5, va="top")
            y -= 0.0145
        if len(lines) > 9:
            self.fig.text(0.06, y, self.more, fontsize=8, va="top", color="#666666")
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


class _Page(_Frame):
    """A report page: the run's name in the corner, the loss legend (when asked for)."""

    def __init__(self, ctx: _Context, key: str, *, loss_legend: bool = True):
        self.ctx = ctx
        self.key = key
        legend = [(n, ctx.palette.loss(n)) for n in ctx.run.losses] if loss_legend else []
        super().__init__(PAGE_TITLES[key], ctx.run.name, legend)


def _unique(items: list[Any]) -> list[Any]:
    seen, out = set(), []
    for f in items:
        if id(f) not in seen:
            seen.add(id(f))
            out.append(f)
    return out


def _start_page(ctx: _Context, key: str, hits_preview: list[Any], how_to_read: str,
                loss_legend: bool = True) -> _Page:
    """A page whose header (sentences + legend) is written first, so the grid fits below it."""
    ctx.palette.new_page()
    page = _Page(ctx, key, loss_legend=loss_legend)
    sentences = [_look_sentence(f) for f in _unique(hits_preview)] or [how_to_read]
    page.header(sentences)
    return page


def _preview(ctx: _Context, specs: list[tuple[str, bool]]) -> list[Any]:
    """Findings a page will mark: (quantity, ratio) pairs it draws."""
    hits: list[Any] = []
    for quantity, ratio in specs:
        hits.extend(ctx.matching(quantity, ratio=ratio))
    return hits


# -- page: gradient balance ---------------------------------------------------------------------


def _cosine_matrix_from_gram(gram: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(gram), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = gram / np.outer(d, d)
    cos[~np.isfinite(cos)] = np.nan
    return np.clip(cos, -1, 1)


def _cosine_snapshots(ctx: _Context) -> list[tuple[str, int, np.ndarray]]:
    data, losses = ctx.data, ctx.run.losses
    n = len(losses)
    if "shared" in data.array_names("grad_gram"):
        snaps = []
        for label, step, gram in data.snapshots("grad_gram", "shared"):
            if gram.shape == (n, n):
                snaps.append((label, step, _cosine_matrix_from_gram(np.asarray(gram, float))))
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


def _gradient_page(ctx: _Context) -> list[Figure]:
    data, losses, pal = ctx.data, ctx.run.losses, ctx.palette
    norms = [n for n in losses if data.has("weighted_grad_norm", n)]
    snaps = _cosine_snapshots(ctx)
    if not norms and not snaps:
        return []
    title = PAGE_TITLES["gradients"]
    hits = _preview(ctx, [("weighted_grad_norm", False), ("weighted_grad_norm", True),
                          ("grad_cosine", False)])
    page = _start_page(ctx, "gradients", hits,
                       "How to read: every loss should move the shared parameters; an auxiliary "
                       "loss whose ratio to the largest sits far below the dashed line is swamped "
                       "(its constraint is ignored), and negative cosines mean two losses pull the "
                       "shared parameters in opposite directions.")
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
    fig = page.fig
    for r, row in enumerate(rows):
        if row == "norms":
            ax = fig.add_subplot(gs[r])
            flagged = ctx.flagged_names("weighted_grad_norm")
            values = []
            for name in norms:
                x, y = data.plotted("weighted_grad_norm", name)
                values.append(y)
                _plot_steps(ax, x, y, pal.loss(name), emphasis=name in flagged)
            if _has_positive(values):
                ax.set_yscale("log", nonpositive="mask")
            ax.set_ylabel("‖w·g‖ (L2 norm)")
            ax.set_title("Weighted gradient norm of each loss on the shared parameters")
            ctx.mark(ax, "weighted_grad_norm", title)
            ctx.step_axis(ax)
        elif row == "ratio":
            ax = fig.add_subplot(gs[r])
            ratio_hits = ctx.matching("weighted_grad_norm", ratio=True)
            to = finding_value(ratio_hits[0], "plot").get("ratio_to") if ratio_hits else None
            aux = [n for n in norms if n != task] or norms
            flagged = ctx.flagged_names("weighted_grad_norm", ratio=True)
            values = []
            if to and data.has("weighted_grad_norm", to):
                for name in [n for n in norms if n != to]:
                    x, y = data.ratio("weighted_grad_norm", name, to)
                    x, y = _decimated(x, y)
                    values.append(y)
                    _plot_steps(ax, x, y, pal.loss(name), emphasis=name in flagged)
                ax.set_ylabel(f"‖w·g‖ / ‖w·g‖ of {_clip(to, 14)} (ratio)")
                ax.set_title(f"Each loss's weighted gradient norm relative to {to}")
            else:
                ratios = data.ratio_to_largest("weighted_grad_norm", norms)
                for name in aux:
                    if name in ratios:
                        x, y = _decimated(*ratios[name])
                        values.append(y)
                        _plot_steps(ax, x, y, pal.loss(name), emphasis=name in flagged)
                ax.set_ylabel("‖w·g‖ / largest ‖w·g‖ (ratio)")
                ax.set_title("Each auxiliary loss's weighted gradient norm relative to the largest")
            if _has_positive(values):
                ax.set_yscale("log", nonpositive="mask")
            if not ratio_hits:
                ax.axhline(DEFAULT_SWAMPING_THRESHOLD, color=REFERENCE_COLOUR,
                           linestyle=(0, (4, 2)), linewidth=1.0)
                ax.annotate(f"swamping threshold {DEFAULT_SWAMPING_THRESHOLD:g}",
                            xy=(1.0, DEFAULT_SWAMPING_THRESHOLD),
                            xycoords=("axes fraction", "data"), xytext=(-2, 2),
                            textcoords="offset points", ha="right", va="bottom", fontsize=6.5,
                            color=REFERENCE_COLOUR)
            ctx.mark(ax, "weighted_grad_norm", title, ratio=True)
            ctx.step_axis(ax)
        elif row == "cosine":
            ax = fig.add_subplot(gs[r])
            for p in pairs:
                other = [n for n in p.split("|") if n != task]
                style = pal.loss(other[0] if other else p)
                x, y = data.plotted("grad_cosine", p)
                _plot_steps(ax, x, y, style, emphasis=p in flagged_pairs)
            extra = [p for p in flagged_pairs if p not in pairs]
            for k, p in enumerate(extra):
                x, y = data.plotted("grad_cosine", p)
                style = {**pal.other(p), "color": PAIR_COLOURS[k % len(PAIR_COLOURS)]}
                _plot_steps(ax, x, y, style, label=f"{p} (flagged pair)", emphasis=True)
            if extra:
                ax.legend(loc="lower right", fontsize=7, ncol=3)
            ax.axhline(0, color=REFERENCE_COLOUR, linewidth=0.8)
            ax.set_ylim(-1.05, 1.05)
            ax.set_ylabel("cos(g_i, g_j) (−1 to 1)")
            ax.set_title(f"Gradient cosine of each loss with {task} (colour: the other loss)")
            ctx.mark(ax, "grad_cosine", title)
            ctx.step_axis(ax)
        elif row == "heatmaps":
            _heatmaps(ctx, fig, gs[r], snaps)
    return [fig]


def _decimated(x, y):
    from .data import decimate
    return decimate(x, y)


def _heatmap(sns, mat, ax, mask, annot, fmt, size, k, cbar_ax, labels) -> None:
    sns.heatmap(mat, ax=ax, vmin=-1, vmax=1, center=0, cmap="vlag", mask=mask,
                annot=annot, fmt=fmt, annot_kws={"size": size}, square=True,
                linewidths=0.4, linecolor="white", cbar=k == 0,
                cbar_ax=cbar_ax if k == 0 else None,
                cbar_kws={"label": "cosine (−1 to 1)"}, xticklabels=labels,
                yticklabels=labels if k == 0 else False)


def _heatmaps(ctx: _Context, fig: Figure, cell, snaps) -> None:
    losses = ctx.run.losses
    n = len(losses)
    sub = cell.subgridspec(1, 4, width_ratios=[1, 1, 1, 0.06], wspace=0.35)
    cbar_ax = fig.add_subplot(sub[0, 3])
    annot = n <= 8
    fmt = ".2f" if n <= 5 else ".1f"
    size = 7 if n <= 5 else (6 if n <= 6 else 5)
    # tick labels are formatted when drawn, after _finish_page: plain from the start
    labels = [_plain(l if len(l) <= 10 else f"{l[:4]}…{l[-5:]}") for l in losses]
    heat_axes = []
    for k, (label, step, mat) in enumerate(snaps):
        ax = fig.add_subplot(sub[0, k])
        mask = np.triu(np.ones_like(mat, dtype=bool), k=1)
        with warnings.catch_warnings():  # seaborn's own use of Colormap.set_bad
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            _heatmap(sns, mat, ax, mask, annot, fmt, size, k, cbar_ax, labels)
        ax.set_title(f"{label}: step {_fmt_step(step)}", fontsize=8.5)
        heat_axes.append(ax)
        ax.tick_params(axis="x", labelrotation=90 if n > 3 else 0, labelsize=7 if n <= 6 else 6)
        ax.tick_params(axis="y", labelrotation=0, labelsize=7 if n <= 6 else 6)
        ax.grid(False)
    if len(snaps) < 3:
        for k in range(len(snaps), 3):
            fig.add_subplot(sub[0, k]).set_axis_off()
    # the heatmaps are square: give the colour bar their height, not the whole row's
    first = heat_axes[0] if heat_axes else None
    if first is not None:
        first.apply_aspect()
        box, cb = first.get_position(), cbar_ax.get_position()
        cbar_ax.set_position([cb.x0 - 0.03, box.y0, cb.width, box.height])


# -- page: losses -------------------------------------------------------------------------------


def _losses_page(ctx: _Context) -> list[Figure]:
    data, losses, pal = ctx.data, ctx.run.losses, ctx.palette
    names = [n for n in losses if data.has("loss", n)]
    if not names:
        return []
    title = PAGE_TITLES["losses"]
    val = [n for n in data.names("logged") if n.lower().startswith("val")]
    weights = [n for n in losses if data.has("weight", n)]
    hits = _preview(ctx, [("loss", False), ("logged", False), ("weight", False)])
    page = _start_page(ctx, "losses", hits,
                       "How to read: a constraint loss that stays near 1× its first value while "
                       "the task falls towards 0 is being neglected; validation loss rising while "
                       "the training loss keeps falling is overfitting; flat weight lines mean "
                       "fixed loss weights.")
    rows = ["relative"] + (["val"] if val else []) + (["weights"] if weights else [])
    heights = {"relative": 1.3, "val": 1.0, "weights": 0.8}
    gs = page.grid(len(rows), 1, height_ratios=[heights[r] for r in rows], hspace=0.5)
    fig = page.fig
    events = [e for e in ctx.run.events() if e["kind"] in ("non_finite", "inert_loss")]
    for r, row in enumerate(rows):
        ax = fig.add_subplot(gs[r])
        if row == "relative":
            flagged = ctx.flagged_names("loss")
            values = []
            for name in names:
                relative = data.relative_to_first("loss", name)
                if relative is None:
                    continue
                x, y = _decimated(*relative)
                values.append(y)
                _plot_steps(ax, x, y, pal.loss(name), emphasis=name in flagged)
            if values and all(np.all(y[np.isfinite(y)] > 0) for y in values) and \
                    _has_positive(values):
                ax.set_yscale("log")
            ax.axhline(1.0, color=REFERENCE_COLOUR, linewidth=0.8)
            ax.set_ylabel("loss / its first value (ratio)")
            ax.set_title("Each loss relative to its first recorded value")
            for e in events:
                ax.axvline(e["step"], color=SEVERITY_COLOURS["error"], linewidth=0.8, alpha=0.6)
            ctx.mark(ax, "loss", title)
        elif row == "val":
            flagged = ctx.flagged_names("logged")
            acc = [n for n in val if "acc" in n.lower()]
            lossy = [n for n in val if n not in acc]
            if ctx.run.task and data.has("loss", ctx.run.task) and lossy:
                x, y = data.plotted("loss", ctx.run.task)
                _plot_steps(ax, x, y, pal.loss(ctx.run.task), label=f"{ctx.run.task} (training)")
            for name in lossy:
                x, y = data.plotted("logged", name)
                _plot_steps(ax, x, y, pal.other(name), label=name, emphasis=name in flagged)
            ax.set_ylabel("loss (value)")
            if acc:
                ax2 = ax.twinx() if lossy else ax
                for name in acc:
                    x, y = data.plotted("logged", name)
                    _plot_steps(ax2, x, y, pal.other(name), label=name, emphasis=name in flagged)
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
            ctx.mark(ax, "logged", title)
        else:
            values = []
            flagged = ctx.flagged_names("weight")
            for name in weights:
                x, y = data.plotted("weight", name)
                values.append(y)
                _plot_steps(ax, x, y, pal.loss(name), emphasis=name in flagged)
            if _has_positive(values) and all(np.all(y[np.isfinite(y)] > 0) for y in values):
                ax.set_yscale("log")
            ax.set_ylabel("loss weight w")
            ax.set_title("Loss weights (flat lines: fixed weights)")
            ctx.mark(ax, "weight", title)
        ctx.step_axis(ax)
    return [page.fig]


# -- page: representations ----------------------------------------------------------------------


def _representations_page(ctx: _Context) -> list[Figure]:
    data, pal = ctx.data, ctx.palette
    latents = sorted(set(data.names("effective_rank")) | set(data.names("normalized_std")) |
                     set(data.array_names("singular_spectrum")))
    pairs = sorted(set(data.names("cka")) | set(data.names("max_abs_correlation")))
    if not latents and not pairs:
        return []
    title = PAGE_TITLES["representations"]
    hits = _preview(ctx, [("effective_rank", False), ("normalized_std", False), ("cka", False),
                          ("max_abs_correlation", False)])
    page = _start_page(ctx, "representations", hits,
                       "How to read: a healthy latent keeps its effective rank and normalised std "
                       "near the dotted isotropic reference; a falling rank and a spectrum "
                       "dropping steeply from start to end mean the representation collapsed; "
                       "CKA or |corr| far above the null means the latents are not independent.",
                       loss_legend=False)
    for name in latents:
        pal.other(name)  # fix the latents' colours in their order
    fig = page.fig
    rows = []
    if any(data.has("effective_rank", n) or data.has("normalized_std", n) for n in latents):
        rows.append("scalars")
    spectra = [n for n in latents if n in data.array_names("singular_spectrum")]
    if spectra:
        rows.append("spectra")
    if pairs:
        rows.append("pairs")
    gs = page.grid(len(rows), 1, hspace=0.5)
    for r, row in enumerate(rows):
        if row == "scalars":
            sub = gs[r].subgridspec(1, 2, wspace=0.3)
            _latent_panel(ctx, fig.add_subplot(sub[0, 0]), latents, "effective_rank",
                          lambda name: data.plotted("effective_rank_isotropic", name)
                          if data.has("effective_rank_isotropic", name) else None,
                          "effective rank (dimensions)",
                          "Effective rank (dotted: isotropic reference)", legend=True)
            _latent_panel(ctx, fig.add_subplot(sub[0, 1]), latents, "normalized_std",
                          lambda name: _inverse_sqrt(data.plotted("latent_dim", name))
                          if data.has("latent_dim", name) else None,
                          "std of ℓ2-normalised rows", "Normalised std (dotted: 1/√dim)")
        elif row == "spectra":
            shown = spectra[:4]
            sub = gs[r].subgridspec(1, len(shown), wspace=0.3)
            for k, name in enumerate(shown):
                ax = fig.add_subplot(sub[0, k])
                for (label, step, s), colour, ls in zip(_snaps3(data, name), MOMENT_COLOURS,
                                                        MOMENT_STYLES):
                    s = np.asarray(s, float)
                    if not len(s) or not s[0] > 0:
                        continue
                    ax.plot(np.arange(1, len(s) + 1), s / s[0], color=colour, linestyle=ls,
                            marker="o", markersize=2.5, linewidth=1.3,
                            label=f"{label} (step {_fmt_step(step)})")
                ax.set_yscale("log")
                ax.set_xlabel("singular value index")
                if k == 0:
                    ax.set_ylabel("σᵢ / σ₁ (ratio)")
                ax.set_title(f"Spectrum of {_clip(name, 16)}")
                ax.legend(loc="lower left", fontsize=6.5)
                ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            if len(spectra) > 4:
                page.ctx.page_notes.append(f"{len(spectra) - 4} more spectra not drawn")
        else:
            ax = fig.add_subplot(gs[r])
            flagged = ctx.flagged_names("cka") | ctx.flagged_names("max_abs_correlation")
            for k, pair in enumerate(pairs):
                style = pal.other(pair)
                if data.has("cka", pair):
                    x, y = data.plotted("cka", pair)
                    _plot_steps(ax, x, y, {**style, "linestyle": "-"}, label=f"CKA {pair}",
                                emphasis=pair in flagged)
                if data.has("max_abs_correlation", pair):
                    x, y = data.plotted("max_abs_correlation", pair)
                    _plot_steps(ax, x, y, {**style, "linestyle": (0, (5, 2)), "marker": "s"},
                                label=f"max |corr| {pair}", emphasis=pair in flagged)
                if data.has("max_abs_correlation_null", pair):
                    x, y = data.plotted("max_abs_correlation_null", pair)
                    ax.plot(x, y, color=style["color"], linestyle=":", linewidth=1.0,
                            label=f"|corr| null {pair}")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("CKA, max |corr| (0 to 1)")
            ax.set_title("Dependence between the latents (dotted: max |corr| of independent latents)")
            ax.legend(loc="upper left", fontsize=7, ncol=3)
            ctx.mark(ax, "cka", title)
            ctx.mark(ax, "max_abs_correlation", title)
            ctx.step_axis(ax)
    return [fig]


def _inverse_sqrt(series):
    x, y = series
    with np.errstate(divide="ignore"):
        return x, 1 / np.sqrt(y)


def _latent_panel(ctx: _Context, ax, latents: list[str], quantity: str, reference,
                  ylabel: str, title: str, legend: bool = False) -> None:
    """One latent quantity over steps, each latent with its healthy reference dotted."""
    flagged = ctx.flagged_names(quantity)
    for name in latents:
        if not ctx.data.has(quantity, name):
            continue
        style = ctx.palette.other(name)
        x, y = ctx.data.plotted(quantity, name)
        _plot_steps(ax, x, y, style, label=name, emphasis=name in flagged)
        ref = reference(name)
        if ref is not None:
            ax.plot(*ref, color=style["color"], linestyle=":", linewidth=1.0, alpha=0.9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    if legend:
        ax.legend(loc="lower left", fontsize=7)
    ctx.mark(ax, quantity, PAGE_TITLES["representations"])
    ctx.step_axis(ax)


def _snaps3(data: RunData, name: str):
    return data.snapshots("singular_spectrum", name)


# -- page: prototypes ---------------------------------------------------------------------------


def _simple_panels(ctx: _Context, key: str, panels: list[dict], how_to_read: str,
                   extra: Callable | None = None, ncols: int = 2) -> list[Figure]:
    """A page of step plots, one per available panel spec:
    {quantity, names, ylabel, title, log, ylim, ref: (value, label) | None, draw: callable}."""
    panels = [p for p in panels if p.get("draw") or any(ctx.data.has(p["quantity"], n)
                                                         for n in p["names"])]
    if not panels:
        return []
    title = PAGE_TITLES[key]
    hits = _preview(ctx, [(p["quantity"], False) for p in panels])
    page = _start_page(ctx, key, hits, how_to_read, loss_legend=False)
    nrows = math.ceil(len(panels) / ncols)
    gs = page.grid(max(nrows, 2), ncols, hspace=0.55)
    fig = page.fig
    for k, p in enumerate(panels):
        span = p.get("span", 1)
        row, col = divmod(k, ncols)
        ax = fig.add_subplot(gs[row, col] if span == 1 else gs[row, :])
        if p.get("draw"):
            p["draw"](ax)
        else:
            _series_panel(ctx, ax, p)
        ctx.mark(ax, p["quantity"], title, threshold_axis=p.get("threshold_axis", "y"))
    return [fig]


def _series_panel(ctx: _Context, ax, p: dict) -> None:
    """One panel of step series from a panel spec (see :func:`_simple_panels`)."""
    flagged = ctx.flagged_names(p["quantity"])
    values = []
    for name in p["names"]:
        if not ctx.data.has(p["quantity"], name):
            continue
        x, y = ctx.data.plotted(p["quantity"], name)
        values.append(y)
        _plot_steps(ax, x, y, ctx.palette.other(name), label=name, emphasis=name in flagged)
    if p.get("log") and _has_positive(values):
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


def _prototypes_page(ctx: _Context) -> list[Figure]:
    d = ctx.data
    sets = sorted(set(d.names("prototype_drift")) | set(d.names("prototype_min_distance")) |
                  set(d.names("prototype_usage")))
    if not sets:
        return []
    panels = [
        dict(quantity="prototype_drift", names=sets, log=True,
             ylabel="‖Δp‖ / ‖p‖ per probe interval", title="Prototype drift per probe interval"),
        dict(quantity="prototype_min_distance", names=sets,
             ylabel="distance (latent units, L2)", title="Minimum pairwise prototype distance"),
        dict(quantity="prototype_usage", names=sets, ylim=(-0.02, 1.05),
             ylabel="normalised entropy (0 to 1)", title="Prototype usage entropy"),
        dict(quantity="prototype_steps_since_moved", names=sets,
             ylabel="steps since a prototype moved", title="Staleness (steps since last move)"),
        dict(quantity="prototype_mean_distance", names=sets,
             ylabel="distance (latent units, L2)", title="Mean pairwise prototype distance"),
        dict(quantity="prototype_lag", names=sets,
             ylabel="‖p − group mean‖ / ‖group mean‖", title="Prototype lag behind the features"),
    ]
    return _simple_panels(ctx, "prototypes", panels,
                          "How to read: drift that drops to 0 means stale prototypes (the update "
                          "stopped); minimum distance shrinking towards 0 means prototypes merged; "
                          "usage entropy near 0 means every sample maps to one prototype.")


# -- page: saturation ---------------------------------------------------------------------------


def _saturation_page(ctx: _Context) -> list[Figure]:
    d = ctx.data
    watches = sorted(set(d.names("saturated_fraction")) | set(d.array_names("saturation_histogram")))
    if not watches:
        return []

    def histogram(ax):
        from gradprobe.metrics import saturation_histogram_edges
        for k, name in enumerate(watches[:2]):
            steps, hists = d.arrays("saturation_histogram", name)
            if not len(steps):
                continue
            style = ctx.palette.other(name)
            last = np.asarray(hists[-1], float)
            edges = saturation_histogram_edges(bins=len(last)).numpy()
            share = last / max(last.sum(), 1)
            ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color=style["color"],
                   alpha=0.55 if k == 0 else 0.35, edgecolor=style["color"], linewidth=0.6,
                   label=f"{name}: last probe step {_fmt_step(steps[-1])}")
            if len(steps) > 1:
                first = np.asarray(hists[0], float)
                ax.stairs(first / max(first.sum(), 1), edges, color=REFERENCE_COLOUR,
                          linestyle=(0, (4, 2)), linewidth=1.0,
                          label=f"{name}: first probe step {_fmt_step(steps[0])}")
            threshold = 4.6
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

    has_hist = any(n in d.array_names("saturation_histogram") for n in watches)
    panels = [
        dict(quantity="saturated_fraction", names=watches, ylim=(-0.02, 1.02),
             ylabel="share of |x| > threshold", title="Saturated share of sigmoid inputs"),
        dict(quantity="mean_sigmoid_grad", names=watches, ylim=(0, 0.26),
             refs=[(0.25, "maximum 0.25"), (0.2067, "standard-normal inputs 0.207")],
             ylabel="mean σ′(x)", title="Mean sigmoid gradient"),
    ]
    if has_hist:
        panels.append(dict(quantity="saturation_histogram", names=watches, draw=histogram,
                           span=2, threshold_axis="x"))
    panels += [
        dict(quantity="temperature", names=watches, ylabel="temperature T",
             title="Temperature"),
        dict(quantity="energy_scale_ratio", names=watches, log=True, refs=[(1.0, "matched 1")],
             ylabel="std ratio of the energy terms", title="Energy-scale ratio (U vs R)"),
    ]
    # a full-width panel takes a whole row: put it at the start of a row
    ordered = []
    for p in panels:
        if p.get("span") == 2 and len(ordered) % 2:
            ordered.append(None)
        ordered.append(p)
        if p.get("span") == 2:
            ordered.append(None)
    return _saturation_layout(ctx, ordered)


def _saturation_layout(ctx: _Context, ordered: list) -> list[Figure]:
    d = ctx.data
    avail = [p if p is None or p.get("draw") or any(d.has(p["quantity"], n) for n in p["names"])
             else None for p in ordered]
    # drop unavailable panels but keep full-width rows whole
    panels = []
    for p in avail:
        if p is not None:
            if p.get("span") == 2 and len(panels) % 2:
                panels.append(None)
            panels.append(p)
            if p.get("span") == 2:
                panels.append(None)
    if not any(panels):
        return []
    title = PAGE_TITLES["saturation"]
    hits = _preview(ctx, [(p["quantity"], False) for p in panels if p])
    page = _start_page(ctx, "saturation", hits,
                       "How to read: inputs piling up in the shaded flat regions get almost no "
                       "gradient; a rising saturated share together with a large energy-scale "
                       "ratio at a fixed temperature means the temperature ignores the energy's "
                       "scale.", loss_legend=False)
    nrows = math.ceil(len(panels) / 2)
    gs = page.grid(max(nrows, 2), 2, hspace=0.55)
    fig = page.fig
    for k, p in enumerate(panels):
        if p is None:
            continue
        row, col = divmod(k, 2)
        ax = fig.add_subplot(gs[row, :] if p.get("span") == 2 else gs[row, col])
        if p.get("draw"):
            p["draw"](ax)
            ctx.mark(ax, p["quantity"], title, threshold_axis="x")
            continue
        _series_panel(ctx, ax, p)
        ctx.mark(ax, p["quantity"], title)
    return [fig]


# -- page: batches ------------------------------------------------------------------------------


def _batches_page(ctx: _Context) -> list[Figure]:
    d = ctx.data
    expect = ctx.run.meta.get("expect_groups_per_batch")
    cont = sorted(set(d.names("contrastive_effective_negatives")) |
                  set(d.names("contrastive_loss_ratio")))

    def groups(ax):
        x, y = d.plotted("groups_per_batch", "batch")
        _plot_steps(ax, x, y, ctx.palette.other("batch"), label="seen in the batch",
                    emphasis="batch" in ctx.flagged_names("groups_per_batch"))
        if expect is not None:
            ax.axhline(expect, color="#222222", linestyle=(0, (5, 2)), linewidth=1.2,
                       label=f"declared: {expect}")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("distinct groups per batch (count)")
        ax.set_title("Groups per batch against the declared sampler" if expect is not None
                     else "Groups per batch (nothing declared)")
        ax.legend(loc="best", fontsize=7)
        ctx.step_axis(ax)

    def negatives(ax):
        for name in cont:
            style = ctx.palette.other(name)
            if d.has("contrastive_effective_negatives", name):
                x, y = d.plotted("contrastive_effective_negatives", name)
                _plot_steps(ax, x, y, style, label=f"{name}: effective")
            if d.has("contrastive_negatives", name):
                x, y = d.plotted("contrastive_negatives", name)
                ax.plot(x, y, color=style["color"], linestyle=":", linewidth=1.0,
                        label=f"{name}: nominal (batch − 1)")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("negatives (count)")
        ax.set_title("Effective InfoNCE negatives")
        ax.legend(loc="best", fontsize=7)
        ctx.step_axis(ax)

    panels = []
    if d.has("groups_per_batch", "batch"):
        panels.append(dict(quantity="groups_per_batch", names=["batch"], draw=groups))
    if d.has("same_group_pair_share"):
        panels.append(dict(quantity="same_group_pair_share", names=["batch"], ylim=(-0.02, 1.02),
                           ylabel="share of sample pairs", title="Same-group pairs in a batch"))
    if cont:
        panels.append(dict(quantity="contrastive_effective_negatives", names=cont, draw=negatives))
        panels.append(dict(quantity="contrastive_loss_ratio", names=cont, ylim=(0, None),
                           refs=[(1.0, "chance: log(K+1)")], ylabel="InfoNCE / log(K+1) (ratio)",
                           title="Contrastive loss relative to chance"))
        panels.append(dict(quantity="contrastive_same_group_share", names=cont,
                           ylim=(-0.02, 1.02), ylabel="share of negatives",
                           title="Negatives from the anchor's own group"))
        panels.append(dict(quantity="contrastive_gap", names=cont,
                           refs=[(0.0, "0")], ylabel="similarity gap (cosine units)",
                           title="Positive minus hardest negative"))
    if not panels:
        return []
    return _simple_panels(ctx, "batches", panels,
                          "How to read: the batches should hold what the sampler declares (training "
                          "and inference must match); InfoNCE near chance with most negatives from "
                          "the anchor's own group means the contrastive loss has little signal.")


# -- page: further evidence (findings whose quantity no page above draws) ----------------------


def _evidence_pages(ctx: _Context) -> list[Figure]:
    left = [f for f in ctx.plotted_findings() if id(f) not in ctx.marked]
    figs = []
    for start in range(0, len(left), 4):
        chunk = left[start:start + 4]
        page = _start_page(ctx, "evidence", chunk, "", loss_legend=False)
        gs = page.grid(4, 1, hspace=0.6)
        for k, f in enumerate(chunk):
            ax = page.fig.add_subplot(gs[k])
            plot = finding_value(f, "plot")
            quantity, to = plot["quantity"], plot.get("ratio_to")
            names = [n for n in plot.get("names") or ctx.data.names(quantity)
                     if ctx.data.has(quantity, n)]
            values = []
            for name in names:
                if to and ctx.data.has(quantity, to):
                    x, y = _decimated(*ctx.data.ratio(quantity, name, to))
                else:
                    x, y = ctx.data.plotted(quantity, name)
                values.append(y)
                _plot_steps(ax, x, y, ctx.palette.loss(name), label=name)
            if values and _has_positive(values) and all(
                    np.all(y[np.isfinite(y)] > 0) for y in values):
                lo = min(np.nanmin(y[y > 0]) for y in values if np.any(y > 0))
                hi = max(np.nanmax(y) for y in values)
                if hi / max(lo, 1e-300) > 100:
                    ax.set_yscale("log")
            unit = f"{quantity} / {to} (ratio)" if to else quantity
            ax.set_ylabel(_clip(unit, 40))
            ax.set_title(_clip(f"{finding_value(f, 'id')}: {finding_value(f, 'title')}", 95))
            if names:
                ax.legend(loc="best", fontsize=7)
            ax.set_ylabel(_clip(unit, 40))
            # mark exactly this finding
            ctx.marked.pop(id(f), None)
            saved = ctx.findings
            ctx.findings = [f]
            ctx.mark(ax, quantity, PAGE_TITLES["evidence"], ratio=bool(to))
            ctx.findings = saved
            ctx.step_axis(ax)
        figs.append(page.fig)
    return figs


# -- text pages: verdict and findings in detail -------------------------------------------------


class _TextFlow:
    """Lines of text placed top-down in inches; a new A4 page when one is full."""

    MARGIN_TOP, MARGIN_BOTTOM, X0 = 0.7, 0.7, 0.55

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
        self.fig.text(0.94, 1 - 0.35 / PAGE_SIZE[1], _clip(self.corner, 50), fontsize=8,
                      ha="right", va="top", color="#666666")
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
        lines = _wrap(s, PAGE_SIZE[0] - self.X0 - x0, size, weight, family)
        if max_lines and len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = _fit(lines[-1] + " …", PAGE_SIZE[0] - self.X0 - x0, size, weight, family)
        for line in lines:
            self.text(line, size=size, x=x, weight=weight, family=family, **kw)

    def fit(self, s: Any, x_from: float, x_to: float, size: float = 8.5,
            weight: str = "normal", family: str | None = None) -> str:
        return _fit(s, x_to - x_from, size, weight, family)

    def space(self, inches: float) -> None:
        self.y += inches


def _weights_summary(ctx: _Context, name: str) -> str:
    d = ctx.data
    if not d.has("weight", name):
        return "—"
    _, w = d.series("weight", name)
    w = w[np.isfinite(w)]
    if not len(w):
        return "—"
    if np.allclose(w, w[0], rtol=1e-9, atol=0):
        return f"{w[0]:.3g} (fixed)"
    return f"{w[0]:.3g} → {w[-1]:.3g} (range {w.min():.3g}–{w.max():.3g})"


def _verdict_pages(ctx: _Context, pages_of: dict[int, str]) -> list[Figure]:
    run, meta = ctx.run, ctx.run.meta
    flow = _TextFlow(run.name, PAGE_TITLES["verdict"], title_first=False)
    flow.text(flow.fit(ctx.title, flow.X0, 7.72, 17, "bold"), size=17, weight="bold", gap=0.36)
    created = meta.get("created", "")
    flow.text(flow.fit(f"run {run.name} · {run.source}", flow.X0, 7.72, 8), size=8,
              colour="#555555")
    flow.text(f"recorded {created} with gradprobe {meta.get('gradprobe_version', '?')} and torch "
              f"{meta.get('torch_version', '?')}; report by gradprobe {__version__}", size=8,
              colour="#555555")
    flow.space(0.12)

    # the verdict line
    findings = ctx.findings
    counts = {s: sum(finding_value(f, "severity") == s for f in findings) for s in SEVERITY_ORDER}
    if not findings:
        headline, colour = "No failure modes found.", "#1e8449"
        detail = "None of the diagnosis rules held on this run."
    else:
        worst = finding_value(findings[0], "severity")
        colour = SEVERITY_COLOURS.get(worst, "black")
        parts = [f"{counts[s]} {'note' if s == 'info' else s}{'s' if counts[s] != 1 else ''}"
                 for s in SEVERITY_ORDER if counts[s]]
        if counts["error"] or counts["warning"]:
            n = counts["error"] + counts["warning"]
            headline = f"{n} failure mode{'s' if n != 1 else ''} found: " + ", ".join(parts) + "."
        else:
            headline = "No failure modes found; " + ", ".join(parts) + "."
        first = findings[0]
        detail = (f"Start with {finding_value(first, 'id')}: {finding_value(first, 'title')}")
    flow.need(0.75)
    top = flow.y
    flow.fig.patches.append(Rectangle((flow.fx(flow.X0 - 0.1), flow.fy(top + 0.62)),
                                      flow.fx(PAGE_SIZE[0] - 2 * flow.X0 + 0.2), 0.62 / PAGE_SIZE[1],
                                      transform=flow.fig.transFigure, facecolor=colour,
                                      alpha=0.1, edgecolor=colour, linewidth=1.2))
    flow.space(0.08)
    flow.text(headline, size=14, weight="bold", colour=colour, gap=0.28)
    flow.text(flow.fit(detail, flow.X0, 7.62, 9), size=9)
    flow.y = top + 0.8

    # the run
    lo, hi = ctx.data.step_range()
    n_probe = len(run.probe_steps())
    every = run.every
    flow.text("The run", size=11, weight="bold", gap=0.26)
    rows = [
        ("steps", f"{_fmt_int(lo)} to {_fmt_int(hi)}" if lo is not None else "nothing recorded"),
        ("probe cadence", (meta.get("cadence") or
                           (f"every {every} step{'s' if every != 1 else ''}" if every else "—")) +
         f", {n_probe:,} probe step{'s' if n_probe != 1 else ''} recorded"),
        ("task loss", str(run.task or "—")),
    ]
    shared = meta.get("shared_parameters") or []
    numel = meta.get("shared_numel")
    shared_text = f"{len(shared)} tensor{'s' if len(shared) != 1 else ''}" + \
        (f", {numel:,} values" if isinstance(numel, int) else "") + \
        (": " + ", ".join(shared) if shared else "")
    watched = []
    for label, key in (("latents", "latents"), ("prototypes", "prototypes"),
                       ("saturation", "saturations"), ("contrastive", "contrastive")):
        value = meta.get(key)
        if value:
            watched.append(f"{label}: {', '.join(value)}")
    rows.append(("watched", "; ".join(watched) or "nothing beyond the losses"))
    expect = meta.get("expect_groups_per_batch")
    rows.append(("declared batches", f"{expect} group{'s' if expect != 1 else ''} per batch"
                 if expect is not None else "not declared"))
    for key, value in rows:
        flow.text(key, size=8.5, weight="bold", gap=0)
        flow.paragraph(value, x=2.0)
    flow.text("shared parameters", size=8.5, weight="bold", gap=0)
    lines = _wrap(shared_text, PAGE_SIZE[0] - 2 * flow.X0 - 1.45, 8.5)
    for line in lines[:3]:
        flow.text(line, x=2.0)
    if len(lines) > 3:
        flow.text(f"… ({len(shared)} tensors in all)", x=2.0, colour="#555555")
    flow.space(0.1)

    # losses and weights
    flow.text("Losses and weights", size=11, weight="bold", gap=0.26)
    roles, guessed = run.roles, set(meta.get("roles_guessed") or [])
    flow.text("loss", x=0.8, weight="bold", gap=0)
    flow.text("role", x=2.6, weight="bold", gap=0)
    flow.text("weight (first → last)", x=4.2, weight="bold")
    for name in run.losses:
        flow.need(0.18)
        style = ctx.palette.loss(name)
        y = flow.fy(flow.y + 0.065)
        flow.fig.lines.append(Line2D([flow.fx(0.5), flow.fx(0.72)], [y, y],
                                     transform=flow.fig.transFigure, color=style["color"],
                                     linestyle=style["linestyle"], linewidth=1.6))
        flow.fig.lines.append(Line2D([flow.fx(0.61)], [y], transform=flow.fig.transFigure,
                                     color=style["color"], marker=style["marker"], markersize=3.5))
        flow.text(flow.fit(name, 0.8, 2.5), x=0.8, gap=0)
        role = roles.get(name, "—") + (" (guessed)" if name in guessed and name != run.task else "")
        flow.text(flow.fit(role, 2.6, 4.1), x=2.6, gap=0)
        flow.text(flow.fit(_weights_summary(ctx, name), 4.2, 7.72), x=4.2)
    flow.space(0.12)

    # the findings table
    flow.text("Findings" if findings else "Findings: none", size=11, weight="bold", gap=0.26)
    if not findings:
        flow.paragraph("No failure modes found. The pages that follow show the recorded evidence "
                       "(gradient balance, losses and every watched quantity) for reference.")
        return flow.figs
    flow.text("severity", x=0.55, weight="bold", size=7.5, gap=0)
    flow.text("id", x=1.35, weight="bold", size=7.5, gap=0)
    flow.text("title / remedy", x=3.25, weight="bold", size=7.5, gap=0)
    flow.text("key number", x=7.72, weight="bold", size=7.5, ha="right")
    flow.space(0.04)
    for f in findings:
        flow.need(0.5)
        sev = finding_value(f, "severity")
        colour = SEVERITY_COLOURS.get(sev, "black")
        y0 = flow.y
        flow.fig.patches.append(Rectangle((flow.fx(0.55), flow.fy(y0 + 0.2)), flow.fx(0.7),
                                          0.18 / PAGE_SIZE[1], transform=flow.fig.transFigure,
                                          facecolor=colour, edgecolor="none"))
        flow.fig.text(flow.fx(0.9), flow.fy(y0 + 0.11), sev.upper(), fontsize=7,
                      fontweight="bold", color="white", ha="center", va="center")
        flow.text(flow.fit(finding_value(f, "id"), 1.35, 3.2, 7.5, "bold", "monospace"), x=1.35,
                  family="monospace", weight="bold", size=7.5, gap=0)
        key = flow.fit(finding_value(f, "key_number") or "", 0, 1.9, 8)
        key_width = _width_pt(key, 8) / 72
        flow.text(flow.fit(finding_value(f, "title"), 3.25, 7.72 - key_width - 0.15, 8, "bold"),
                  x=3.25, weight="bold", size=8, gap=0)
        flow.text(key, x=7.72, size=8, ha="right")
        where = pages_of.get(id(f))
        remedy = "→ " + " ".join(str(finding_value(f, "remedy") or "").split())
        subject = finding_value(f, "subject")
        flow.text(flow.fit(f"{subject}" + (f" · see {where}" if where else ""), 1.35, 3.15, 7),
                  x=1.35, size=7, colour="#555555", gap=0)
        flow.text(flow.fit(remedy, 3.25, 7.72, 7.5), x=3.25, size=7.5, colour="#333333")
        flow.fig.lines.append(Line2D([flow.fx(0.55), flow.fx(7.72)],
                                     [flow.fy(flow.y + 0.05)] * 2, transform=flow.fig.transFigure,
                                     color="#dddddd", linewidth=0.6))
        flow.space(0.1)
    return flow.figs


def _fmt_int(v: Any) -> str:
    return "—" if v is None else f"{int(v):,}"


def _detail_pages(ctx: _Context, pages_of: dict[int, str]) -> list[Figure]:
    if not ctx.findings:
        return []
    flow = _TextFlow(ctx.run.name, PAGE_TITLES["findings"])
    for f in ctx.findings:
        flow.need(1.3)
        sev = finding_value(f, "severity")
        colour = SEVERITY_COLOURS.get(sev, "black")
        flow.text(f"{sev.upper()}  {finding_value(f, 'id')}", size=10, weight="bold",
                  colour=colour, gap=0.2, family="monospace")
        flow.paragraph(finding_value(f, "title"), size=10, weight="bold")
        steps = finding_value(f, "steps")
        facts = [f"subject: {finding_value(f, 'subject')}",
                 f"key number: {finding_value(f, 'key_number')}"]
        if steps:
            facts.append(f"steps {_fmt_int(steps[0])}–{_fmt_int(steps[1])}")
        where = pages_of.get(id(f))
        facts.append(f"plot: {where}" if where else "no plot")
        flow.paragraph("  ·  ".join(facts), size=8, colour="#444444")
        flow.text("Why", size=8.5, weight="bold", gap=0.15)
        flow.paragraph(finding_value(f, "why") or "", x=0.75)
        flow.text("Remedy", size=8.5, weight="bold", gap=0.15)
        flow.paragraph(finding_value(f, "remedy") or "", x=0.75)
        evidence = finding_value(f, "evidence") or {}
        if isinstance(evidence, dict) and evidence:
            _evidence_block(flow, evidence)
        flow.space(0.22)
    return flow.figs


def _evidence_block(flow: _TextFlow, evidence: dict) -> None:
    """The evidence as a two-column table of its numbers, then a sentence per series."""
    rows, sentences = evidence_parts(evidence)
    flow.text("Evidence", size=8.5, weight="bold", gap=0.15)
    for key, value in rows:
        flow.text(flow.fit(key, 0.75, 2.85, 7.5), x=0.75, size=7.5, colour="#555555", gap=0)
        flow.paragraph(value, x=2.95, size=7.5, colour="#222222", max_lines=2)
    for sentence in sentences:
        flow.paragraph(sentence, x=0.75, size=7.5, colour="#333333", max_lines=2)


# -- assembly -----------------------------------------------------------------------------------

PLOT_PAGES: list[tuple[str, Callable[[_Context], list[Figure]]]] = [
    ("gradients", _gradient_page),
    ("losses", _losses_page),
    ("representations", _representations_page),
    ("prototypes", _prototypes_page),
    ("saturation", _saturation_page),
    ("batches", _batches_page),
]


def _build(run: Run, findings: Iterable[Any], title: str | None) -> list[tuple[str, Figure]]:
    ctx = _Context(run, findings, title)
    plots: list[tuple[str, Figure]] = []
    for key, builder in PLOT_PAGES:
        for fig in builder(ctx):
            plots.append((key, fig))
    for fig in _evidence_pages(ctx):
        plots.append(("evidence", fig))
    text = [("verdict", fig) for fig in _verdict_pages(ctx, ctx.marked)]
    text += [("findings", fig) for fig in _detail_pages(ctx, ctx.marked)]
    return number_pages(text + plots, run.name)


def _plain(text: str) -> str:
    """``text`` drawn as it is: a ``$`` escaped, so that matplotlib never parses a user's name
    (a loss called ``L$_{rec}$``) as mathtext, which fails on what is not valid TeX."""
    return re.sub(r"(?<!\\)\$", r"\\$", text)


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
    texts hold no ``$``; names do), axis limits whose span is a finite number, and markers a
    line can draw (markers spaced along a line in display space, a float ``markevery``, fail
    in matplotlib on a line with no drawable point: empty, all NaN or Inf, or all zero on a
    log axis; such a line draws nothing either way)."""
    for ax in fig.axes:
        for axis, get, set_ in ((ax.xaxis, ax.get_xlim, ax.set_xlim),
                                (ax.yaxis, ax.get_ylim, ax.set_ylim)):
            limits = _finite_span(*get(), axis.get_scale() == "log")
            if limits is not None:
                set_(*limits)
    for text in _texts(fig):
        if "$" in text.get_text():
            text.set_text(_plain(text.get_text()))
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
    finish it for drawing (:func:`_finish_page`)."""
    named: list[tuple[str, Figure]] = []
    seen: dict[str, int] = {}
    total = len(pages)
    for number, (key, fig) in enumerate(pages, 1):
        seen[key] = seen.get(key, 0) + 1
        name = key if seen[key] == 1 else f"{key}-{seen[key]}"
        fig.text(0.5, 0.018, f"{_clip(footer, 40)} · gradprobe {__version__} · page {number} "
                 f"of {total}", fontsize=7, ha="center", color="#888888")
        _finish_page(fig)
        named.append((name, fig))
    return named


def report_figures(run: Run, findings: Iterable[Any], *, title: str | None = None
                   ) -> list[tuple[str, Figure]]:
    """Every page of the report as ``(name, Figure)``, in page order.

    Names: ``verdict``, ``findings`` (when there are findings), ``gradients``, ``losses``,
    ``representations``, ``prototypes``, ``saturation``, ``batches``, ``evidence`` (findings
    whose quantity no other page draws); a page that runs over gets ``-2``, ``-3``... Pages whose
    quantities were not recorded are left out. The figures are laid out under the report's
    style; save them with :func:`save_figure` (or inside :func:`report_style`) to keep it.
    """
    with report_style():
        return _build(run, findings, title)


def save_figure(fig: Figure, path, **kw) -> None:
    """Save one report figure (PNG, SVG, PDF...) under the report's style."""
    with report_style():
        fig.savefig(path, **kw)
