"""What a swamped loss is for, and whether it holds by its own measure: read by
``gradient-swamping`` (gradients.py). An adversary at chance, a loss carried by the
dominant's descent, or a term serving another loss's forward pass whose reach keeps its
health keeps the finding at ``info``; a loss that never recovered its fit keeps a straddling
ratio an alarm; a task that never learned was held back by a swamping over its start window,
however short."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gradprobe.record import Run
from gradprobe.record.quantities import GRAD_COSINE, LATENT_GRAD_NORM, LOSS, pair_name, pair_parts

from .._series import (began, finite, get, median, persistent, role_origin, role_record,
                       roles, rolling_median, start_end, task_name, window_counts)
from ..thresholds import Thresholds
from .batches import weak_contrastive_signal
from .common import pooled_usage
from .layers import layer_pair
from .prototypes import prototype_collapse
from .representations import latent_dependence, orthogonality_vanishing, representation_collapse

# The rules that judge a latent, a prototype set or a loss by its own measure: what a term
# serving another loss's forward pass protects.
_OWN_MEASURES = (representation_collapse, orthogonality_vanishing, latent_dependence,
                 weak_contrastive_signal, prototype_collapse)


def adversary_at_chance(run: Run, name: str, th: Thresholds) -> dict | None:
    """For an adversarial loss (a discriminator trained against the shared features through a
    reversed gradient), its start and end levels when its end window is at least
    ``adversary_chance_fraction`` of its start window: an untrained discriminator starts at
    chance, so one that ends there recovers almost none of the label entropy it started at
    (1 - end/start of it): the features carry no task or domain information it can read,
    which is what the loss is for; the game is at its equilibrium, whatever share of the
    gradient it holds. A discriminator that wins (its loss falls far below its start: a
    detached or swamped reversal; or, recorded from the generator's side, rises above
    ``adversary_rise_ratio`` times it) keeps the alarm. None otherwise. The role may come from
    the name: the finding says so and stays a finding, at info."""
    if roles(run).get(name) != "adversarial":
        return None
    series = finite(get(run, LOSS, name))
    if series is None or len(series[0]) < 2 * th.min_points:
        return None
    levels = start_end(*series, th)
    # At chance both ways: a discriminator's loss that falls wins; one recorded from the other
    # side (a generator's or encoder's -log D against the discriminator's verdict) that
    # rises far above where it began loses to a discriminator that separates what it was
    # meant not to (an adversarial autoencoder's latent that never matched its prior). A
    # generator's loss rises a little at a healthy game's equilibrium (1.3-1.4x).
    if not levels["start"] > 0 or \
            not th.adversary_chance_fraction <= levels["end"] / levels["start"] <= \
            th.adversary_rise_ratio:
        return None
    return {"start": levels["start"], "end": levels["end"],
            "end_fraction": levels["end"] / levels["start"],
            "role": role_origin(role_record(run, name))}


def end_fraction(run: Run, name: str, th: Thresholds) -> float | None:
    """A loss's end window over its start window (medians); None where it has too few
    points or its start window is not above 0."""
    series = finite(get(run, LOSS, name))
    if series is None or len(series[0]) < 2 * th.min_points:
        return None
    levels = start_end(*series, th)
    return levels["end"] / levels["start"] if levels["start"] > 0 else None


def held_back(run: Run, name: str, dominant: str, th: Thresholds) -> dict | None:
    """The end fractions (end window / start window) of a swamped loss and of the loss that
    swamps it, when the swamped one ends the run at least ``swamping_stall_fraction`` of its
    start window while the dominant ends below that fraction of its own: the dominant
    learned, the swamped loss was held back, even after the judged window (an equal-weight
    PINN's boundary term ends at 1.2-4.6 times its start while the residual falls a
    hundredfold or more). The outcome calls what a ratio straddling its threshold leaves
    open. None otherwise."""
    fraction = {loss: end_fraction(run, loss, th) for loss in (name, dominant)}
    if None in fraction.values() or \
            not fraction[name] >= th.swamping_stall_fraction > fraction[dominant]:
        return None
    return {"end_fraction": fraction[name], "dominant_end_fraction": fraction[dominant],
            "by": dominant}


def held_back_by(run: Run, name: str, rivals: list[str], th: Thresholds) -> dict | None:
    """``held_back`` by the first of ``rivals`` (the losses that swamp ``name``, the most
    frequent first) that held it back, or None."""
    return next(filter(None, (held_back(run, name, rival, th) for rival in rivals)), None)


def carried_by(run: Run, name: str, dominant: str, steps: np.ndarray, held: np.ndarray,
               blocks: np.ndarray | None, th: Thresholds) -> float | None:
    """The median cosine, over the steps a loss is held swamped, between its gradient and
    that of the loss that swamps it, on the layers both reach (their per-layer blocks
    ``blocks`` [T, L, K, K] at ``steps`` summed: the Gram matrix of the two gradients on
    those parameters), else on the recorded pair cosine (the nearest shared layer); returned
    when it is at least ``swamping_carried_cosine``. The dominant loss's step then descends
    the swamped loss too, at that share of its steepest rate per unit step (a center loss
    whose compactness the prototype loss also pulls for: 0.42-0.43): carried, not held back.
    None otherwise."""
    if blocks is not None:
        k, d = run.losses.index(name), run.losses.index(dominant)
        pair = blocks[:, :, [k, d]][:, :, :, [k, d]]
        both = (pair[..., 0, 0] > 0) & (pair[..., 1, 1] > 0)
        summed = np.where(both[..., None, None], pair, 0.0).sum(axis=1, keepdims=True)
        cosine = layer_pair(summed, np.ones((2, len(steps))), 0, 1)["cosine"][0]
    else:
        series = next((get(run, GRAD_COSINE, p) for p in (pair_name(name, dominant),
                      pair_name(dominant, name)) if run.has(GRAD_COSINE, p)), None)
        if series is None:
            return None
        cosine = np.interp(steps, *series)
    value = median(cosine[held])
    return value if value >= th.swamping_carried_cosine else None


def swamped_before_learning(run: Run, name: str, steps: np.ndarray, held: np.ndarray,
                            judged: np.ndarray, held_by: Callable[[], dict | None],
                            th: Thresholds) -> dict | None:
    """For the task (declared, or the first loss), swamped at the start of its judged steps,
    where a loss first learns, and kept from its fit by it; a swamping that shuts the task out
    of its start leaves it there after the other loss settles and the ratio recovers, so it is
    the finding whatever share of the whole run it holds. Either
    - it never learned (its smoothed loss never fell below ``swamping_stall_fraction`` of its
      start window) and was swamped persistently over that start window: ``{"lowest": its
      lowest smoothed level / its start}`` (an equal-weight digit classifier beside an ink
      regression of squared error ~1e3: swamped over its first 13-40% of training, the digit
      loss never leaves 0.73-0.95 of ln 10); or
    - it never learned, or was undone (it ends at or above its start window), swamped from
      its first judged step on (``min_points`` steps) by a loss that went on to fall below
      that fraction of its own start (``held_by()``: ``held_back_by`` the losses that swamp
      it, whose figures are returned): a penalty that drives the network to
      its own floor needs no more than a brief start (an input-Jacobian penalty at 1e4 its
      weight flattens a classifier to a constant within 3% of training, the task then stays
      at ln 10 while the penalty falls to 2% of its start; a spectral penalty at 300 its
      weight drives a pretrained classifier from 0.09 back up to chance). A task that
      learned part of its fit (a classifier that the penalty leaves right but unconfident,
      its loss down to 0.57 of its start) is not held back by this alone.
    None otherwise."""
    series = finite(get(run, LOSS, name))
    if name != task_name(run) or series is None or len(series[0]) < 2 * th.min_points:
        return None
    start = start_end(*series, th)["start"]
    lowest = float(np.nanmin(rolling_median(series[1], th.smooth_points))) / start \
        if start > 0 else np.nan
    first = window_counts(steps[judged], th)[0]
    at_start = held[judged][:first]
    if lowest >= th.swamping_stall_fraction and \
            persistent(steps[judged][:first], at_start, None, th):
        return {"lowest": lowest}
    if len(at_start) < th.min_points or not at_start[:th.min_points].all():
        return None
    holder = held_by()
    if holder is None:
        return None
    return holder if lowest >= th.swamping_stall_fraction or holder["end_fraction"] >= 1.0 \
        else None


def _on_another_pass(record: dict) -> bool:
    """Whether a loss's role record reads it as computed on another loss's forward pass
    (``own_pass`` False: no node of its graph applies a shared parameter that the other
    losses' graphs do not), neither the task nor declared."""
    # The task's source is "first" or "declared": the source test leaves it out too.
    return (record.get("source") not in ("declared", "first") and record.get("reach") == "shared"
            and record.get("own_pass") is False)


def objective_of_its_own(run: Run, name: str) -> bool:
    """Whether ``name``, neither the task nor declared and with no role-specific hint (role
    ``other``, or ``task`` from its name), runs the shared layers on inputs of its own (read
    from its graph at the first probe step: a node applying a shared parameter that no other
    loss's graph holds): a PINN's boundary or initial condition evaluated at its own points,
    a second task on a batch of its own. Such a loss is an objective in its own right, to be
    met, as a geometric constraint is, so ``constraint-neglect`` judges it."""
    record = role_record(run, name)
    return (record.get("source") == "name" and record.get("role") in ("other", "task")
            and record.get("reach") == "shared" and record.get("own_pass") is True)


def serves_another(run: Run, name: str) -> bool:
    """Whether ``name`` is a term computed on another loss's forward pass with no parameters
    of its own (read from its graph at the first probe step: probe/roles.py), neither the task
    nor declared: a regulariser on the task's features, logits or latent (TWIST's entropy
    term, a router z-loss, an embedding-norm penalty, DIP-VAE's KL) or an objective of its
    own computed from a shared pass (a boundary term sliced out of one batch): intent the
    graph does not show. A run file without the record reads as not serving."""
    record = role_record(run, name)
    return _on_another_pass(record) and not (record.get("counts") or {}).get("own")


def head_on_another(run: Run, name: str, th: Thresholds) -> float | None:
    """For a loss computed on another loss's forward pass through parameters of its own (a
    decoder, an auxiliary classifier or projection head: CapsNet's masked reconstruction on
    the digit capsules), neither the task nor declared, that still descends by its own
    measure (its end window below ``swamping_stall_fraction`` of where it began, the highest
    of its first ``min_points`` values: a head learns fast, within its start window): that
    fraction. Its head fits what the shared pass gives it, so a small share of the gradient
    on the shared layers is an auxiliary term's design or an objective held back, and the
    graph looks the same; one that does not descend was held back. None otherwise."""
    record = role_record(run, name)
    if not (_on_another_pass(record) and (record.get("counts") or {}).get("own")):
        return None
    series = finite(get(run, LOSS, name))
    if series is None or len(series[0]) < 2 * th.min_points:
        return None
    start = began(series[1], th)
    fraction = start_end(*series, th)["end"] / start if start > 0 else np.nan
    return fraction if fraction < th.swamping_stall_fraction else None


def own_measure_alarms(run: Run, th: Thresholds) -> set[str]:
    """The subjects (latents, latent pairs, prototype sets, losses) of the run's alarms from
    the rules that judge a latent, a prototype set or a loss by its own measure: what a term
    serving another loss's forward pass protects. Computed once per swamping rule call and
    read by :func:`reach_failing` for each serving loss."""
    return {f.subject for rule in _OWN_MEASURES for f in rule(run, th, ())
            if f.severity != "info"}


def reach_failing(run: Run, name: str, th: Thresholds, alarms: set[str],
                  at_chance: dict | None) -> list[str]:
    """What a loss reaches that fails by its own measure: the watched prototypes it reaches as
    graph leaves whose pooled usage entropy is below ``usage_held_fraction`` of its maximum
    (as a balancing loss is judged), those that assign a latent it reaches with a
    prototype-collapse alarm, the watched latents its gradient reaches (a recorded
    ``latent_grad_norm`` above 0) with a representation-collapse, orthogonality-vanishing or
    latent-dependence alarm, and its own weak-contrastive-signal alarm (``alarms``:
    :func:`own_measure_alarms`), and the loss itself when it is adversarial and its
    discriminator is not at chance (``at_chance``: :func:`adversary_at_chance` of it). The
    quantity a term serving another loss protects is not named by its graph, so a failure of
    any of them counts."""
    latents = set()
    for key in run.names(LATENT_GRAD_NORM):
        latent, loss = pair_parts(key)
        if loss == name and np.nanmax(get(run, LATENT_GRAD_NORM, key)[1], initial=0.0) > 0:
            latents.add(latent)
    failing = []
    for prototypes in role_record(run, name).get("prototypes_reached") or ():
        usage = pooled_usage(run, prototypes, th)
        if usage is None or usage["usage"] < th.usage_held_fraction:
            failing.append(prototypes)
    # A table watched through a callable is not among the graph's leaves; the latent it
    # assigns (watch_prototypes(..., latent=)) links it to the losses that reach that latent,
    # a weaker link than a leaf: only its prototype-collapse alarm counts.
    assigning = {p for p, latent in (run.meta.get("prototypes") or {}).items() if latent in latents}
    subjects = latents | assigning | {name}
    failing += [subject for subject in alarms if set(pair_parts(subject)) & subjects]
    if roles(run).get(name) == "adversarial" and at_chance is None and \
            end_fraction(run, name, th) is not None:
        failing.append(name)  # its discriminator wins: it reads what the term was to hide
    return sorted(set(failing))
