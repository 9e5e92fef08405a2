"""The comparison report: several runs' findings side by side and their key series overlaid.

``write_comparison_pdf(runs, findings_per_run, path)`` (``gradprobe compare A B -o compare.pdf``
and the demo's before/after) answers "did the fix work?": page 1 says what each run after the
first cleared (green), kept and added, and tabulates finding ids by run (severity colours, each
finding's key number as ``analyze`` prints it, ``-`` where the run is clear) with the runs'
facts; the pages after it overlay the runs, one colour and line style per run on every page,
for what decides most fixes: each auxiliary loss's weighted-gradient ratio to the largest, each
loss relative to its start and every metric logged with ``probe.log``, effective rank and
normalised std per latent, saturated share per sigmoid watch, and the batch composition. A
panel draws every run that recorded its series; sections no run recorded are left out, and
the others fill the pages one after the other.

It is drawn with the same toolkit as the single-run report (page frame, text flow, step axis,
legend swatch, severity badge, page numbering, the atomic PDF write), so the two documents
look alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib.figure import Figure

from gradprobe.record import Run

from .comparison import COMPARE_TITLES, Comparison, run_labels
from .frames import number_pages
from .pages.overlays import overlay_pages
from .pages.overview import overview_pages
from .pdf import write_pages
from .style import report_style

__all__ = ["COMPARE_TITLES", "comparison_figures", "comparison_pages", "run_labels",
           "write_comparison_pdf"]


def comparison_pages(cmp: Comparison) -> list[tuple[str, Figure]]:
    """The pages of :func:`comparison_figures`, built under whatever style is active."""
    pages = [("overview", fig) for fig in overview_pages(cmp)] + overlay_pages(cmp)
    return number_pages(pages, "comparison: " + " vs ".join(cmp.labels))


def comparison_figures(runs: Sequence[Run], findings_per_run: Sequence[Iterable[Any]], *,
                       title: str | None = None) -> list[tuple[str, Figure]]:
    """Every page of the comparison as ``(name, Figure)``, in page order.

    Names: ``overview`` (findings by run and the runs' facts), then ``gradients``,
    ``losses``, ``representations``, ``saturation``, ``batches`` where any run recorded them;
    a page that runs over gets ``-2``, ``-3``...
    """
    with report_style():
        return comparison_pages(Comparison(runs, findings_per_run, title))


def write_comparison_pdf(runs: Sequence[Run], findings_per_run: Sequence[Iterable[Any]],
                         path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the comparison of ``runs`` (each with its findings, in the same order) to ``path``.

    Page 1 tabulates finding id × run (severity, ``-`` where clear) with the runs' facts; the
    pages after it overlay the runs' key series. Same metadata (title, subject, creator,
    creation date) and the same atomic write as :func:`gradprobe.report.write_pdf`. Returns the
    path written.
    """
    cmp = Comparison(runs, findings_per_run, title)
    return write_pages(lambda: comparison_pages(cmp), path, title=cmp.title,
                       subject=", ".join(cmp.labels))
