"""What a swamped loss is for, and whether it already holds by its own measure: read by
``gradient-swamping`` (gradients.py), which keeps such a finding at ``info``."""

from __future__ import annotations

from gradprobe.record import Run
from gradprobe.record.quantities import LOSS

from .._series import finite, get, role_origin, role_record, roles, start_end
from ..thresholds import Thresholds


def adversary_at_chance(run: Run, name: str, th: Thresholds) -> dict | None:
    """For an adversarial loss (a discriminator trained against the shared features through a
    reversed gradient), its start and end levels when its end window is at least
    ``adversary_chance_fraction`` of its start window: an untrained discriminator starts at
    chance, so one that ends there recovers almost none of the label entropy it started at
    (1 - end/start of it): the features carry no task or domain information it can read,
    which is what the loss is for; the game is at its equilibrium, whatever share of the
    gradient it holds. A discriminator that wins (its loss falls far below its start: a
    detached or swamped reversal) keeps the alarm. None otherwise. The role may come from
    the name: the finding says so and stays a finding, at info."""
    if roles(run).get(name) != "adversarial":
        return None
    series = finite(get(run, LOSS, name))
    if series is None or len(series[0]) < 2 * th.min_points:
        return None
    levels = start_end(*series, th)
    if not levels["start"] > 0 or levels["end"] < th.adversary_chance_fraction * levels["start"]:
        return None
    return {"start": levels["start"], "end": levels["end"],
            "end_fraction": levels["end"] / levels["start"],
            "role": role_origin(role_record(run, name))}
