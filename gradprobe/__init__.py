"""gradprobe: the flight recorder and failure analyst for multi-loss PyTorch models.

Attach a :class:`Probe` to a training loop, read the run back with :func:`load_run`, find
its failure modes with ``diagnose(run)`` and write the PDF report with :func:`write_report`
(or run ``gradprobe analyze RUN``)::

    from gradprobe import Probe, diagnose, load_run, write_report
    run = load_run("run.gprobe")
    findings = diagnose(run)
    write_report(run, "report.pdf", findings)

``import gradprobe`` (and training with a probe) does not import matplotlib or seaborn: the
report stage is imported when :func:`write_report` is first called.
"""

from __future__ import annotations

__version__ = "0.1.0"  # before the imports: the stages read it while gradprobe initialises

import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterable  # noqa: E402

from gradprobe import diagnose  # noqa: E402  (the package, callable as diagnose(run))
from gradprobe.diagnose import Finding, Thresholds  # noqa: E402
from gradprobe.probe import GradprobeWarning, Probe, ProbeUsageError  # noqa: E402
from gradprobe.record import Run, RunFileError, load_run  # noqa: E402

__all__ = ["Finding", "GradprobeWarning", "Probe", "ProbeUsageError", "Run", "RunFileError",
           "Thresholds", "__version__", "diagnose", "load_run", "write_report"]


def write_report(run: Run, path: str | os.PathLike, findings: Iterable[Finding] | None = None,
                 *, title: str | None = None) -> Path:
    """Write the PDF failure report of ``run`` to ``path`` and return the path written.

    ``findings``: those of ``diagnose(run)`` (computed here at the default thresholds when not
    given). The report stage (matplotlib, seaborn) is imported on this first call only.
    """
    from gradprobe.report import write_pdf

    return write_pdf(run, diagnose(run) if findings is None else list(findings), path,
                     title=title)
