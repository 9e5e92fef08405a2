"""``inert-loss``: a loss that trains nothing it was meant to, read from the probe's graph
events, and from the gradient norms on the whole shared set (exactly 0, or rounding residue),
which ``gradient-swamping`` reads too (a loss without a gradient there is inert, not swamped)."""

from __future__ import annotations

import numpy as np

from gradprobe.record import Run, role_declaration
from gradprobe.record.quantities import GRAD_NORM

from .._series import (SHAPES_SHARED, align, exempt_losses, finite, g, get, nanmax, role_origin,
                       role_record)
from ..findings import Finding, PlotHint
from ..thresholds import Thresholds
from .common import Earlier, make_finding
from .layers import layer_blocks, layer_weights
from .remedies import ROUNDING_RESIDUE, intent_remedy


def _own_only_finding(run: Run, name: str, events: list[dict], evidence: dict) -> Finding | None:
    """A loss that reaches parameters, none of them shared: inert when none of them is the
    probed model's (reach ``none``), or when it was meant to shape the shared representation
    (declared, or hinted by its name and shown as such); a codebook or prototype loss trains
    its own parameters by design. Where neither the user nor the name tells, ``info`` with
    the declaration that settles it."""
    record = role_record(run, name)
    role, settled = record["role"], record["source"] != "name"
    steps = (int(events[0]["step"]), int(events[-1]["step"]))
    evidence.update(role=role, role_source=record["source"], role_hint=record.get("hint"),
                    reach=record.get("reach"))
    message = " ".join(str(events[0]["message"]).split())
    plot = PlotHint(GRAD_NORM, names=[name])
    if record.get("reach") == "none":
        # What it reaches lies outside the model given to Probe (a discriminator kept apart
        # reading detached features): whatever it was meant for, it trains nothing here.
        return make_finding(
            "inert-loss", "warning",
            f"'{name}' reaches no trainable parameter of the probed model (what its graph "
            "reaches lies outside it): it trains nothing of the model", name,
            f"{len(events)} probe steps", evidence, steps, plot=plot)
    if role in SHAPES_SHARED:
        return make_finding("inert-loss", "warning",
                            f"{message} (role {role}, {role_origin(record)})", name,
                            f"{len(events)} probe steps", evidence, steps, plot=plot)
    if settled:
        return None  # declared a codebook, prototype, regulariser...: its own by design
    keep, cut = role_declaration(name, "prototype"), role_declaration(name, "adversarial")
    evidence["settle"] = [keep, cut]
    return make_finding(
        "inert-loss", "info",
        f"'{name}' trains only parameters no other loss reaches: as a codebook or prototype "
        f"loss that is the method, as a loss meant to shape the shared layers it is cut off "
        f"from them; the graph looks the same. Settle it: {keep} (a codebook) or {cut} (meant "
        "to reach the shared layers)",
        name, "intent unknown", evidence, steps, plot=plot, remedy=intent_remedy(keep, cut))


def inert_loss(run: Run, th: Thresholds, earlier: Earlier) -> list[Finding]:
    # A regulariser declared or read from the graph (an L2 penalty on one head) may touch only
    # its own parameters; a loss that trains only loss weights (Kendall's log-variance term)
    # moves what it was meant to. Neither is a wiring fault. A name never exempts.
    exempt = exempt_losses(run, th) | {n for n in run.losses
                                       if role_record(run, n).get("reach") == "loss-weights"}
    out, seen = [], set(exempt)
    for kind in ("inert_loss", "no_shared_path"):
        by_name: dict[str, list[dict]] = {}
        for e in run.events(kind):
            by_name.setdefault(e["name"], []).append(e)
        for name, events in by_name.items():
            if name in seen:
                continue
            seen.add(name)
            grad = finite(get(run, GRAD_NORM, name))
            evidence = {"loss": name, "event": kind, "events": len(events),
                        "first_step": int(events[0]["step"]), "last_step": int(events[-1]["step"]),
                        "message": events[0]["message"],
                        "max_grad_norm": nanmax(grad[1]) if grad is not None else None}
            if kind == "no_shared_path":
                finding = _own_only_finding(run, name, events, evidence)
                out += [finding] if finding else []
                continue
            out.append(make_finding(
                "inert-loss", "error", " ".join(str(events[0]["message"]).split()), name,
                f"{len(events)} probe steps", evidence,
                (int(events[0]["step"]), int(events[-1]["step"])),
                plot=PlotHint(GRAD_NORM, names=[name])))
    norms = _shared_set_norms(run, th)
    residue = _residue(norms, th)
    for name in run.losses:
        if name in seen:
            continue
        grad = finite(get(run, GRAD_NORM, name))
        if grad is None or len(grad[0]) < th.min_points:
            continue
        steps = (int(grad[0][0]), int(grad[0][-1]))
        plot = PlotHint(GRAD_NORM, names=[name])
        whole = norms[2][norms[0].index(name)] if norms and name in norms[0] else grad[1]
        if float(np.nanmax(np.abs(whole))) == 0.0:
            evidence = {"loss": name, "event": None, "probe_steps": int(len(grad[0])),
                        "max_grad_norm": 0.0}
            out.append(make_finding(
                "inert-loss", "warning",
                f"loss '{name}' has a zero gradient on the shared parameters at every probe step",
                name, "grad norm 0", evidence, steps, plot=plot))
        elif name in residue:
            evidence = {"loss": name, "event": None, "probe_steps": int(len(grad[0])),
                        "max_grad_norm": nanmax(grad[1]), "max_share_of_largest": residue[name],
                        "threshold": th.inert_rounding_fraction}
            out.append(make_finding(
                "inert-loss", "warning",
                f"loss '{name}' has a gradient of at most {g(residue[name])} of the largest "
                "other loss's on the shared parameters at every probe step, weighted or not: "
                "rounding residue, it moves nothing (a target taken from the model's own "
                "output, e.g. a teacher that is the live model?)",
                name, f"grad <= {g(residue[name])} x largest", evidence, steps, plot=plot,
                remedy=ROUNDING_RESIDUE))
    return out


def rounding_residue(run: Run, th: Thresholds) -> dict[str, float]:
    """Losses whose gradient on the shared parameters is rounding residue: at every probe step
    (at least ``min_points``), both its gradient norm and its weighted gradient norm are at
    most ``inert_rounding_fraction`` of the largest other loss's. Weighted alone, a loss
    scaled down by its weight (swamped) would pass; unweighted alone, a loss at its floor
    whose weight scales it back up (a CORAL term at 1e5) would. A gradient that small from
    the first probe step on comes from a loss whose value is an identity of the model's own
    output: a KL or distillation target aliased to the live model, detached, gives
    ``p - p`` up to float rounding. Maps each to its largest share over the steps."""
    return _residue(_shared_set_norms(run, th), th)


def _residue(norms: tuple | None, th: Thresholds) -> dict[str, float]:
    """:func:`rounding_residue` from the norms ``_shared_set_norms`` read."""
    if norms is None:
        return {}
    names, _, raw, weighted = norms
    out = {}
    for k, name in enumerate(names):
        others = [j for j in range(len(names)) if j != k]
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.maximum(raw[k] / raw[others].max(axis=0),
                               weighted[k] / weighted[others].max(axis=0))
        if np.all(np.isfinite(share)) and float(share.max()) <= th.inert_rounding_fraction:
            out[name] = float(share.max())
    return out


def _shared_set_norms(run: Run, th: Thresholds
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """``(names, steps, raw, weighted)``: each loss's gradient norm and weighted gradient
    norm [K, T] on the whole shared set (``on_whole_set``) at the probe steps every loss
    was recorded at; None with fewer than two losses or ``min_points`` steps."""
    names = [n for n in run.losses if run.has(GRAD_NORM, n)]
    if len(names) < 2:
        return None
    steps, values = align(*[get(run, GRAD_NORM, n) for n in names])
    if len(steps) < th.min_points:
        return None
    raw = on_whole_set(run, names, steps, np.vstack(values))
    weights = layer_weights(run, steps)[[run.losses.index(n) for n in names]]
    return names, steps, raw, np.abs(weights) * raw


def on_whole_set(run: Run, names: list[str], steps: np.ndarray, gram_layer: np.ndarray
                  ) -> np.ndarray:
    """Each loss's gradient norm [K, T] on the whole shared set where the run holds its
    per-layer blocks (the root of the summed squared norms over the layers), else on the
    Gram matrix's layer (``gram_layer``). The Gram layer is the nearest layer every loss's
    path crosses; a loss can cross it with a gradient of exactly 0 there (a task whose gate
    is one of a mixture's, saturated, on the other task's routing) and move the experts
    below it: neither inert nor out of the swamping test."""
    blocks = layer_blocks(run)
    if blocks is None:
        return gram_layer
    block_steps, _, grams = blocks
    energy = np.clip(np.diagonal(grams, axis1=2, axis2=3), 0.0, None).sum(axis=1)  # [T_b, K]
    at = {int(step): i for i, step in enumerate(block_steps)}
    columns = [run.losses.index(n) for n in names]
    out = np.array(gram_layer, dtype=np.float64)
    for t, step in enumerate(steps):
        if int(step) in at:
            out[:, t] = np.sqrt(energy[at[int(step)], columns])
    return out
