"""The terminal view of the findings: a short ranked summary."""

from __future__ import annotations

from typing import Any

import click

SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def summary_lines(run_summary: dict[str, Any], findings: list, *, color: bool = False) -> list[str]:
    """One header line for the run, then one line per finding (severity, id, title, key number)."""
    steps = run_summary.get("last_step")
    losses = ", ".join(run_summary.get("losses", [])) or "none"
    lines = [f"run {run_summary['name']}: {run_summary['probe_steps']} probe steps "
             f"(every {run_summary.get('every')}, last step {steps}); losses: {losses}"]
    if not findings:
        lines.append("no failure modes found")
        return lines
    width = max(len(f.id) for f in findings)
    for finding in findings:
        severity = f"{finding.severity:<7}"
        if color:
            severity = click.style(severity, fg=SEVERITY_STYLE.get(finding.severity), bold=True)
        lines.append(f"  {severity} {finding.id:<{width}}  {finding.title}  [{finding.key_number}]")
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITY_STYLE}
    lines.append(", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n))
    return lines
