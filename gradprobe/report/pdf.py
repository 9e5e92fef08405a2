"""The PDF report: the verdict first, then one page of evidence per recorded topic.

``write_pdf(run, findings, path)`` renders the pages of :func:`gradprobe.report.plots.report_figures`
into one vector PDF (matplotlib's PdfPages) with its metadata set: title, subject (the run's
name), creator ``gradprobe <version>`` and creation date.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from gradprobe._version import __version__
from gradprobe.record import Run

from .plots import report_figures, report_pages
from .style import report_style

__all__ = ["write_pdf", "write_pages", "report_figures"]


def write_pdf(run: Run, findings: Iterable[Any], path: str | os.PathLike, *,
              title: str | None = None) -> Path:
    """Write the report of ``run`` and its ``findings`` (from ``gradprobe.diagnose``) to ``path``.

    Returns the path written. Pages for quantities that were not recorded are left out; with
    no findings the verdict page says plainly that no failure modes were found.
    """
    doc_title = title or f"gradprobe report: {run.name}"
    return write_pages(lambda: report_pages(run, findings, title), path, title=doc_title,
                       subject=run.name)


def write_pages(build: Callable[[], list[tuple[str, Figure]]], path: str | os.PathLike, *,
                title: str, subject: str) -> Path:
    """Render the pages ``build()`` returns into one PDF at ``path``, atomically.

    The metadata every gradprobe PDF carries: title, subject, creator ``gradprobe <version>``
    and creation date. The pages are written to ``<path>.partial`` and moved into place only
    when complete, so an interrupted write never leaves a truncated report behind.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the report: {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "Title": title,
        "Subject": subject,
        "Creator": f"gradprobe {__version__}",
        "Keywords": "gradprobe, multi-loss, gradient diagnosis",
        "CreationDate": datetime.datetime.now(datetime.timezone.utc),
    }
    tmp = path.with_name(path.name + ".partial")
    with report_style():
        pages = build()
        try:
            with PdfPages(tmp, metadata=metadata) as pdf:
                for _name, fig in pages:
                    pdf.savefig(fig)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
    return path
