"""When the probe records: the default schedule, or a fixed cadence ``every=N``.

The default schedule is dense at the start and thins out like the square root of the step:
step s records when s is a multiple of

    interval(s) = min(MAX_DEFAULT_INTERVAL, 2^floor(log2(sqrt(s))))

i.e. every step before step 4, every 2nd step from 4, every 4th from 16, every 8th from 64,
every 16th from 256, every 32nd from 1,024 and every 64th from 4,096 on. A run of T steps
gets about 2 sqrt(T) probe steps until step 4,096 (49 for T = 300, 94 for T = 1,000), so a
short run has enough probe steps for the diagnosis rules' windows, and a long run pays one
probe step in 64, less than the former fixed ``every=50``. The intervals are powers of two,
each dividing the next, so the multiples of the last interval form an evenly spaced subset
of the probe steps across the whole run. A square root (not Cockpit's logarithm) keeps the
late part of a run represented: about a third of the probe steps fall in its second half.
"""

from __future__ import annotations

import math

MAX_DEFAULT_INTERVAL = 64

DEFAULT_CADENCE = ("default: every step before 4, then every 2^k-th step from step 4^k, "
                   f"every {MAX_DEFAULT_INTERVAL}th from step {MAX_DEFAULT_INTERVAL ** 2:,}")


def default_interval(step: int) -> int:
    """The default schedule's interval at ``step`` (see the module docstring)."""
    if step < 4:
        return 1
    return min(MAX_DEFAULT_INTERVAL, 1 << (math.isqrt(step).bit_length() - 1))


def is_probe_step(step: int, every: int | None) -> bool:
    """Whether ``step`` records: a multiple of ``every``, or of the default interval (``None``)."""
    return step % (every if every is not None else default_interval(step)) == 0


def describe(every: int | None) -> str:
    """The cadence in words, as the run file's metadata and the report state it."""
    if every is None:
        return DEFAULT_CADENCE
    return f"every {every} step{'s' if every != 1 else ''}"
