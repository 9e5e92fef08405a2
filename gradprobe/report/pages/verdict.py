"""The failure report's first page, "Verdict": the verdict in one line, the run's facts, each
loss with its role and weight, and the table of findings (errors first)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gradprobe._version import __version__
from gradprobe.diagnose import is_fixed_weight

from ..context import PAGE_TITLES, ReportContext
from ..data import finding_value
from ..diagnosis import DEFAULT_THRESHOLDS, severity_counts
from ..frames import TextFlow
from ..roles import roles_table
from ..style import PAGE_SIZE, SEVERITY_COLOURS
from ..text import count_label, width_pt, wrap

CLEAR_COLOUR = "#1e8449"  # no failure mode: green
FACT_X = 2.0  # where the run's facts start, in inches


def verdict_pages(ctx: ReportContext, pages_of: dict[int, str]) -> list[Figure]:
    """The verdict page(s); ``pages_of`` maps ``id(finding)`` to the page its plot is on."""
    flow = TextFlow(ctx.run.name, PAGE_TITLES["verdict"], title_first=False)
    _headline(ctx, flow)
    _run_facts(ctx, flow)
    _losses_table(ctx, flow)
    flow.heading("Findings" if ctx.findings else "Findings: none")
    if not ctx.findings:
        flow.paragraph("No failure modes found. The pages that follow show the recorded evidence "
                       "(gradient balance, losses and every watched quantity) for reference.")
    else:
        _findings_table(ctx, flow, pages_of)
    roles_table(flow, ctx.run.summary())  # after the findings: the first page leads with them
    return flow.figs


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
    flow.need(0.75)
    top = flow.y
    flow.fig.patches.append(Rectangle((flow.fx(flow.X0 - 0.1), flow.fy(top + 0.62)),
                                      flow.fx(PAGE_SIZE[0] - 2 * flow.X0 + 0.2), 0.62 / PAGE_SIZE[1],
                                      transform=flow.fig.transFigure, facecolor=colour,
                                      alpha=0.1, edgecolor=colour, linewidth=1.2))
    flow.space(0.08)
    flow.text(headline, size=14, weight="bold", colour=colour, gap=0.28)
    flow.text(flow.fit(detail, flow.X0, 7.62, 9), size=9)
    flow.y = top + 0.8


def _run_facts(ctx: ReportContext, flow: TextFlow) -> None:
    run, meta = ctx.run, ctx.run.meta
    lo, hi = ctx.data.step_range()
    n_probe = len(run.probe_steps())
    every = run.every
    flow.heading("The run")
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
    for key, value in rows:
        flow.text(key, size=8.5, weight="bold", gap=0)
        flow.paragraph(value, x=FACT_X)
    shared = meta.get("shared_parameters") or []
    numel = meta.get("shared_numel")
    shared_text = f"{len(shared)} tensor{'s' if len(shared) != 1 else ''}" + \
        (f", {numel:,} values" if isinstance(numel, int) else "") + \
        (": " + ", ".join(shared) if shared else "")
    flow.text("shared parameters", size=8.5, weight="bold", gap=0)
    lines = wrap(shared_text, PAGE_SIZE[0] - 2 * flow.X0 - 1.45, 8.5)
    for line in lines[:3]:
        flow.text(line, x=FACT_X)
    if len(lines) > 3:
        flow.text(f"… ({len(shared)} tensors in all)", x=FACT_X, colour="#555555")
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


def _findings_table(ctx: ReportContext, flow: TextFlow, pages_of: dict[int, str]) -> None:
    flow.text("severity", x=0.55, weight="bold", size=7.5, gap=0)
    flow.text("id", x=1.35, weight="bold", size=7.5, gap=0)
    flow.text("title / remedy", x=3.25, weight="bold", size=7.5, gap=0)
    flow.text("key number", x=flow.X1, weight="bold", size=7.5, ha="right")
    flow.space(0.04)
    for f in ctx.findings:
        flow.need(0.5)
        flow.badge(0.55, finding_value(f, "severity"))
        flow.text(flow.fit(finding_value(f, "id"), 1.35, 3.2, 7.5, "bold", "monospace"), x=1.35,
                  family="monospace", weight="bold", size=7.5, gap=0)
        key = flow.fit(finding_value(f, "key_number") or "", 0, 1.9, 8)
        flow.text(flow.fit(finding_value(f, "title"), 3.25, flow.X1 - width_pt(key, 8) / 72 - 0.15,
                           8, "bold"), x=3.25, weight="bold", size=8, gap=0)
        flow.text(key, x=flow.X1, size=8, ha="right")
        where = pages_of.get(id(f))
        remedy = "→ " + " ".join(str(finding_value(f, "remedy") or "").split())
        subject = finding_value(f, "subject")
        flow.text(flow.fit(f"{subject}" + (f" · see {where}" if where else ""), 1.35, 3.15, 7),
                  x=1.35, size=7, colour="#555555", gap=0)
        flow.text(flow.fit(remedy, 3.25, flow.X1, 7.5), x=3.25, size=7.5, colour="#333333")
        flow.rule(0.55, flow.X1, drop=0.05)
        flow.space(0.1)
