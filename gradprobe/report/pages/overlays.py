"""The comparison's overlay pages: one panel per loss, logged metric, latent or watch with a
line per run (gradient balance, losses and logged metrics, representations, saturation,
batches), each run in its own style; the sections fill the pages one after the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..axes import all_positive, dashed_level, has_positive, headroom, plot_series, step_axis
from ..comparison import COMPARE_TITLES, Comparison, ordered_union
from ..data import decimate, finding_value
from ..diagnosis import DEFAULT_THRESHOLDS, severity_rank, unique, worst_severity
from ..frames import Frame
from ..style import PAGE_SIZE, REFERENCE_COLOUR, SEVERITY_COLOURS
from ..text import fit, width_pt

ROWS_PER_PAGE = 4
HEADING_RATIO = 0.12  # a section heading's band, against a row of panels
REFERENCE_STYLE = (0, (1, 1.5))  # dotted: a run's own healthy reference, in the run's colour


@dataclass
class Panel:
    """One overlay panel: a series per run, with each run's reference and the run's flags."""

    title: str
    ylabel: str
    quantities: tuple[str, ...]
    name: str | None
    lines: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    refs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    levels: list[tuple[float, str]] = field(default_factory=list)  # dashed grey lines
    log: bool = False
    strictly_positive_log: bool = False
    ylim: tuple[float | None, float | None] | None = None
    integer: bool = False


def _flag_note(cmp: Comparison, panel: Panel) -> tuple[str, str]:
    """'flagged in run, ...' for the runs with a finding on this panel, in the worst colour."""
    parts, worst = [], []
    for k in range(len(cmp.runs)):
        hits = cmp.flags(k, panel.quantities, panel.name)
        if hits:
            worst.append(worst_severity(hits))
            parts.append(cmp.labels[k])
    if not parts:
        return "", REFERENCE_COLOUR
    return ("flagged in " + ", ".join(parts),
            SEVERITY_COLOURS.get(min(worst, key=severity_rank), REFERENCE_COLOUR))


def _draw_panel(cmp: Comparison, fig: Figure, cell, panel: Panel) -> None:
    ax = fig.add_subplot(cell)
    values = []
    for k, (x, y) in sorted(panel.lines.items()):
        flagged = bool(cmp.flags(k, panel.quantities, panel.name))
        x, y = decimate(x, y)
        values.append(y)
        plot_series(ax, x, y, cmp.styles[k], emphasis=flagged)
    for k, (x, y) in sorted(panel.refs.items()):
        x, y = decimate(x, y)
        ax.plot(x, y, color=cmp.styles[k]["color"], linestyle=REFERENCE_STYLE, linewidth=1.0,
                alpha=0.9)
    if panel.log and has_positive(values) and (not panel.strictly_positive_log or
                                               all_positive(values)):
        ax.set_yscale("log", nonpositive="mask")
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    for value, label in panel.levels:
        dashed_level(ax, value, label)
    # a band above the data: no line runs along the top edge, the levels' labels fit
    headroom(ax, 12 if panel.levels else 6, include=[v for v, _ in panel.levels])
    if panel.integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    width_in = ax.get_position().width * PAGE_SIZE[0]
    note, colour = _flag_note(cmp, panel)
    missing = [cmp.labels[k] for k in range(len(cmp.runs)) if k not in panel.lines]
    title = panel.title + (f" (not in {', '.join(missing)})" if missing else "")
    if note:
        note = fit(note, 0.45 * width_in, 7)
        ax.set_title(note, loc="right", fontsize=7, color=colour, fontweight="bold")
        title_room = width_in - width_pt(note, 7, "bold") / 72 - 0.15
    else:
        title_room = width_in
    ax.set_title(fit(title, title_room, 9.5, "bold"))
    ax.set_ylabel(panel.ylabel)
    step_axis(ax, cmp.xlim)


def _finding_sentences(cmp: Comparison, panels: list[Panel]) -> list[str]:
    """What each run's findings say on a page, one sentence per finding id."""
    sentences = []
    for fid in cmp.finding_ids():
        parts, any_hit = [], False
        for k, label in enumerate(cmp.labels):
            hits = unique([f for p in panels for f in cmp.flags(k, p.quantities, p.name)
                           if finding_value(f, "id") == fid])
            if hits:
                any_hit = True
                severity = worst_severity(hits)
                worst = next(f for f in hits if finding_value(f, "severity") == severity)
                parts.append(f"{label} {severity.upper()}: {finding_value(worst, 'key_number')}")
            else:
                parts.append(f"{label} clear")
        if any_hit:
            sentences.append(f"{fid}: " + "; ".join(parts) + ".")
    return sentences


@dataclass
class Row:
    """One row of panels on an overlay page: its section (page key), how to read that section,
    and whether the section starts with this row."""

    key: str
    how_to_read: str
    panels: list[Panel]
    ncols: int
    first: bool


def overlay_rows(cmp: Comparison) -> list[Row]:
    """Every section's panels that some run recorded, cut into rows (two panels a row where
    a section has more than one), in the sections' order."""
    rows = []
    for key, build, how_to_read, ncols in OVERLAYS:
        panels = [p for p in build(cmp) if p.lines]
        ncols = 1 if len(panels) == 1 else (ncols or 2)
        for start in range(0, len(panels), ncols):
            rows.append(Row(key, how_to_read, panels[start:start + ncols], ncols, start == 0))
    return rows


def overlay_pages(cmp: Comparison) -> list[tuple[str, Figure]]:
    """The overlay sections filled into pages of ROWS_PER_PAGE rows, one section after the
    other (a small section shares its page with the next, a large one continues on the next
    page), so no page is left half empty but the last. A page is named and titled after the
    section at its top; a section starting lower down gets its own heading there."""
    rows = overlay_rows(cmp)
    out = []
    for start in range(0, len(rows), ROWS_PER_PAGE):
        out.append(_overlay_page(cmp, rows[start:start + ROWS_PER_PAGE]))
    return out


def _overlay_page(cmp: Comparison, rows: list[Row]) -> tuple[str, Figure]:
    top = rows[0]
    frame = Frame(COMPARE_TITLES[top.key] + ("" if top.first else " (continued)"), cmp.corner,
                  cmp.legend(), more="… (see the findings table on page 1)")
    sentences = _finding_sentences(cmp, [p for row in rows for p in row.panels])
    sentences += [row.how_to_read for row in rows if row.first or row is top]
    frame.header(sentences)
    # a heading band above each section that starts below the page's top
    ratios = [r for k, row in enumerate(rows) for r in ([HEADING_RATIO] if k and row.first
                                                        else []) + [1.0]]
    gs = frame.grid(len(ratios), 1, hspace=0.62, height_ratios=ratios)
    cell = 0
    for k, row in enumerate(rows):
        if k and row.first:
            band = frame.fig.add_subplot(gs[cell])
            band.axis("off")
            band.text(0.0, 0.0, COMPARE_TITLES[row.key], transform=band.transAxes,
                      fontsize=13, fontweight="bold", va="bottom", ha="left")
            cell += 1
        sub = gs[cell].subgridspec(1, 2 if row.ncols > 1 else 1, wspace=0.3)
        for col, panel in enumerate(row.panels):
            _draw_panel(cmp, frame.fig, sub[0, col], panel)
        cell += 1
    return top.key, frame.fig


def gradient_panels(cmp: Comparison) -> list[Panel]:
    ratios = []
    for d, run in zip(cmp.data, cmp.runs):
        norms = [n for n in run.losses if d.has("weighted_grad_norm", n)]
        ratios.append(d.ratio_to_largest("weighted_grad_norm", norms) if len(norms) > 1 else {})
    aux = ordered_union([[n for n in r if n != run.task] for r, run in zip(ratios, cmp.runs)])
    # a task loss is drawn too where some run's diagnosis found it swamped
    tasks = ordered_union([[run.task] for run in cmp.runs if run.task])
    flagged_tasks = [t for t in tasks if t not in aux and any(
        cmp.flags(k, ("weighted_grad_norm",), t) for k in range(len(cmp.runs)))]
    threshold = DEFAULT_THRESHOLDS.swamping_ratio
    panels = []
    for name in aux + flagged_tasks:
        panel = Panel(name + (" (the task loss)" if name in flagged_tasks else ""),
                      "‖w·g‖ / largest ‖w·g‖ (ratio)", ("weighted_grad_norm",), name, log=True,
                      levels=[(threshold, f"swamping threshold {threshold:g}")])
        for k, r in enumerate(ratios):
            if name in r and (cmp.runs[k].task != name or name in flagged_tasks):
                panel.lines[k] = r[name]
        panels.append(panel)
    return panels


def loss_panels(cmp: Comparison) -> list[Panel]:
    names = ordered_union([[n for n in run.losses if d.has("loss", n)] + d.names("loss")
                           for run, d in zip(cmp.runs, cmp.data)])
    panels = []
    for name in names:
        panel = Panel(name, "loss / its first value (ratio)", ("loss",), name, log=True,
                      strictly_positive_log=True)
        for k, d in enumerate(cmp.data):
            if d.has("loss", name):
                rel = d.relative_to_first("loss", name)
                if rel is not None:
                    panel.lines[k] = rel
        panels.append(panel)
    # what the runs logged with probe.log (validation losses, accuracies), as logged
    for name in ordered_union([d.names("logged") for d in cmp.data]):
        panel = Panel(name, "logged value", ("logged",), name)
        for k, d in enumerate(cmp.data):
            if d.has("logged", name):
                panel.lines[k] = d.series("logged", name)
        panels.append(panel)
    return panels


def representation_panels(cmp: Comparison) -> list[Panel]:
    latents = ordered_union([sorted(set(d.names("effective_rank")) |
                                    set(d.names("normalized_std"))) for d in cmp.data])
    panels = []
    for name in latents:
        rank = Panel(f"{name}: effective rank", "effective rank (dimensions)",
                     ("effective_rank",), name, ylim=(0, None))
        std = Panel(f"{name}: normalised std", "std of ℓ2-normalised rows",
                    ("normalized_std",), name, ylim=(0, None))
        for k, d in enumerate(cmp.data):
            if d.has("effective_rank", name):
                rank.lines[k] = d.series("effective_rank", name)
                if d.has("effective_rank_isotropic", name):
                    rank.refs[k] = d.series("effective_rank_isotropic", name)
            if d.has("normalized_std", name):
                std.lines[k] = d.series("normalized_std", name)
                if d.has("latent_dim", name):
                    s, dim = d.series("latent_dim", name)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        std.refs[k] = (s, 1 / np.sqrt(dim))
        # side by side per latent, even when one of the two is missing everywhere
        panels += [rank, std]
    return panels


def saturation_panels(cmp: Comparison) -> list[Panel]:
    watches = ordered_union([d.names("saturated_fraction") for d in cmp.data])
    threshold = DEFAULT_THRESHOLDS.saturation_fraction
    panels = []
    for name in watches:
        panel = Panel(name, "saturated share of inputs (|x| > threshold)",
                      ("saturated_fraction",), name, ylim=(-0.02, 1.02),
                      levels=[(threshold, f"saturation threshold {threshold:g}")])
        for k, d in enumerate(cmp.data):
            if d.has("saturated_fraction", name):
                panel.lines[k] = d.series("saturated_fraction", name)
        panels.append(panel)
    return panels


def batch_panels(cmp: Comparison) -> list[Panel]:
    groups = Panel("Groups per batch (dotted: each run's declared)",
                   "distinct groups per batch (count)", ("groups_per_batch",), "batch",
                   ylim=(0, None), integer=True)
    share = Panel("Same-group pairs in a batch", "share of sample pairs",
                  ("same_group_pair_share",), "batch", ylim=(-0.02, 1.02))
    for k, (d, run) in enumerate(zip(cmp.data, cmp.runs)):
        if d.has("groups_per_batch", "batch"):
            s, v = d.series("groups_per_batch", "batch")
            groups.lines[k] = (s, v)
            expect = run.meta.get("expect_groups_per_batch")
            if expect is not None and len(s):
                groups.refs[k] = (np.array([s[0], s[-1]]), np.array([expect, expect], float))
        if d.has("same_group_pair_share", "batch"):
            share.lines[k] = d.series("same_group_pair_share", "batch")
    panels = [groups, share]
    for name in ordered_union([d.names("contrastive_same_group_share") for d in cmp.data]):
        panel = Panel(f"{name}: negatives from the anchor's group", "share of negatives",
                      ("contrastive_same_group_share",), name, ylim=(-0.02, 1.02))
        for k, d in enumerate(cmp.data):
            if d.has("contrastive_same_group_share", name):
                panel.lines[k] = d.series("contrastive_same_group_share", name)
        panels.append(panel)
    return panels


# The overlay pages in page order: (page key, its panels, how to read it, columns or None).
OVERLAYS = [
    ("gradients", gradient_panels,
     "How to read: each auxiliary loss's weighted gradient norm over the largest loss's, one "
     "line per run; below the dashed swamping threshold the loss barely moves the shared "
     "parameters. A fix worked when its run's line rises above the threshold. Thick lines: "
     "the run has a finding on that panel.", None),
    ("losses", loss_panels,
     "How to read: each loss over its first recorded value, one line per run; a constraint "
     "loss that stays near 1× while the task falls is neglected; then what the runs logged "
     "(validation losses, accuracies) as logged. Thick lines: the run has a finding on that "
     "panel.", None),
    ("representations", representation_panels,
     "How to read: per latent, effective rank and normalised std, one line per run; dotted in "
     "the run's colour: its isotropic reference (rank) and 1/√dim (std). A collapsed latent "
     "falls far below its reference.", 2),
    ("saturation", saturation_panels,
     "How to read: the share of sigmoid inputs in the flat region, one line per run; above "
     "the dashed threshold the sigmoid passes almost no gradient.", None),
    ("batches", batch_panels,
     "How to read: the batches should hold what the sampler declares (dotted, in the run's "
     "colour); a high share of same-group pairs or negatives leaves the contrastive loss "
     "little to learn from.", None),
]
