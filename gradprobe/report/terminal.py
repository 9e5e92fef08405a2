"""The terminal view of the findings: a short ranked summary."""

from __future__ import annotations

from typing import Any

import click

from .diagnosis import severity_counts, worst_severity
from .roles import roles_lines

SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def summary_lines(run_summary: dict[str, Any], findings: list, *, color: bool = False) -> list[str]:
    """One header line for the run, then one line per finding (severity, id, title, key number)."""
    steps = run_summary.get("last_step")
    losses = ", ".join(run_summary.get("losses", [])) or "none"
    every = run_summary.get("every")
    cadence = f"every {every}" if every else \
        "default cadence" if run_summary.get("cadence") else "cadence not recorded"
    lines = [f"run {run_summary['name']}: {run_summary['probe_steps']} probe steps "
             f"({cadence}, last step {steps}); losses: {losses}"]
    lines += roles_lines(run_summary)
    if not findings:
        lines.append("no failure modes found")
        return lines
    width = max(len(f.id) for f in findings)
    for finding in findings:
        severity = f"{finding.severity:<7}"
        if color:
            severity = click.style(severity, fg=SEVERITY_STYLE.get(finding.severity), bold=True)
        lines.append(f"  {severity} {finding.id:<{width}}  {finding.title}  [{finding.key_number}]")
    lines.append(severity_counts(findings, info="info"))
    return lines


def comparison_lines(labels: list[str], findings_per_run: list[list]) -> list[str]:
    """Finding ids down, runs across: each cell the worst severity, or '-' where the run is clear."""
    ids = sorted({f.id for findings in findings_per_run for f in findings})
    width = max([len(i) for i in ids] + [len("finding")])
    cols = [max(len(label), 7) for label in labels]
    lines = ["  ".join([f"{'finding':<{width}}"] + [f"{lb:<{c}}" for lb, c in zip(labels, cols)])]
    for finding_id in ids:
        cells = []
        for findings, c in zip(findings_per_run, cols):
            worst = worst_severity([f for f in findings if f.id == finding_id])
            cells.append(f"{worst or '-':<{c}}")
        lines.append("  ".join([f"{finding_id:<{width}}"] + cells))
    if not ids:
        lines.append("no failure modes found in any run")
    return lines
