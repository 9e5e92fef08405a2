"""The failure report's shared state and its finding marks: the run's data and palette, the
findings in severity order, and where each finding is marked on its plot.

Every finding with a plot is marked on the panel that draws its quantity: the step range where
it held is shaded in its severity colour (labelled ``shaded: <id>``) and its threshold is drawn
as a dashed line; each page says in one sentence per finding what to look at.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np

from gradprobe.record import Run

from .axes import DASHED, dashed_level, headroom, step_axis
from .data import RunData, finding_value, judged_ratio
from .diagnosis import sorted_findings, unique
from .frames import Frame
from .style import REFERENCE_COLOUR, SEVERITY_COLOURS, Palette
from .text import step_label

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


class ReportContext:
    """One run, its findings (errors first) and the pages its findings were marked on."""

    def __init__(self, run: Run, findings: Iterable[Any], title: str | None):
        self.run = run
        self.data = RunData(run)
        self.palette = Palette(run.losses)
        self.findings = sorted_findings(findings)
        self.title = title or f"gradprobe report: {run.name}"
        self.marked: dict[int, str] = {}  # id(finding) -> page title
        lo, hi = self.data.step_range()
        self.xlim = None if lo is None else (lo, hi)
        probe_steps = np.asarray(run.probe_steps())
        self.every = run.every or (float(np.median(np.diff(probe_steps)))
                                   if len(probe_steps) > 1 else 1)

    def plotted_findings(self) -> list[Any]:
        return [f for f in self.findings if isinstance(finding_value(f, "plot"), dict)
                and finding_value(f, "plot").get("quantity")]

    def matching(self, quantity: str, *, ratio: bool = False,
                 names: Iterable[str] | None = None, among: list[Any] | None = None) -> list[Any]:
        """The findings (of ``among``, default all) plotted on ``quantity`` (as a ratio or
        not), about one of ``names`` when given."""
        wanted = set(names) if names is not None else None
        hits = []
        for f in self.plotted_findings() if among is None else among:
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
             names: Iterable[str] | None = None, threshold_axis: str = "y",
             among: list[Any] | None = None) -> list[Any]:
        """Shade each matching finding's steps and draw its threshold on ``ax``; remember the
        page each finding was first marked on."""
        hits = self.matching(quantity, ratio=ratio, names=names, among=among)
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
                    self._span_end(ax, f, colour)
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
                    key = ("threshold", fid, threshold)
                    dashed_level(ax, threshold, None if key in labelled else
                                 f"{fid} threshold {threshold:g}", colour, linewidth=1.2,
                                 zorder=(1, 5))  # under the data, labelled over it
                    labelled.add(key)
                else:
                    ax.axvline(threshold, color=colour, linestyle=DASHED, linewidth=1.2)
            self.marked.setdefault(id(f), page)
        spans = sum(1 for k in labelled if k[0] == "span")
        if spans:  # the 'shaded:' labels get a band of their own above the data, never on a line
            headroom(ax, 3 + 10 * spans + 2,
                     include=[k[2] for k in labelled if k[0] == "threshold"])
        return hits

    def _span_end(self, ax, f: Any, colour: str) -> None:
        """Say at a shaded span's end why it ends there, when that is before the run's end."""
        note = span_end_note(f, None if self.xlim is None else self.xlim[1], self.every)
        if note is None:
            return
        end = finding_value(f, "steps")[1]
        right_half = self.xlim is not None and end > (self.xlim[0] + self.xlim[1]) / 2
        ax.annotate(note, xy=(end, 0.0), xycoords=("data", "axes fraction"),
                    xytext=(-3 if right_half else 3, 3), textcoords="offset points",
                    ha="right" if right_half else "left", va="bottom", fontsize=6.5,
                    color=colour, fontweight="bold", zorder=5,
                    bbox=dict(boxstyle="square,pad=0.15", facecolor="white", edgecolor="none",
                              alpha=0.8))

    def step_axis(self, ax, label: bool = True) -> None:
        step_axis(ax, self.xlim, label)

    def preview(self, specs: list[tuple[str, bool]]) -> list[Any]:
        """Findings a page will mark: the (quantity, ratio) pairs it draws."""
        hits: list[Any] = []
        for quantity, ratio in specs:
            hits.extend(self.matching(quantity, ratio=ratio))
        return hits

    def start_page(self, key: str, findings: list[Any], how_to_read: str,
                   loss_legend: bool = True) -> Frame:
        """A plot page whose header is written first (a 'what to look at' sentence per
        finding it marks, or how to read it; the loss legend), so the grid fits below."""
        self.palette.new_page()
        legend = [(n, self.palette.loss(n)) for n in self.run.losses] if loss_legend else []
        page = Frame(PAGE_TITLES[key], self.run.name, legend)
        # a page says what this run's findings say: without one, that none is marked here
        # (and where a finding of a kind it explains is drawn instead), before what a
        # finding would look like
        page.header([look_sentence(f) for f in unique(findings)] or
                    [self.none_marked(how_to_read)] + ([how_to_read] if how_to_read else []))
        return page

    def none_marked(self, how_to_read: str) -> str:
        """"No finding of this run is marked on this page.", naming the run's findings of the
        ids ``how_to_read`` explains, which are drawn with another quantity elsewhere."""
        elsewhere = list(dict.fromkeys(
            finding_value(f, "id") for f in self.findings
            if re.search(rf"\b{re.escape(finding_value(f, 'id'))}\b", how_to_read)))
        if not elsewhere:
            return "No finding of this run is marked on this page."
        return ("No finding of this run is marked on this page: its "
                + ", ".join(elsewhere) + " is drawn with the quantity it was judged on (its "
                "page is named in the findings table on page 1).")


def span_end_note(f: Any, last_step: float | None, every: float) -> str | None:
    """Why finding ``f``'s shaded steps end where they do, when that is more than two probe
    steps before ``last_step``: the task memorised its data there (after it the rule judges
    nothing, as its evidence says), or the condition last held there."""
    steps = finding_value(f, "steps")
    if steps is None or last_step is None or steps[1] >= last_step - 2 * every:
        return None
    evidence = finding_value(f, "evidence") or {}
    memorised = evidence.get("task_memorised_at") if isinstance(evidence, dict) else None
    if memorised is not None and 0 <= memorised - steps[1] <= 2 * every:
        return (f"ends at {step_label(steps[1])}: the task memorised its data at step "
                f"{step_label(memorised)}, not judged after")
    return f"ends at {step_label(steps[1])}: last step it held"


def look_sentence(f: Any) -> str:
    """What to look at for finding ``f`` on its plot: the series, the shaded steps, the
    dashed threshold and the key number."""
    plot = finding_value(f, "plot") or {}
    names = [n for n in plot.get("names") or [] if n != plot.get("ratio_to")]
    what = ", ".join(names[:4]) + (" …" if len(names) > 4 else "") if names else \
        plot.get("quantity", "the marked series")
    judged = judged_ratio(f) if plot.get("ratio_to") else None
    if judged:
        what = f"the ratio it judged for {judged.loss} ({judged.over}; the thick line)"
    elif plot.get("ratio_to"):
        what = f"{what} relative to {plot['ratio_to']}"
    steps = finding_value(f, "steps")
    where = f" in the shaded steps {step_label(steps[0])}–{step_label(steps[1])}" if steps else ""
    threshold = plot.get("threshold")
    against = f" against the dashed threshold {threshold:g}" \
        if threshold is not None and np.isfinite(threshold) else ""
    key = finding_value(f, "key_number")
    return (f"{finding_value(f, 'severity', '').upper()} {finding_value(f, 'id')}: look at {what}"
            f"{where}{against}" + (f" ({key})." if key else "."))
