"""What a comparison compares: several runs with their findings, one label and one style per
run, and the finding ids found in any of them (worst first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from gradprobe.diagnose import FINDING_IDS
from gradprobe.record import Run

from .data import RunData, finding_value
from .diagnosis import severity_rank, sorted_findings, worst_severity
from .style import run_style

COMPARE_TITLES = {
    "overview": "Comparison",
    "gradients": "Gradient balance, run by run",
    "losses": "Losses, run by run",
    "representations": "Representations, run by run",
    "saturation": "Sigmoid saturation, run by run",
    "batches": "Batches and contrastive negatives, run by run",
}


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


def ordered_union(groups: Iterable[Iterable[str]]) -> list[str]:
    """The union of several runs' names, in first-seen order."""
    out: list[str] = []
    for group in groups:
        for n in group:
            if n not in out:
                out.append(n)
    return out


class Comparison:
    """The runs of a comparison, each with its data, findings (errors first), label and style."""

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

    def finding_ids(self) -> list[str]:
        """Every id found in any run: worst severity first, then the catalogue's order."""
        ids = ordered_union([[finding_value(f, "id") for f in fs] for fs in self.findings])

        def key(fid: str):
            worst = worst_severity([f for fs in self.findings for f in fs
                                    if finding_value(f, "id") == fid])
            catalogue = FINDING_IDS.index(fid) if fid in FINDING_IDS else len(FINDING_IDS)
            return severity_rank(worst), catalogue
        return sorted(ids, key=key)


# What a later run did with the first run's findings, in the order a reader wants it: the
# good news first. Each kind's colour in the PDF: green, amber, red.
CHANGE_KINDS = ("cleared", "still", "new")


def changes(findings_per_run: Sequence[Iterable[Any]]) -> list[list[tuple[str, list[str]]]]:
    """For each run after the first: ``[(kind, finding ids)]`` for the kinds of
    :data:`CHANGE_KINDS` that occur (the first run's ids it cleared, kept, and added)."""
    ids = [{finding_value(f, "id") for f in fs} for fs in findings_per_run]
    out = []
    for later in ids[1:]:
        groups = {"cleared": ids[0] - later, "still": ids[0] & later, "new": later - ids[0]}
        out.append([(kind, sorted(groups[kind])) for kind in CHANGE_KINDS if groups[kind]])
    return out


def key_number_lines(labels: Sequence[str], findings_per_run: Sequence[Iterable[Any]]
                     ) -> list[str]:
    """The terminal's comparison in numbers: each run's findings (errors first) with the
    subject and key number that ``gradprobe analyze`` prints, then what each run after the
    first changed against it."""
    findings_per_run = [sorted_findings(fs) for fs in findings_per_run]
    rows = [(label, finding_value(f, "severity"), finding_value(f, "id"),
             str(finding_value(f, "subject")), str(finding_value(f, "key_number") or ""))
            for label, fs in zip(labels, findings_per_run) for f in fs]
    lines = []
    if rows:
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        lines.append("key numbers (as analyze reports them):")
        for row in rows:
            lines.append("  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths))
                         + f"  [{row[4]}]")
    for label, change in zip(labels[1:], changes(findings_per_run)):
        words = "; ".join(f"{kind} {', '.join(ids)}" for kind, ids in change) or \
            "no findings in either run"
        lines.append(f"{label} against {labels[0]}: {words}.")
    return lines
