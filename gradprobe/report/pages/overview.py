"""The comparison's first page, "Comparison": each run's verdict, what changed against the
first run, the table of finding ids by run, and the runs' facts side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from gradprobe._version import __version__

from ..comparison import COMPARE_TITLES, Comparison, changes, ordered_union
from ..data import finding_value
from ..diagnosis import severity_counts, worst_severity
from ..frames import TextFlow
from ..style import CLEAR_COLOUR, SEVERITY_COLOURS
from ..text import fit, wrap

CHANGE_COLOURS = {"cleared": CLEAR_COLOUR, "still": SEVERITY_COLOURS["warning"],
                  "new": SEVERITY_COLOURS["error"]}


def overview_pages(cmp: Comparison) -> list[Figure]:
    flow = TextFlow(cmp.corner, COMPARE_TITLES["overview"], title_first=False)
    flow.document_title(cmp.title)
    flow.paragraph(f"{len(cmp.runs)} runs, compared by gradprobe {__version__}: the findings side "
                   "by side, then the key series of every run overlaid (one colour and line "
                   "style per run on every page).", size=8, colour="#555555")
    flow.space(0.12)
    _verdicts(cmp, flow)
    cols = _Columns(len(cmp.runs))
    _findings_table(cmp, flow, cols)
    _facts_table(cmp, flow, cols)
    return flow.figs


def _counts(findings: list) -> str:
    return severity_counts(findings) or "no failure modes found"


def _verdicts(cmp: Comparison, flow: TextFlow) -> None:
    """Each run's verdict (its finding counts), then what changed against the first run: what
    it cleared in green, what it kept in amber, what is new in red."""
    for k, label in enumerate(cmp.labels):
        worst = worst_severity(cmp.findings[k])
        colour = SEVERITY_COLOURS.get(worst, CLEAR_COLOUR) if worst else CLEAR_COLOUR
        flow.need(0.25)
        flow.swatch(0.55, 0.9, cmp.styles[k], drop=0.08, linewidth=1.8, markersize=4)
        flow.text(flow.fit(label, 1.0, 3.6, 10, "bold"), x=1.0, size=10, weight="bold", gap=0)
        flow.text(flow.fit(_counts(cmp.findings[k]), 3.7, flow.X1, 10, "bold"), x=3.7, size=10,
                  weight="bold", colour=colour, gap=0.22)
    for label, change in zip(cmp.labels[1:], changes(cmp.findings)):
        flow.paragraph(f"{label} against {cmp.labels[0]}:", size=9, weight="bold")
        for kind, ids in change:
            flow.paragraph(f"{kind} " + ", ".join(ids), size=9, x=0.8, colour=CHANGE_COLOURS[kind])
        if not change:
            flow.paragraph("no findings in either run", size=9, x=0.8, colour=CLEAR_COLOUR)
    flow.space(0.15)


class _Columns:
    """The overview's table geometry: a label column, then one column per run (inches)."""

    X0, LABEL_END, X1 = TextFlow.X0, 2.45, TextFlow.X1

    def __init__(self, n: int):
        self.width = (self.X1 - self.LABEL_END) / n

    def x(self, k: int) -> float:
        return self.LABEL_END + k * self.width

    def inner(self) -> float:
        return self.width - 0.12


def _table_header(cmp: Comparison, flow: TextFlow, cols: _Columns, first: str) -> None:
    """The first column's heading, then each run's swatch and label."""
    flow.need(0.3)
    flow.text(first, x=cols.X0, weight="bold", size=7.5, gap=0)
    for k, label in enumerate(cmp.labels):
        style = cmp.styles[k]
        x = cols.x(k)
        flow.swatch(x, x + 0.3, style, drop=0.06)
        flow.text(flow.fit(label, x + 0.38, x + cols.inner(), 7.5, "bold"), x=x + 0.38,
                  weight="bold", size=7.5, gap=0, colour=style["color"])
    flow.space(0.19)
    flow.rule(cols.X0, cols.X1, colour="#999999", linewidth=0.7)
    flow.space(0.06)


def _findings_table(cmp: Comparison, flow: TextFlow, cols: _Columns) -> None:
    """Finding ids down (worst first), runs across: the worst severity's badge, its subject
    and key number, ``×n`` for several subjects, ``-`` where the run is clear."""
    ids = cmp.finding_ids()
    flow.heading("Findings by run" if ids else "Findings: none in any run")
    if not ids:
        return
    _table_header(cmp, flow, cols, "finding")
    for fid in ids:
        cells = [_finding_cell(cmp, k, fid, cols) for k in range(len(cmp.runs))]
        height = 0.26 + max(len(lines) for lines in cells) * CELL_LINE
        if flow.need(height + 0.06):
            _table_header(cmp, flow, cols, "finding (continued)")
        y0 = flow.y
        flow.fig.text(flow.fx(cols.X0), flow.fy(y0 + 0.11),
                      fit(fid, cols.LABEL_END - 0.1 - cols.X0, 7.5, "bold", "monospace"),
                      family="monospace", fontweight="bold", fontsize=7.5, va="center")
        for k, lines in enumerate(cells):
            hits = [f for f in cmp.findings[k] if finding_value(f, "id") == fid]
            x = cols.x(k)
            if not hits:
                flow.fig.text(flow.fx(x + 0.35), flow.fy(y0 + 0.11), "-", fontsize=10,
                              color="#555555", ha="center", va="center")
                continue
            severity = worst_severity(hits)
            flow.badge(x, severity)
            if len(hits) > 1:
                flow.fig.text(flow.fx(x + 0.75), flow.fy(y0 + 0.11), f"×{len(hits)}",
                              fontsize=7.5, color=SEVERITY_COLOURS.get(severity, "black"),
                              fontweight="bold", va="center")
            for i, line in enumerate(lines):
                flow.fig.text(flow.fx(x), flow.fy(y0 + 0.24 + i * CELL_LINE), line, fontsize=7,
                              color="#444444", va="top")
        flow.y = y0 + height
        flow.rule(cols.X0, cols.X1)
        flow.space(0.06)
    flow.space(0.12)


CELL_LINE = 7 * 1.4 / 72


def _finding_cell(cmp: Comparison, k: int, fid: str, cols: "_Columns") -> list[str]:
    """Run ``k``'s findings of ``fid``: each one's subject and key number, as ``analyze``
    prints them, wrapped to the column (worst first)."""
    lines = []
    for f in cmp.findings[k]:
        if finding_value(f, "id") == fid:
            lines += wrap(f"{finding_value(f, 'subject')}: {finding_value(f, 'key_number')}",
                          cols.inner(), 7)
    return lines


def _facts_table(cmp: Comparison, flow: TextFlow, cols: _Columns) -> None:
    """The runs' facts: the rows any run has, in first-seen order."""
    facts = [dict(_run_facts(cmp, k)) for k in range(len(cmp.runs))]
    rows = ordered_union([list(f) for f in facts])
    flow.need(0.8)
    flow.heading("The runs")
    _table_header(cmp, flow, cols, "")
    for row in rows:
        cells = [wrap(f.get(row, "—"), cols.inner(), 7.5)[:3] for f in facts]
        height = max(len(c) for c in cells) * 7.5 * 1.45 / 72
        if flow.need(height + 0.05):
            _table_header(cmp, flow, cols, "(continued)")
        y0 = flow.y
        flow.text(flow.fit(row, cols.X0, cols.LABEL_END - 0.1, 7.5, "bold"), x=cols.X0,
                  size=7.5, weight="bold", gap=0)
        for k, lines in enumerate(cells):
            flow.y = y0
            for line in lines:
                flow.text(line, x=cols.x(k), size=7.5)
        flow.y = y0 + height + 0.05


def _run_facts(cmp: Comparison, k: int) -> list[tuple[str, str]]:
    """(row label, value) facts of run ``k`` for the overview table: what the run is, not
    what it measured (the measured numbers are the findings' own, in the findings table as
    ``analyze`` prints them, and the overlays draw the series)."""
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
    if d.has("groups_per_batch", "batch"):
        _, v = d.series("groups_per_batch", "batch")
        v = v[np.isfinite(v)]
        expect = run.meta.get("expect_groups_per_batch")
        if len(v):
            rows.append(("groups per batch, median", f"{np.median(v):g}" +
                         (f" (declared {expect})" if expect is not None else "")))
    rows.append(("findings", _counts(cmp.findings[k])))
    return rows
