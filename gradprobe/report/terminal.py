"""The terminal view of the findings: a short ranked summary."""

from __future__ import annotations

from typing import Any

import click

from .columns import NO_BREAK, hanging
from .diagnosis import severity_counts, worst_severity
from .roles import roles_lines

SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


REMEDY_INDENT = " " * 10  # under the finding id, past the severity column


def summary_header(run_summary: dict[str, Any]) -> str:
    """``run NAME: N probe steps (CADENCE, last step S); losses: ...``, in words for a run
    without a probe step."""
    losses = ", ".join(run_summary.get("losses", [])) or "none"
    count = run_summary["probe_steps"]
    if not count:
        return f"run {run_summary['name']}: no probe step was recorded; losses: {losses}"
    every = run_summary.get("every")
    cadence = f"every {every}" if every else \
        "default cadence" if run_summary.get("cadence") else "cadence not recorded"
    return (f"run {run_summary['name']}: {count} probe step{'s' if count != 1 else ''} "
            f"({cadence}, last step {run_summary['last_step']}); losses: {losses}")


def summary_lines(run_summary: dict[str, Any], findings: list, *, color: bool = False,
                  remedies: bool = True, width: int | None = None) -> list[str]:
    """The header line for the run, then per finding a line (severity, id, title, key number)
    and, with ``remedies``, a line ``remedy: ...`` under it; last the severity counts.

    ``width``: wrap both to this many columns with a hanging indent (a terminal); None keeps
    each on one line (a pipe or log, where a finding is one greppable line)."""
    header = summary_header(run_summary)
    lines = hanging(header, width, "", "    ")
    lines += roles_lines(run_summary, width)
    if not findings:
        lines.append("no failure modes found")
        return lines
    id_width = max(len(f.id) for f in findings)
    for finding in findings:
        head = f"  {finding.severity:<7} {finding.id:<{id_width}}  "
        # The key number is kept on one row (textwrap does not break at a no-break space).
        key = f"[{finding.key_number}]".replace(" ", NO_BREAK)
        body = _wrapped(f"{finding.title}  {key}", head, width)
        if color:
            styled = click.style(f"{finding.severity:<7}", fg=SEVERITY_STYLE.get(finding.severity),
                                 bold=True)
            body[0] = body[0].replace(f"{finding.severity:<7}", styled, 1)
        lines.extend(body)
        if remedies:
            lines.extend(_wrapped(f"remedy: {finding.remedy}", REMEDY_INDENT, width))
    lines.append(severity_counts(findings, info="info"))
    return lines


def _wrapped(text: str, head: str, width: int | None) -> list[str]:
    """``head + text`` as one line, or wrapped to ``width`` under the text's first column
    (under ``REMEDY_INDENT`` where that leaves less than 30 columns)."""
    indent = " " * len(head) if width is None or width - len(head) >= 30 else REMEDY_INDENT
    return hanging(text, width, head, indent)


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
