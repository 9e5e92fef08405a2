"""The comparison report: several runs' findings side by side and their key series overlaid.

``write_comparison_pdf(runs, findings_per_run, path)`` (``gradprobe compare A B -o compare.pdf``
and the demo's before/after) answers "did the fix work?": page 1 is a table of finding ids by
run (severity colours, ``-`` where the run is clear) with the runs' facts and key numbers; the
pages after it overlay the runs, one colour and line style per run on every page, for what
decides most fixes: each auxiliary loss's weighted-gradient ratio to the largest, each loss
relative to its start, effective rank and normalised std per latent, saturated share per
sigmoid watch, and the batch composition. A panel draws every run that recorded its series;
pages whose quantities no run recorded are left out.

It reuses the single-run report's pieces (:mod:`gradprobe.report.plots`: page frame, step axis,
text flow, fitting and wrapping, decimation, page numbering; :mod:`gradprobe.report.pdf`:
metadata and the atomic write), so the two documents look alike.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from gradprobe import __version__
from gradprobe.record import Run

from .data import RunData, decimate, finding_value
from .pdf import write_pages
from .plots import (_fit, _Frame, _has_positive, _plot_steps, _TextFlow, _unique, _width_pt,
                    _wrap, headroom, number_pages, sorted_findings, step_axis)
from .style import (PAGE_SIZE, REFERENCE_COLOUR, SEVERITY_COLOURS, SEVERITY_ORDER, report_style,
                    run_style)

__all__ = ["write_comparison_pdf", "comparison_figures", "COMPARE_TITLES", "run_labels"]

try:  # the diagnosis' own defaults: the lines drawn are the rules' lines
    from gradprobe.diagnose import Thresholds as _Thresholds
    _TH = _Thresholds()
    SWAMPING_THRESHOLD = float(_TH.swamping_ratio)
    SATURATION_THRESHOLD = float(_TH.saturation_fraction)
except Exception:  # pragma: no cover - diagnose not importable
    SWAMPING_THRESHOLD, SATURATION_THRESHOLD = 0.1, 0.25

COMPARE_TITLES = {
    "overview": "Comparison",
    "gradients": "Gradient balance, run by run",
    "losses": "Losses, run by run",
    "representations": "Representations, run by run",
    "saturation": "Sigmoid saturation, run by run",
    "batches": "Batches and contrastive negatives, run by run",
}
PANELS_PER_PAGE = 8
REFERENCE_STYLE = (0, (1, 1.5))  # dotted: a run's own healthy reference, in the run's colour


def run_labels(runs: Sequence[Run]) -> list[str]:
    """One distinct label per run: its name, made unique with its file name or a number."""
    names = [r.name for r in runs]
    labels = []
    for k, run in enumerate(runs):
        label = names[k]
        if names.count(label) > 1:
            label = f"{label} ({Path(str(run.source)).name})"
        while label in labels:
            label = f"{label} #{k + 1}"
        labels.append(label)
    return labels


# -- what is compared -------------------------------------------------------------------------


class _Compare:
    def __init__(self, runs: Sequence[Run], findings_per_run: Sequence[Iterable[Any]],
                 title: str | None):
        if len(runs) != len(findings_per_run):
            raise ValueError(f"{len(runs)} runs but {len(findings_per_run)} lists of findings")
        if not runs:
            raise ValueError("nothing to compare: no runs")
        self.runs = list(runs)
        self.labels = run_labels(self.runs)
        self.data = [RunData(r) for r in self.runs]
        self.findings = [sorted_findings(f) for f in findings_per_run]
        self.styles = [run_style(k) for k in range(len(self.runs))]
        self.title = title or "gradprobe comparison: " + " vs ".join(self.labels)
        ranges = [d.step_range() for d in self.data]
        lows = [lo for lo, _ in ranges if lo is not None]
        highs = [hi for _, hi in ranges if hi is not None]
        self.xlim = (min(lows), max(highs)) if lows and highs else None
        self.corner = f"{len(self.runs)} runs: " + ", ".join(self.labels)

    def ordered(self, names: Iterable[Iterable[str]]) -> list[str]:
        """The union of several runs' names, in first-seen order."""
        out: list[str] = []
        for group in names:
            for n in group:
                if n not in out:
                    out.append(n)
        return out

    def flags(self, k: int, quantities: Iterable[str], name: str | None) -> list[Any]:
        """Run ``k``'s findings drawn on ``quantities`` about ``name`` (its subject)."""
        quantities = set(quantities)
        hits = []
        for f in self.findings[k]:
            plot = finding_value(f, "plot")
            if not isinstance(plot, dict) or plot.get("quantity") not in quantities:
                continue
            names = list(plot.get("names") or [])
            if name is None or finding_value(f, "subject") == name or names == [name]:
                hits.append(f)
        return hits

    def legend(self) -> list[tuple[str, dict]]:
        return list(zip(self.labels, self.styles))


def _counts(findings: list[Any]) -> str:
    if not findings:
        return "no failure modes found"
    counts = {s: sum(finding_value(f, "severity") == s for f in findings) for s in SEVERITY_ORDER}
    return ", ".join(f"{counts[s]} {'note' if s == 'info' else s}{'s' if counts[s] != 1 else ''}"
                     for s in SEVERITY_ORDER if counts[s])


def _worst(findings: list[Any]) -> str | None:
    sev = [finding_value(f, "severity") for f in findings]
    return min(sev, key=lambda s: SEVERITY_ORDER.get(s, 3)) if sev else None


# -- page 1: findings by run, and the runs' facts ---------------------------------------------


def _finding_ids(cmp: _Compare) -> list[str]:
    """Every id found in any run: worst severity first, then the catalogue's order."""
    try:
        from gradprobe.diagnose.findings import FINDING_IDS
    except Exception:  # pragma: no cover
        FINDING_IDS = ()
    ids = cmp.ordered([[finding_value(f, "id") for f in fs] for fs in cmp.findings])

    def key(fid: str):
        worst = _worst([f for fs in cmp.findings for f in fs if finding_value(f, "id") == fid])
        catalogue = FINDING_IDS.index(fid) if fid in FINDING_IDS else len(FINDING_IDS)
        return SEVERITY_ORDER.get(worst, 3), catalogue
    return sorted(ids, key=key)


def _change_sentences(cmp: _Compare) -> list[tuple[str, str]]:
    """For each run after the first: which findings it cleared, kept and added, with a colour."""
    out = []
    base = {finding_value(f, "id") for f in cmp.findings[0]}
    for k in range(1, len(cmp.runs)):
        ids = {finding_value(f, "id") for f in cmp.findings[k]}
        cleared = sorted(base - ids)
        kept = sorted(base & ids)
        new = sorted(ids - base)
        parts = []
        if cleared:
            parts.append("cleared " + ", ".join(cleared))
        if kept:
            parts.append("still " + ", ".join(kept))
        if new:
            parts.append("new " + ", ".join(new))
        if not parts:
            parts.append("no findings in either run")
        colour = SEVERITY_COLOURS["error"] if new else (
            "#1e8449" if not kept else ("#9a5b00" if not cleared else "#333333"))
        out.append((f"{cmp.labels[k]} against {cmp.labels[0]}: " + "; ".join(parts) + ".",
                    colour))
    return out


def _key_numbers(cmp: _Compare, k: int) -> list[tuple[str, str]]:
    """(row label, value) facts of run ``k`` for the overview table."""
    run, d = cmp.runs[k], cmp.data[k]
    lo, hi = d.step_range()
    n_probe = len(run.probe_steps())
    rows = [
        ("source", Path(str(run.source)).name),
        ("steps", f"{lo:,} to {hi:,}" if lo is not None else "nothing recorded"),
        ("probe steps", f"{n_probe:,}" + (f" (every {run.every})" if run.every else "")),
        ("losses", ", ".join(run.losses) or "—"),
        ("task", str(run.task or "—")),
    ]
    task = run.task
    if task and d.has("loss", task):
        rel = d.relative_to_first("loss", task)
        if rel is not None and np.isfinite(rel[1]).any():
            last = rel[1][np.isfinite(rel[1])][-1]
            rows.append(("task loss, end / start", f"{last:.3g}"))
    norms = [n for n in run.losses if d.has("weighted_grad_norm", n)]
    if len(norms) > 1:
        ratios = d.ratio_to_largest("weighted_grad_norm", norms)
        medians = {}
        for name, (_, r) in ratios.items():
            r = r[np.isfinite(r)]
            if name != task and len(r):
                medians[name] = float(np.median(r))
        if medians:
            weakest = min(medians, key=medians.get)
            rows.append(("weakest aux gradient", f"{weakest}: {medians[weakest]:.3g} of the "
                         "largest (median)"))
    for name in d.names("effective_rank"):
        _, v = d.series("effective_rank", name)
        v = v[np.isfinite(v)]
        if len(v):
            iso = ""
            if d.has("effective_rank_isotropic", name):
                _, ref = d.series("effective_rank_isotropic", name)
                ref = ref[np.isfinite(ref)]
                iso = f" (isotropic {ref[-1]:.3g})" if len(ref) else ""
            rows.append((f"effective rank {name}, end", f"{v[-1]:.3g}{iso}"))
    for name in d.names("saturated_fraction"):
        _, v = d.series("saturated_fraction", name)
        v = v[np.isfinite(v)]
        if len(v):
            rows.append((f"saturated {name}, median", f"{np.median(v):.1%}"))
    if d.has("groups_per_batch", "batch"):
        _, v = d.series("groups_per_batch", "batch")
        v = v[np.isfinite(v)]
        expect = run.meta.get("expect_groups_per_batch")
        if len(v):
            rows.append(("groups per batch, median", f"{np.median(v):g}" +
                         (f" (declared {expect})" if expect is not None else "")))
    rows.append(("findings", _counts(cmp.findings[k])))
    return rows


class _Columns:
    """The overview's table geometry: a label column, then one column per run (inches)."""

    X0, LABEL_END, X1 = 0.55, 2.45, 7.72

    def __init__(self, n: int):
        self.n = n
        self.width = (self.X1 - self.LABEL_END) / n

    def x(self, k: int) -> float:
        return self.LABEL_END + k * self.width

    def inner(self) -> float:
        return self.width - 0.12


def _table_header(flow: _TextFlow, cmp: _Compare, cols: _Columns, first: str) -> None:
    flow.need(0.3)
    flow.text(first, x=cols.X0, weight="bold", size=7.5, gap=0)
    y = flow.fy(flow.y + 0.06)
    for k, label in enumerate(cmp.labels):
        style = cmp.styles[k]
        x = cols.x(k)
        flow.fig.lines.append(Line2D([flow.fx(x), flow.fx(x + 0.3)], [y, y],
                                     transform=flow.fig.transFigure, color=style["color"],
                                     linestyle=style["linestyle"], linewidth=1.6))
        flow.fig.lines.append(Line2D([flow.fx(x + 0.15)], [y], transform=flow.fig.transFigure,
                                     color=style["color"], marker=style["marker"], markersize=3.5))
        flow.text(flow.fit(label, x + 0.38, x + cols.inner(), 7.5, "bold"), x=x + 0.38,
                  weight="bold", size=7.5, gap=0, colour=style["color"])
    flow.space(0.19)
    flow.fig.lines.append(Line2D([flow.fx(cols.X0), flow.fx(cols.X1)], [flow.fy(flow.y)] * 2,
                                 transform=flow.fig.transFigure, color="#999999", linewidth=0.7))
    flow.space(0.06)


def _overview_pages(cmp: _Compare) -> list[Figure]:
    flow = _TextFlow(cmp.corner, COMPARE_TITLES["overview"], title_first=False)
    flow.text(flow.fit(cmp.title, flow.X0, 7.72, 17, "bold"), size=17, weight="bold", gap=0.36)
    flow.paragraph(f"{len(cmp.runs)} runs, compared by gradprobe {__version__}: the findings side "
                   "by side, then the key series of every run overlaid (one colour and line "
                   "style per run on every page).", size=8, colour="#555555")
    flow.space(0.12)

    # each run's verdict, then what changed against the first run
    for k, label in enumerate(cmp.labels):
        worst = _worst(cmp.findings[k])
        colour = SEVERITY_COLOURS.get(worst, "#1e8449") if worst else "#1e8449"
        flow.need(0.25)
        y = flow.fy(flow.y + 0.08)
        style = cmp.styles[k]
        flow.fig.lines.append(Line2D([flow.fx(0.55), flow.fx(0.9)], [y, y],
                                     transform=flow.fig.transFigure, color=style["color"],
                                     linestyle=style["linestyle"], linewidth=1.8))
        flow.fig.lines.append(Line2D([flow.fx(0.725)], [y], transform=flow.fig.transFigure,
                                     color=style["color"], marker=style["marker"], markersize=4))
        flow.text(flow.fit(label, 1.0, 3.6, 10, "bold"), x=1.0, size=10, weight="bold", gap=0)
        flow.text(flow.fit(_counts(cmp.findings[k]), 3.7, 7.72, 10, "bold"), x=3.7, size=10,
                  weight="bold", colour=colour, gap=0.22)
    for sentence, colour in _change_sentences(cmp):
        flow.paragraph(sentence, size=9, colour=colour)
    flow.space(0.15)

    cols = _Columns(len(cmp.runs))
    ids = _finding_ids(cmp)
    flow.text("Findings by run" if ids else "Findings: none in any run", size=11, weight="bold",
              gap=0.26)
    if ids:
        _table_header(flow, cmp, cols, "finding")
        for fid in ids:
            if flow.need(0.42):
                _table_header(flow, cmp, cols, "finding (continued)")
            y0 = flow.y
            flow.fig.text(flow.fx(cols.X0), flow.fy(y0 + 0.11),
                          _fit(fid, cols.LABEL_END - 0.1 - cols.X0, 7.5, "bold", "monospace"),
                          family="monospace", fontweight="bold", fontsize=7.5, va="center")
            for k in range(len(cmp.runs)):
                hits = [f for f in cmp.findings[k] if finding_value(f, "id") == fid]
                x = cols.x(k)
                if not hits:
                    flow.fig.text(flow.fx(x + 0.35), flow.fy(y0 + 0.11), "-", fontsize=10,
                                  color="#555555", ha="center", va="center")
                    continue
                sev = _worst(hits)
                worst = next(f for f in hits if finding_value(f, "severity") == sev)
                colour = SEVERITY_COLOURS.get(sev, "black")
                flow.fig.patches.append(Rectangle(
                    (flow.fx(x), flow.fy(y0 + 0.2)), flow.fx(0.7), 0.18 / PAGE_SIZE[1],
                    transform=flow.fig.transFigure, facecolor=colour, edgecolor="none"))
                flow.fig.text(flow.fx(x + 0.35), flow.fy(y0 + 0.11), sev.upper(), fontsize=7,
                              fontweight="bold", color="white", ha="center", va="center")
                more = f"×{len(hits)}" if len(hits) > 1 else ""
                if more:
                    flow.fig.text(flow.fx(x + 0.75), flow.fy(y0 + 0.11), more, fontsize=7.5,
                                  color=colour, fontweight="bold", va="center")
                detail = f"{finding_value(worst, 'subject')}: {finding_value(worst, 'key_number')}"
                flow.fig.text(flow.fx(x), flow.fy(y0 + 0.24),
                              _fit(detail, cols.inner(), 7), fontsize=7, color="#444444",
                              va="top")
            flow.y = y0 + 0.4
            flow.fig.lines.append(Line2D([flow.fx(cols.X0), flow.fx(cols.X1)],
                                         [flow.fy(flow.y)] * 2, transform=flow.fig.transFigure,
                                         color="#dddddd", linewidth=0.6))
            flow.space(0.06)
        flow.space(0.12)

    # the runs' facts: the rows any run has, in first-seen order
    facts = [dict(_key_numbers(cmp, k)) for k in range(len(cmp.runs))]
    rows = cmp.ordered([list(f) for f in facts])
    flow.need(0.8)
    flow.text("The runs", size=11, weight="bold", gap=0.26)
    _table_header(flow, cmp, cols, "")
    for row in rows:
        cells = [_wrap(f.get(row, "—"), cols.inner(), 7.5)[:3] for f in facts]
        height = max(len(c) for c in cells) * 7.5 * 1.45 / 72
        if flow.need(height + 0.05):
            _table_header(flow, cmp, cols, "(continued)")
        y0 = flow.y
        flow.text(flow.fit(row, cols.X0, cols.LABEL_END - 0.1, 7.5, "bold"), x=cols.X0,
                  size=7.5, weight="bold", gap=0)
        for k, lines in enumerate(cells):
            flow.y = y0
            for line in lines:
                flow.text(line, x=cols.x(k), size=7.5)
        flow.y = y0 + height + 0.05
    return flow.figs


# -- overlay pages ----------------------------------------------------------------------------


@dataclass
class _Panel:
    """One overlay panel: a series per run, with each run's reference and the run's flags."""

    title: str
    ylabel: str
    quantities: tuple[str, ...]
    name: str | None
    lines: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    refs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    levels: list[tuple[float, str]] = field(default_factory=list)  # dashed grey lines
    log: bool = False
    strictly_positive_log: bool = False
    ylim: tuple[float | None, float | None] | None = None
    integer: bool = False


def _flag_note(cmp: _Compare, panel: _Panel) -> tuple[str, str]:
    """'flagged: run (id)' for the runs with a finding on this panel, in the worst colour."""
    parts, worst = [], []
    for k in range(len(cmp.runs)):
        hits = cmp.flags(k, panel.quantities, panel.name)
        if hits:
            worst.append(_worst(hits))
            parts.append(cmp.labels[k])
    if not parts:
        return "", REFERENCE_COLOUR
    sev = min(worst, key=lambda s: SEVERITY_ORDER.get(s, 3))
    return "flagged in " + ", ".join(parts), SEVERITY_COLOURS.get(sev, REFERENCE_COLOUR)


def _draw_panel(cmp: _Compare, fig: Figure, cell, panel: _Panel) -> None:
    ax = fig.add_subplot(cell)
    values = []
    for k, (x, y) in sorted(panel.lines.items()):
        flagged = bool(cmp.flags(k, panel.quantities, panel.name))
        x, y = decimate(x, y)
        values.append(y)
        _plot_steps(ax, x, y, cmp.styles[k], emphasis=flagged)
    for k, (x, y) in sorted(panel.refs.items()):
        x, y = decimate(x, y)
        ax.plot(x, y, color=cmp.styles[k]["color"], linestyle=REFERENCE_STYLE, linewidth=1.0,
                alpha=0.9)
    if panel.log and _has_positive(values) and (not panel.strictly_positive_log or all(
            np.all(y[np.isfinite(y)] > 0) for y in values)):
        ax.set_yscale("log", nonpositive="mask")
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    for value, label in panel.levels:
        ax.axhline(value, color=REFERENCE_COLOUR, linestyle=(0, (4, 2)), linewidth=1.0)
        ax.annotate(label, xy=(1.0, value), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=6.5,
                    color=REFERENCE_COLOUR, bbox=dict(boxstyle="square,pad=0.1",
                                                      facecolor="white", edgecolor="none",
                                                      alpha=0.8))
    # a band above the data: no line runs along the top edge, the levels' labels fit
    headroom(ax, 12 if panel.levels else 6, include=[v for v, _ in panel.levels])
    if panel.integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    width_in = ax.get_position().width * PAGE_SIZE[0]
    note, colour = _flag_note(cmp, panel)
    missing = [cmp.labels[k] for k in range(len(cmp.runs)) if k not in panel.lines]
    title = panel.title + (f" (not in {', '.join(missing)})" if missing else "")
    if note:
        note = _fit(note, 0.45 * width_in, 7)
        ax.set_title(note, loc="right", fontsize=7, color=colour, fontweight="bold")
        title_room = width_in - _width_pt(note, 7, "bold") / 72 - 0.15
    else:
        title_room = width_in
    ax.set_title(_fit(title, title_room, 9.5, "bold"))
    ax.set_ylabel(panel.ylabel)
    step_axis(ax, cmp.xlim)


def _panel_pages(cmp: _Compare, key: str, panels: list[_Panel], how_to_read: str,
                 ncols: int | None = None) -> list[tuple[str, Figure]]:
    panels = [p for p in panels if p.lines]
    if not panels:
        return []
    # what each run's findings say on this page, one sentence per finding id
    sentences = []
    for fid in _finding_ids(cmp):
        parts, any_hit = [], False
        for k, label in enumerate(cmp.labels):
            hits = _unique([f for p in panels for f in cmp.flags(k, p.quantities, p.name)
                            if finding_value(f, "id") == fid])
            if hits:
                any_hit = True
                sev = _worst(hits)
                worst = next(f for f in hits if finding_value(f, "severity") == sev)
                parts.append(f"{label} {sev.upper()}: {finding_value(worst, 'key_number')}")
            else:
                parts.append(f"{label} clear")
        if any_hit:
            sentences.append(f"{fid}: " + "; ".join(parts) + ".")
    sentences.append(how_to_read)
    ncols = 1 if len(panels) == 1 else (ncols or (2 if len(panels) > 2 else 1))
    out = []
    for start in range(0, len(panels), PANELS_PER_PAGE):
        chunk = panels[start:start + PANELS_PER_PAGE]
        frame = _Frame(COMPARE_TITLES[key] + (" (continued)" if start else ""), cmp.corner,
                       cmp.legend(), more="… (see the findings table on page 1)")
        frame.header(sentences)
        nrows = max(math.ceil(len(chunk) / ncols), 2)
        gs = frame.grid(nrows, ncols, hspace=0.62)
        for i, panel in enumerate(chunk):
            row, col = divmod(i, ncols)
            _draw_panel(cmp, frame.fig, gs[row, col], panel)
        out.append((key, frame.fig))
    return out


def _gradient_panels(cmp: _Compare) -> list[_Panel]:
    ratios = []
    for d, run in zip(cmp.data, cmp.runs):
        norms = [n for n in run.losses if d.has("weighted_grad_norm", n)]
        ratios.append(d.ratio_to_largest("weighted_grad_norm", norms) if len(norms) > 1 else {})
    aux = cmp.ordered([[n for n in r if n != run.task] for r, run in zip(ratios, cmp.runs)])
    # a task loss is drawn too where some run's diagnosis found it swamped
    tasks = cmp.ordered([[run.task] for run in cmp.runs if run.task])
    flagged_tasks = [t for t in tasks if t not in aux and any(
        cmp.flags(k, ("weighted_grad_norm",), t) for k in range(len(cmp.runs)))]
    panels = []
    for name in aux + flagged_tasks:
        panel = _Panel(name + (" (the task loss)" if name in flagged_tasks else ""),
                       "‖w·g‖ / largest ‖w·g‖ (ratio)", ("weighted_grad_norm",), name, log=True,
                       levels=[(SWAMPING_THRESHOLD, f"swamping threshold {SWAMPING_THRESHOLD:g}")])
        for k, r in enumerate(ratios):
            if name in r and (cmp.runs[k].task != name or name in flagged_tasks):
                panel.lines[k] = r[name]
        panels.append(panel)
    return panels


def _loss_panels(cmp: _Compare) -> list[_Panel]:
    names = cmp.ordered([[n for n in run.losses if d.has("loss", n)] + d.names("loss")
                         for run, d in zip(cmp.runs, cmp.data)])
    panels = []
    for name in names:
        panel = _Panel(name, "loss / its first value (ratio)",
                       ("loss",), name, log=True, strictly_positive_log=True)
        for k, d in enumerate(cmp.data):
            if d.has("loss", name):
                rel = d.relative_to_first("loss", name)
                if rel is not None:
                    panel.lines[k] = rel
        panels.append(panel)
    return panels


def _representation_panels(cmp: _Compare) -> list[_Panel]:
    latents = cmp.ordered([sorted(set(d.names("effective_rank")) | set(d.names("normalized_std")))
                           for d in cmp.data])
    panels = []
    for name in latents:
        rank = _Panel(f"{name}: effective rank", "effective rank (dimensions)",
                      ("effective_rank",), name, ylim=(0, None))
        std = _Panel(f"{name}: normalised std", "std of ℓ2-normalised rows",
                     ("normalized_std",), name, ylim=(0, None))
        for k, d in enumerate(cmp.data):
            if d.has("effective_rank", name):
                rank.lines[k] = d.series("effective_rank", name)
                if d.has("effective_rank_isotropic", name):
                    rank.refs[k] = d.series("effective_rank_isotropic", name)
            if d.has("normalized_std", name):
                std.lines[k] = d.series("normalized_std", name)
                if d.has("latent_dim", name):
                    s, dim = d.series("latent_dim", name)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        std.refs[k] = (s, 1 / np.sqrt(dim))
        # side by side per latent, even when one of the two is missing everywhere
        panels += [rank, std]
    return panels


def _saturation_panels(cmp: _Compare) -> list[_Panel]:
    watches = cmp.ordered([d.names("saturated_fraction") for d in cmp.data])
    panels = []
    for name in watches:
        panel = _Panel(name, "saturated share of inputs (|x| > threshold)",
                       ("saturated_fraction",), name, ylim=(-0.02, 1.02),
                       levels=[(SATURATION_THRESHOLD,
                                f"saturation threshold {SATURATION_THRESHOLD:g}")])
        for k, d in enumerate(cmp.data):
            if d.has("saturated_fraction", name):
                panel.lines[k] = d.series("saturated_fraction", name)
        panels.append(panel)
    return panels


def _batch_panels(cmp: _Compare) -> list[_Panel]:
    groups = _Panel("Groups per batch (dotted: each run's declared)",
                    "distinct groups per batch (count)", ("groups_per_batch",), "batch",
                    ylim=(0, None), integer=True)
    share = _Panel("Same-group pairs in a batch", "share of sample pairs",
                   ("same_group_pair_share",), "batch", ylim=(-0.02, 1.02))
    for k, (d, run) in enumerate(zip(cmp.data, cmp.runs)):
        if d.has("groups_per_batch", "batch"):
            s, v = d.series("groups_per_batch", "batch")
            groups.lines[k] = (s, v)
            expect = run.meta.get("expect_groups_per_batch")
            if expect is not None and len(s):
                groups.refs[k] = (np.array([s[0], s[-1]]), np.array([expect, expect], float))
        if d.has("same_group_pair_share", "batch"):
            share.lines[k] = d.series("same_group_pair_share", "batch")
    panels = [groups, share]
    for name in cmp.ordered([d.names("contrastive_same_group_share") for d in cmp.data]):
        panel = _Panel(f"{name}: negatives from the anchor's group", "share of negatives",
                       ("contrastive_same_group_share",), name, ylim=(-0.02, 1.02))
        for k, d in enumerate(cmp.data):
            if d.has("contrastive_same_group_share", name):
                panel.lines[k] = d.series("contrastive_same_group_share", name)
        panels.append(panel)
    return panels


OVERLAYS = [
    ("gradients", _gradient_panels,
     "How to read: each auxiliary loss's weighted gradient norm over the largest loss's, one "
     "line per run; below the dashed swamping threshold the loss barely moves the shared "
     "parameters. A fix worked when its run's line rises above the threshold. Thick lines: "
     "the run has a finding on that panel."),
    ("losses", _loss_panels,
     "How to read: each loss over its first recorded value, one line per run; a constraint "
     "loss that stays near 1× while the task falls is neglected. Thick lines: the run has a "
     "finding on that panel."),
    ("representations", _representation_panels,
     "How to read: per latent, effective rank and normalised std, one line per run; dotted in "
     "the run's colour: its isotropic reference (rank) and 1/√dim (std). A collapsed latent "
     "falls far below its reference."),
    ("saturation", _saturation_panels,
     "How to read: the share of sigmoid inputs in the flat region, one line per run; above "
     "the dashed threshold the sigmoid passes almost no gradient."),
    ("batches", _batch_panels,
     "How to read: the batches should hold what the sampler declares (dotted, in the run's "
     "colour); a high share of same-group pairs or negatives leaves the contrastive loss "
     "little to learn from."),
]


def _build(cmp: _Compare) -> list[tuple[str, Figure]]:
    pages: list[tuple[str, Figure]] = [("overview", fig) for fig in _overview_pages(cmp)]
    for key, panels, how in OVERLAYS:
        pages += _panel_pages(cmp, key, panels(cmp), how,
                              ncols=2 if key == "representations" else None)
    return number_pages(pages, "comparison: " + " vs ".join(cmp.labels))


def comparison_figures(runs: Sequence[Run], findings_per_run: Sequence[Iterable[Any]], *,
                       title: str | None = None) -> list[tuple[str, Figure]]:
    """Every page of the comparison as ``(name, Figure)``, in page order.

    Names: ``overview`` (findings by run and the runs' facts), then ``gradients``,
    ``losses``, ``representations``, ``saturation``, ``batches`` where any run recorded them;
    a page that runs over gets ``-2``, ``-3``...
    """
    with report_style():
        return _build(_Compare(runs, findings_per_run, title))


def write_comparison_pdf(runs: Sequence[Run], findings_per_run: Sequence[Iterable[Any]],
                         path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the comparison of ``runs`` (each with its findings, in the same order) to ``path``.

    Page 1 tabulates finding id × run (severity, ``-`` where clear) with the runs' facts; the
    pages after it overlay the runs' key series. Same metadata (title, subject, creator,
    creation date) and the same atomic write as :func:`gradprobe.report.write_pdf`. Returns the
    path written.
    """
    cmp = _Compare(runs, findings_per_run, title)
    return write_pages(lambda: _build(cmp), path, title=cmp.title,
                       subject=", ".join(cmp.labels))
