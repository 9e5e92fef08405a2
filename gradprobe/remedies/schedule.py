"""Loss-weight curriculum (record-22, insight 7; algorithmic cause 2).

Finding id addressed: ``static-loss-weights``.
"""

from __future__ import annotations

__all__ = ["linear_ramp"]


def linear_ramp(step: int, start: int, length: int) -> float:
    """Curriculum factor in [0, 1]: 0 before ``start``, rising linearly to 1 over ``length`` steps.

    Multiply the decoupling losses' weights by it so that the task (the sequence-interaction
    basis) trains alone first and the constraints ramp in afterwards, instead of a noisy
    ``z_E`` disturbing ``z_I`` from the first step (record-22, insight 7). ``length <= 0``
    gives a hard switch at ``start``.
    """
    if step < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (step - start + 1) / float(length))
