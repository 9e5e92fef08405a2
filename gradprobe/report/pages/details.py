"""The failure report's "Findings in detail" pages: one block per finding with its facts, why
it matters, the remedy and its evidence in words."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..context import PAGE_TITLES, ReportContext
from ..data import finding_value
from ..evidence import evidence_parts
from ..frames import TextFlow
from ..style import PAGE_SIZE, SEVERITY_COLOURS
from ..text import count_label, wrap


# Below this much room (inches) left on the verdict's last page, the details start a page
CONTINUE_ROOM = 1.5


def detail_pages(ctx: ReportContext, pages_of: dict[int, str], after: TextFlow
                 ) -> tuple[int, list[Figure]]:
    """The details, on the rest of ``after``'s last page when there is room (the verdict's:
    no page is left half empty), and the pages after it; ``pages_of`` maps ``id(finding)`` to
    its plot's page. Returns the number of the page where they start (counted in ``after``'s
    pages) and the new pages; nothing without findings."""
    if not ctx.findings:
        return len(after.figs) + 1, []
    if after.y + CONTINUE_ROOM <= PAGE_SIZE[1] - after.MARGIN_BOTTOM:
        flow, start = after, len(after.figs)
        flow.space(0.2)
        flow.text(PAGE_TITLES["findings"], size=15, weight="bold", gap=0.42)
        flow.title = PAGE_TITLES["findings"]  # the heading of a page it runs over to
    else:
        flow, start = TextFlow(ctx.run.name, PAGE_TITLES["findings"]), len(after.figs) + 1
    new_from = len(after.figs) if flow is after else 0
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
    return start, flow.figs[new_from:]


def _evidence_block(flow: TextFlow, evidence: dict) -> None:
    """The evidence as a two-column table of its numbers, then a sentence per series."""
    rows, sentences = evidence_parts(evidence)
    flow.text("Evidence", size=8.5, weight="bold", gap=0.15)
    for key, value in rows:
        # the key on the page of its value's lines
        flow.need(min(len(wrap(value, PAGE_SIZE[0] - flow.X0 - 2.95, 7.5)), 2) * 7.5 * 1.45 / 72)
        flow.text(flow.fit(key, 0.75, 2.85, 7.5), x=0.75, size=7.5, colour="#555555", gap=0)
        flow.paragraph(value, x=2.95, size=7.5, colour="#222222", max_lines=2)
    for sentence in sentences:
        flow.paragraph(sentence, x=0.75, size=7.5, colour="#333333", max_lines=2)
