"""Stage 1: hooks and cadence. Attach a :class:`Probe` to a training loop."""

from gradprobe import metrics

from .probe import ROLES, GradprobeWarning, Probe, guess_role
from .watches import ProbeUsageError

# The metrics are imported with the probe, not on first use: that is the first probe step, in the
# writer thread, where importing them (scipy among them, a second or more) delays the first commit.
for _name in metrics.__all__:
    getattr(metrics, _name)
del _name

__all__ = ["Probe", "ProbeUsageError", "GradprobeWarning", "ROLES", "guess_role"]
