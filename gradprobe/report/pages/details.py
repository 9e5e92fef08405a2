"""The failure report's "Findings in detail" pages: one block per finding with its facts, why
it matters, the remedy and its evidence in words."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..context import PAGE_TITLES, ReportContext
from ..data import finding_value
from ..evidence import evidence_parts
from ..frames import TextFlow
from ..style import SEVERITY_COLOURS
from ..text import count_label


def detail_pages(ctx: ReportContext, pages_of: dict[int, str]) -> list[Figure]:
    """No page without findings; ``pages_of`` maps ``id(finding)`` to its plot's page."""
    if not ctx.findings:
        return []
    flow = TextFlow(ctx.run.name, PAGE_TITLES["findings"])
    for f in ctx.findings:
        flow.need(1.3)
        severity = finding_value(f, "severity")
        flow.text(f"{severity.upper()}  {finding_value(f, 'id')}", size=10, weight="bold",
                  colour=SEVERITY_COLOURS.get(severity, "black"), gap=0.2, family="monospace")
        flow.paragraph(finding_value(f, "title"), size=10, weight="bold")
        steps = finding_value(f, "steps")
        facts = [f"subject: {finding_value(f, 'subject')}",
                 f"key number: {finding_value(f, 'key_number')}"]
        if steps:
            facts.append(f"steps {count_label(steps[0])}–{count_label(steps[1])}")
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


def _evidence_block(flow: TextFlow, evidence: dict) -> None:
    """The evidence as a two-column table of its numbers, then a sentence per series."""
    rows, sentences = evidence_parts(evidence)
    flow.text("Evidence", size=8.5, weight="bold", gap=0.15)
    for key, value in rows:
        flow.text(flow.fit(key, 0.75, 2.85, 7.5), x=0.75, size=7.5, colour="#555555", gap=0)
        flow.paragraph(value, x=2.95, size=7.5, colour="#222222", max_lines=2)
    for sentence in sentences:
        flow.paragraph(sentence, x=0.75, size=7.5, colour="#333333", max_lines=2)
