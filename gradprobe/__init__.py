"""gradprobe: the flight recorder and failure analyst for multi-loss PyTorch models.

Attach a :class:`Probe` to a training loop, read the run back with :func:`load_run`, find
its failure modes with ``diagnose(run)`` and write the PDF report with :func:`write_report`
(or run ``gradprobe analyze RUN``)::

    from gradprobe import Probe, diagnose, load_run, write_report
    run = load_run("run.gprobe")
    findings = diagnose(run)
    write_report(run, "report.pdf", findings)

The names are imported on first use (PEP 562): ``import gradprobe`` alone imports no stage,
so reading a run file (``load_run``, ``diagnose``, the report, ``gradprobe analyze``) never
imports torch, and training with a probe never imports matplotlib or seaborn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from gradprobe._lazy import lazy_names
from gradprobe._version import __version__
from gradprobe._warnings import GradprobeWarning

if TYPE_CHECKING:
    from gradprobe.diagnose import Finding
    from gradprobe.record import Run

# ``diagnose`` is the package gradprobe.diagnose itself (callable as diagnose(run)): a stage,
# imported when read like the others.
_names, __getattr__, __dir__ = lazy_names(__name__, {
    "gradprobe.diagnose": ("Finding", "Thresholds"),
    "gradprobe.probe": ("Probe", "ProbeUsageError"),
    "gradprobe.record": ("Run", "RunFileError", "load_run"),
}, submodules=True)
__all__ = sorted([*_names, "GradprobeWarning", "__version__", "diagnose", "write_report"])


def write_report(run: Run, path: str | os.PathLike, findings: Iterable[Finding] | None = None,
                 *, title: str | None = None) -> Path:
    """Write the PDF failure report of ``run`` to ``path`` and return the path written.

    ``findings``: those of ``diagnose(run)`` (computed here at the default thresholds when not
    given). The report stage (matplotlib, seaborn) is imported on this first call only.
    """
    from gradprobe.diagnose import diagnose
    from gradprobe.report import write_pdf

    return write_pdf(run, diagnose(run) if findings is None else list(findings), path,
                     title=title)
