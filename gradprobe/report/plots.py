"""The failure report's figures: one A4 page each, conclusions first, then the evidence.

:func:`report_figures` returns every page as ``(name, Figure)``; the PDF writer
(:mod:`gradprobe.report.pdf`) and the docs images (``scripts/report_images.py``) both use it, so
the PNGs in the docs are exactly the pages of the PDF. Each page family is one module of
:mod:`gradprobe.report.pages`; pages whose quantities were not recorded are left out.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot, no global figure state).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from matplotlib.figure import Figure

from gradprobe.record import Run

from .context import PAGE_TITLES, ReportContext
from .frames import number_pages
from .pages.batches import batch_pages
from .pages.further import further_evidence_pages
from .pages.gradients import gradient_pages
from .pages.losses import loss_pages
from .pages.prototypes import prototype_pages
from .pages.representations import representation_pages
from .pages.saturation import saturation_pages
from .pages.verdict import verdict_pages
from .style import report_style

__all__ = ["PAGE_TITLES", "report_figures", "report_pages", "save_figure"]

# The plot pages in page order; "Further evidence" follows them (it draws what they did not).
PLOT_PAGES: list[tuple[str, Callable[[ReportContext], list[Figure]]]] = [
    ("gradients", gradient_pages),
    ("losses", loss_pages),
    ("representations", representation_pages),
    ("prototypes", prototype_pages),
    ("saturation", saturation_pages),
    ("batches", batch_pages),
]


def report_pages(run: Run, findings: Iterable[Any], title: str | None = None
                 ) -> list[tuple[str, Figure]]:
    """The pages of :func:`report_figures`, built under whatever style is active."""
    ctx = ReportContext(run, findings, title)
    # the plot pages are built first: they record the page each finding is marked on, which
    # the text pages (printed first) cite
    plots = [(key, fig) for key, build in PLOT_PAGES for fig in build(ctx)]
    plots += [("evidence", fig) for fig in further_evidence_pages(ctx)]
    verdict, details = verdict_pages(ctx, ctx.marked)
    text = [("verdict", fig) for fig in verdict] + [("findings", fig) for fig in details]
    return number_pages(text + plots, run.name)


def report_figures(run: Run, findings: Iterable[Any], *, title: str | None = None
                   ) -> list[tuple[str, Figure]]:
    """Every page of the report as ``(name, Figure)``, in page order.

    Names: ``verdict``, ``findings`` (when there are findings), ``gradients``, ``losses``,
    ``representations``, ``prototypes``, ``saturation``, ``batches``, ``evidence`` (findings
    whose quantity no other page draws); a page that runs over gets ``-2``, ``-3``... Pages whose
    quantities were not recorded are left out. The figures are laid out under the report's
    style; save them with :func:`save_figure` (or inside :func:`report_style`) to keep it.
    """
    with report_style():
        return report_pages(run, findings, title)


def save_figure(fig: Figure, path, **kw) -> None:
    """Save one report figure (PNG, SVG, PDF...) under the report's style."""
    with report_style():
        fig.savefig(path, **kw)
