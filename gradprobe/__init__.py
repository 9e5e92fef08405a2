"""gradprobe: the flight recorder and failure analyst for multi-loss PyTorch models.

Attach a :class:`Probe` to a training loop, read the run back with :func:`load_run`, and
run ``gradprobe analyze RUN`` to see which failure modes the run shows.
"""

__version__ = "0.1.0"

from gradprobe.probe import GradprobeWarning, Probe, ProbeUsageError  # noqa: E402
from gradprobe.record import Run, RunFileError, load_run  # noqa: E402

__all__ = ["Probe", "ProbeUsageError", "GradprobeWarning", "Run", "RunFileError", "load_run",
           "__version__"]
