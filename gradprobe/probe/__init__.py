"""Stage 1: hooks and cadence. Attach a :class:`Probe` to a training loop."""

from .probe import ROLES, GradprobeWarning, Probe, guess_role
from .watches import ProbeUsageError

__all__ = ["Probe", "ProbeUsageError", "GradprobeWarning", "ROLES", "guess_role"]
