"""The failure report's first page, "Verdict": the verdict in one line, the run's facts, each
loss with its role and weight, and the table of findings (errors first)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from gradprobe._version import __version__
from gradprobe.diagnose import is_fixed_weight

from ..context import PAGE_TITLES, ReportContext
from ..data import finding_value
from ..diagnosis import DEFAULT_THRESHOLDS, severity_counts
from ..frames import TextFlow
from .details import detail_pages
from ..roles import roles_table
from ..style import CLEAR_COLOUR, PAGE_SIZE, SEVERITY_COLOURS
from ..text import count_label, wrap

FACT_X = 2.0  # where the run's facts start, in inches
FACT_LINE = 8.5 * 1.45 / 72


def verdict_pages(ctx: ReportContext, pages_of: dict[int, str]
                  ) -> tuple[list[Figure], list[Figure]]:
    """The verdict page(s), then the "Findings in detail" pages (which begin on the verdict's
    last page when it has room); ``pages_of`` maps ``id(finding)`` to the page its plot is on.

    The findings come right after the headline so that page 1 holds every error and warning
    title in full; the run's facts and the losses follow them."""
    flow = TextFlow(ctx.run.name, PAGE_TITLES["verdict"], title_first=False)
    _headline(ctx, flow)
    flow.heading("Findings" if ctx.findings else "Findings: none")
    pointer = []
    if not ctx.findings:
        flow.paragraph("No failure modes found. The pages that follow show the recorded evidence "
                       "(gradient balance, losses and every watched quantity) for reference.")
    else:
        pointer = _findings_table(ctx, flow, pages_of)
    _run_facts(ctx, flow)
    _losses_table(ctx, flow)
    roles_table(flow, ctx.run.summary())
    verdict = list(flow.figs)
    start, details = detail_pages(ctx, pages_of, flow)
    for text, template in pointer:  # the page the details start on is known only now
        text.set_text(template.replace("{page}", f"{start}" + (" (below)" if start == 1 else "")))
    return verdict, details


def _headline(ctx: ReportContext, flow: TextFlow) -> None:
    run, meta, findings = ctx.run, ctx.run.meta, ctx.findings
    flow.document_title(ctx.title)
    flow.text(flow.fit(f"run {run.name} · {run.source}", flow.X0, flow.X1, 8), size=8,
              colour="#555555")
    flow.text(f"recorded {meta.get('created', '')} with gradprobe "
              f"{meta.get('gradprobe_version', '?')} and torch {meta.get('torch_version', '?')}; "
              f"report by gradprobe {__version__}", size=8, colour="#555555")
    flow.space(0.12)
    if not findings:
        headline, colour = "No failure modes found.", CLEAR_COLOUR
        detail = "None of the diagnosis rules held on this run."
    else:
        colour = SEVERITY_COLOURS.get(finding_value(findings[0], "severity"), "black")
        harm = sum(finding_value(f, "severity") in ("error", "warning") for f in findings)
        counts = severity_counts(findings)
        headline = (f"{harm} failure mode{'s' if harm != 1 else ''} found: {counts}." if harm
                    else f"No failure modes found; {counts}.")
        first = findings[0]
        detail = f"Start with {finding_value(first, 'id')}: {finding_value(first, 'title')}"
    lines = wrap(detail, flow.X1 - flow.X0, 9)
    box = 0.5 + len(lines) * LINE_9PT
    flow.need(box + 0.18)
    top = flow.y
    flow.fig.patches.append(Rectangle((flow.fx(flow.X0 - 0.1), flow.fy(top + box)),
                                      flow.fx(PAGE_SIZE[0] - 2 * flow.X0 + 0.2), box / PAGE_SIZE[1],
                                      transform=flow.fig.transFigure, facecolor=colour,
                                      alpha=0.1, edgecolor=colour, linewidth=1.2))
    flow.space(0.08)
    flow.text(headline, size=14, weight="bold", colour=colour, gap=0.28)
    for line in lines:
        flow.text(line, size=9, gap=LINE_9PT)
    flow.y = top + box + 0.18


def _fact_rows(ctx: ReportContext) -> list[tuple[str, list[str]]]:
    """The run's facts as (label, lines wrapped to the value column)."""
    run, meta = ctx.run, ctx.run.meta
    lo, hi = ctx.data.step_range()
    n_probe = len(run.probe_steps())
    every = run.every
    rows = [
        ("steps", f"{count_label(lo)} to {count_label(hi)}" if lo is not None
         else "nothing recorded"),
        ("probe cadence", (meta.get("cadence") or
                           (f"every {every} step{'s' if every != 1 else ''}" if every else "—")) +
         f", {n_probe:,} probe step{'s' if n_probe != 1 else ''} recorded"),
        ("task loss", str(run.task or "—")),
    ]
    watched = [f"{label}: {', '.join(meta[key])}"
               for label, key in (("latents", "latents"), ("prototypes", "prototypes"),
                                  ("saturation", "saturations"), ("contrastive", "contrastive"))
               if meta.get(key)]
    rows.append(("watched", "; ".join(watched) or "nothing beyond the losses"))
    expect = meta.get("expect_groups_per_batch")
    rows.append(("declared batches", f"{expect} group{'s' if expect != 1 else ''} per batch"
                 if expect is not None else "not declared"))
    width = PAGE_SIZE[0] - TextFlow.X0 - FACT_X
    out = [(key, wrap(value, width, 8.5)) for key, value in rows]
    shared = meta.get("shared_parameters") or []
    numel = meta.get("shared_numel")
    shared_text = f"{len(shared)} tensor{'s' if len(shared) != 1 else ''}" + \
        (f", {numel:,} values" if isinstance(numel, int) else "") + \
        (": " + ", ".join(shared) if shared else "")
    lines = wrap(shared_text, width, 8.5)
    if len(lines) > 3:  # the count is stated; the full list is in the run file and the JSON
        lines = lines[:3] + [f"… ({len(shared)} tensors in all)"]
    out.append(("shared parameters", lines))
    return out


def _run_facts(ctx: ReportContext, flow: TextFlow) -> None:
    flow.heading("The run")
    for key, lines in _fact_rows(ctx):
        flow.need(len(lines) * FACT_LINE)
        flow.text(key, size=8.5, weight="bold", gap=0)
        for line in lines:
            flow.text(line, x=FACT_X, gap=FACT_LINE,
                      colour="#555555" if line.startswith("… (") else "black")
    flow.space(0.1)


def weights_summary(ctx: ReportContext, name: str) -> str:
    """A loss's weight over the run: ``1 (fixed)`` (fixed as the static-loss-weights rule
    defines it) or ``first → last (range min–max)``."""
    if not ctx.data.has("weight", name):
        return "—"
    _, w = ctx.data.series("weight", name)
    w = w[np.isfinite(w)]
    if not len(w):
        return "—"
    if is_fixed_weight(w, DEFAULT_THRESHOLDS.static_weight_tolerance):
        return f"{w[0]:.3g} (fixed)"
    return f"{w[0]:.3g} → {w[-1]:.3g} (range {w.min():.3g}–{w.max():.3g})"


def _losses_table(ctx: ReportContext, flow: TextFlow) -> None:
    run = ctx.run
    flow.heading("Losses and weights")
    guessed = set(run.meta.get("roles_guessed") or [])
    flow.text("loss", x=0.8, weight="bold", gap=0)
    flow.text("role", x=2.6, weight="bold", gap=0)
    flow.text("weight (first → last)", x=4.2, weight="bold")
    for name in run.losses:
        flow.need(0.18)
        flow.swatch(0.5, 0.72, ctx.palette.loss(name))
        flow.text(flow.fit(name, 0.8, 2.5), x=0.8, gap=0)
        role = run.roles.get(name, "—") + (" (guessed)" if name in guessed and name != run.task
                                           else "")
        flow.text(flow.fit(role, 2.6, 4.1), x=2.6, gap=0)
        flow.text(flow.fit(weights_summary(ctx, name), 4.2, flow.X1), x=4.2)
    flow.space(0.12)


# The findings table's columns (inches): badge, id with subject / key number / plot page,
# then the title, wrapped; the remedy below them, across both.
BADGE_X, ID_X, TITLE_X = 0.55, 1.35, 3.25
ID_WIDTH = TITLE_X - ID_X - 0.12
LINE_9PT, TITLE_LINE, REMEDY_LINE, SIDE_LINE = 9 * 1.45 / 72, 8 * 1.4 / 72, 7.5 * 1.4 / 72, \
    7 * 1.4 / 72
ID_LINE, ROW_GAP, HEADER = 0.17, 0.11, 0.2
HARM = ("error", "warning")


def _row_lines(f, pages_of: dict[int, str], remedy: str | None
               ) -> tuple[list[str], list[str], list[str]]:
    """A finding's row: its title lines, ``remedy``'s lines (none for None) and the lines
    beside them (subject and key number, plot page), each wrapped to its column."""
    title = wrap(finding_value(f, "title"), TextFlow.X1 - TITLE_X, 8, "bold")
    remedy_lines = wrap("→ " + remedy, TextFlow.X1 - ID_X, 7.5) if remedy is not None else []
    where = pages_of.get(id(f))
    key = finding_value(f, "key_number")
    side = wrap(f"{finding_value(f, 'subject')}" + (f" · {key}" if key else ""), ID_WIDTH, 7)
    side += wrap(f"see {where}", ID_WIDTH, 7) if where else []
    return title, remedy_lines, side


def _remedies(findings: list, with_remedy: set[int]) -> list[str | None]:
    """Each finding's remedy on one line of words, None where it is left out, and "as above"
    where the row before says the same."""
    out, before = [], None
    for f in findings:
        remedy = " ".join(str(finding_value(f, "remedy") or "").split()) \
            if id(f) in with_remedy else None
        out.append("as above" if remedy is not None and remedy == before else remedy)
        before = remedy
    return out


def _facts_height(ctx: ReportContext) -> float:
    """The height of "The run" and "Losses and weights" (inches), as they draw them."""
    lines = sum(len(lines) for _, lines in _fact_rows(ctx))
    return 2 * 0.26 + 0.1 + lines * FACT_LINE + (1 + len(ctx.run.losses)) * FACT_LINE + 0.12


def _row_height(rows: tuple[list[str], list[str], list[str]]) -> float:
    title, remedy, side = rows
    return max(len(title) * TITLE_LINE, ID_LINE + len(side) * SIDE_LINE) + \
        len(remedy) * REMEDY_LINE + ROW_GAP


def _findings_table(ctx: ReportContext, flow: TextFlow, pages_of: dict[int, str]
                    ) -> list[tuple[Text, str]]:
    """Every finding as a row, wrapped, never cut: the most detail that fits on this page
    (every remedy; the errors' and warnings'; the errors'; titles only), notes left to the
    detail pages when even that does not fit. Returns the closing sentence's lines, each
    with its template (``{page}``: the first detail page), to fill in once the verdict's
    pages are counted."""
    harm = [f for f in ctx.findings if finding_value(f, "severity") in HARM]
    room = PAGE_SIZE[1] - flow.MARGIN_BOTTOM - flow.y - 0.3 - 3 * SIDE_LINE
    errors = [f for f in harm if finding_value(f, "severity") == "error"]
    layouts = [(ctx.findings, ctx.findings), (ctx.findings, harm), (ctx.findings, errors),
               (ctx.findings, []), (harm, [])]
    # the most detail that shows every title and leaves the run's facts and losses on this
    # page too; else every title, the facts moving on; else the errors' and warnings' titles
    facts = _facts_height(ctx)
    candidates = [(layout, facts) for layout in layouts[:-1]] + \
        [(layout, 0.0) for layout in layouts[:-1]] + [(layouts[-1], facts), (layouts[-1], 0.0)]
    for (shown, remedies), beside in candidates:
        remedies = set(map(id, remedies))
        rows = [_row_lines(f, pages_of, remedy)
                for f, remedy in zip(shown, _remedies(shown, remedies))]
        if HEADER + sum(map(_row_height, rows)) <= room - beside:
            break
    flow.text("severity", x=BADGE_X, weight="bold", size=7.5, gap=0)
    flow.text("id · subject · key number", x=ID_X, weight="bold", size=7.5, gap=0)
    flow.text("title" + (" (→ remedy below)" if remedies else ""), x=TITLE_X, weight="bold",
              size=7.5)
    flow.space(HEADER - 7.5 * 1.45 / 72)
    for f, (title, remedy, side) in zip(shown, rows):
        flow.need(_row_height((title, remedy, side)))
        top = flow.y
        # the title first: a PDF reader's text extraction keeps its wrapped lines together
        for line in title:
            flow.text(line, x=TITLE_X, weight="bold", size=8, gap=TITLE_LINE)
        bottom = flow.y
        flow.y = top
        flow.badge(BADGE_X, finding_value(f, "severity"))
        flow.text(flow.fit(finding_value(f, "id"), ID_X, TITLE_X - 0.1, 7.5, "bold", "monospace"),
                  x=ID_X, family="monospace", weight="bold", size=7.5, gap=ID_LINE)
        for line in side:
            flow.text(line, x=ID_X, size=7, colour="#555555", gap=SIDE_LINE)
        flow.y = max(bottom, flow.y)
        for line in remedy:  # under the id and the title: the remedy gets the table's width
            flow.text(line, x=ID_X, size=7.5, colour="#333333", gap=REMEDY_LINE)
        flow.rule(BADGE_X, flow.X1, drop=0.03)
        flow.space(ROW_GAP)
    left_out = [f for f in ctx.findings if id(f) not in {id(g) for g in shown}]
    missing = []
    if left_out:
        missing.append(f"{len(left_out)} more finding{'s' if len(left_out) != 1 else ''} "
                       f"({severity_counts(left_out)}: "
                       + ", ".join(sorted({finding_value(f, 'id') for f in left_out})) + ")")
    if len(remedies) < len(ctx.findings):
        missing.append("the remedies" if not remedies else "the other remedies")
    sentence = ("Also on the 'Findings in detail' pages, from page {page}: " + " and ".join(missing)
                + "; there too each finding's why and evidence." if missing else
                "Each finding's why and evidence: the 'Findings in detail' pages, from page "
                "{page}; its plot: the page named beside it.")
    # wrapped with "{page}" (wider than any page number) in it: each line is filled in later
    lines = wrap(sentence, flow.X1 - BADGE_X, 7.5)
    flow.need(len(lines) * SIDE_LINE + 0.1)
    texts = []
    for line in lines:
        texts.append((flow.fig.text(flow.fx(BADGE_X), flow.fy(flow.y), line, fontsize=7.5,
                                    color="#333333", va="top"), line))
        flow.space(7.5 * 1.45 / 72)
    flow.space(0.15)
    return texts
