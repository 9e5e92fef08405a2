"""One small unit per watched quantity: what it captures and the scalars it records.

Each watch is keyed by the user's name (two latents of the same class never collide) and
keeps only the state its own quantity needs (the previous prototype values, say). The
numbers come from :mod:`gradprobe.metrics`; a watch only decides what to feed them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch

from gradprobe import metrics

Scalars = dict[tuple[str, str], float]
Arrays = dict[tuple[str, str], np.ndarray]


class ProbeUsageError(ValueError):
    """The training loop called the probe in a way it cannot record (one clear message)."""


def as_matrix(name: str, tensor: torch.Tensor, max_rows: int) -> torch.Tensor:
    """A detached [n, d] view of a latent, at most ``max_rows`` rows, upcast for the metrics."""
    if not isinstance(tensor, torch.Tensor):
        raise ProbeUsageError(f"latent {name!r} is a {type(tensor).__name__}, expected a tensor")
    if tensor.ndim < 2:
        raise ProbeUsageError(f"latent {name!r} has shape {list(tensor.shape)}; expected "
                              "[batch, dim] (or [batch, ...], which is flattened)")
    if tensor.shape[0] == 0:
        raise ProbeUsageError(f"latent {name!r} is an empty batch (shape {list(tensor.shape)})")
    if not (tensor.is_floating_point()):
        raise ProbeUsageError(f"latent {name!r} has integer dtype {tensor.dtype}; "
                              "expected floating-point features")
    # Under no_grad (the probe's hand-over) a slice carries no graph: no detach op needed.
    z = tensor.detach() if tensor.requires_grad and torch.is_grad_enabled() else tensor
    if z.shape[0] > max_rows:
        z = z[:max_rows]
    return z if z.ndim == 2 else z.reshape(z.shape[0], -1)


class Watch:
    """What every watch has: the user's name, its own cadence (``None``: every probe step),
    its forward hook (if any) and, once it cannot record, the reason it was disabled and the
    first step it no longer records."""

    def __init__(self, name: str, every: int | None):
        self.name = name
        self.every = every
        self.handle = None
        self.disabled: str | None = None
        self.disabled_from: int | None = None

    def disable(self, reason: str, step: int) -> None:
        self.disabled_from = step  # first: the writer thread reads ``disabled`` first
        self.disabled = reason

    def records_at(self, step: int) -> bool:
        """Whether the writer thread still records this watch for ``step``: a step handed over
        before the watch was dropped on the training thread keeps what it prepared."""
        return self.disabled is None or step < self.disabled_from


def describe_value(value: Any) -> str:
    """What a module returned, in a few words (for messages)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(f"tensor {list(v.shape)}" if isinstance(v, torch.Tensor)
                          else type(v).__name__ for v in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"a {type(value).__name__} of {len(value)} ({items}{more})"
    if isinstance(value, Mapping):
        kind = "dict" if type(value) is dict else f"mapping ({type(value).__name__})"
        return f"a {kind} with keys {list(value)[:6]}"
    if dataclasses.is_dataclass(value):
        return f"a dataclass ({type(value).__name__}) with fields " \
               f"{[f.name for f in dataclasses.fields(value)][:6]}"
    return "None" if value is None else f"an object of type {type(value).__name__}"


def check_select(name: str, select: Any) -> None:
    if select is None or callable(select) or isinstance(select, str) or \
            (isinstance(select, int) and not isinstance(select, bool)):
        return
    raise ProbeUsageError(f"latent {name!r}: select must be an index, a key or a function of the "
                          f"module's output, got {type(select).__name__} {select!r}")


def _select_label(select: Any) -> str:
    return repr(select) if isinstance(select, (int, str)) else \
        getattr(select, "__name__", type(select).__name__)


class LatentWatch(Watch):
    """A named latent: captured from a module's forward output, or passed to ``observe``;
    optionally with the class labels of its rows (the name of an observed tensor).

    ``select`` picks the latent from a structured output: an index (tuples, lists), a key
    (dicts; attributes of dataclasses and named tuples) or a function of the output. Without
    it a tensor is used as it is, and a tuple or list whose first element is a tensor gives
    that first element (with one warning saying so, since a module may put its latent
    elsewhere).
    """

    def __init__(self, name: str, module: torch.nn.Module | None, labels: str | None,
                 every: int | None, select: Any = None):
        check_select(name, select)
        super().__init__(name, every)
        self.module = module
        self.labels = labels
        self.select = select

    def pick(self, value: Any) -> tuple[torch.Tensor, str | None]:
        """The tensor to record from ``value``, and a note when the first element was taken
        by convention."""
        if self.select is None:
            if isinstance(value, torch.Tensor):
                return value, None
            if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
                return value[0], (f"latent {self.name!r} is {describe_value(value)}; recording "
                                  "its first element (pass select=0 to confirm, or select= to "
                                  "pick another)")
            if value is None:
                raise ProbeUsageError(f"latent {self.name!r} is None: watch the module that "
                                      f"outputs the latent, or pass it as observe({self.name}=...)")
            raise ProbeUsageError(
                f"latent {self.name!r} is {describe_value(value)}, not a tensor; pass "
                f"watch_latent({self.name!r}, module, select=...) with an index, a key or a "
                "function that returns the latent tensor")
        label = _select_label(self.select)
        try:
            if callable(self.select):
                picked = self.select(value)
            elif isinstance(self.select, str) and not isinstance(value, Mapping):
                picked = getattr(value, self.select)
            else:
                picked = value[self.select]
        except Exception as exc:
            raise ProbeUsageError(f"latent {self.name!r}: select={label} cannot pick from "
                                  f"{describe_value(value)}: {type(exc).__name__}: {exc}") from None
        if not isinstance(picked, torch.Tensor):
            raise ProbeUsageError(f"latent {self.name!r}: select={label} picked "
                                  f"{describe_value(picked)} from {describe_value(value)}, "
                                  "not a tensor")
        return picked, None

    def prepare(self, z: torch.Tensor, max_rows: int,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """On the training thread: the pieces to copy to the host (shapes checked only)."""
        z = as_matrix(self.name, z, max_rows)
        pieces = {f"latent:{self.name}": z}
        if labels is not None:
            labels = torch.as_tensor(labels).detach().reshape(-1)
            if labels.shape[0] < z.shape[0]:
                raise ProbeUsageError(f"latent {self.name!r}: {labels.shape[0]} labels "
                                      f"({self.labels!r}) for {z.shape[0]} rows")
            pieces[f"labels:{self.name}"] = labels[:z.shape[0]]
        return pieces

    def record(self, values: Mapping[str, torch.Tensor]) -> tuple[Scalars, Arrays]:
        """On the host: the latent's metrics, one eigen-decomposition for every spectral one."""
        z = values[f"latent:{self.name}"]
        n, d = z.shape
        k = min(32, d)
        stats = metrics.latent_statistics(z, k=k)
        if not bool(stats["finite"]):
            raise NonFinite(f"latent {self.name!r}")
        key = self.name
        scalars = {(quantity, key): float(stats[quantity]) for quantity in LATENT_QUANTITIES}
        scalars.update({
            ("effective_rank_isotropic", key): metrics.isotropic_effective_rank(n, d),
            ("latent_dim", key): float(d),
            ("latent_rows", key): float(n),
        })
        labels = values.get(f"labels:{self.name}")
        if labels is not None:
            scalars[("latent_classes", key)] = float(torch.unique(labels).numel())
        arrays = {("singular_spectrum", key):
                  stats["singular_spectrum"].numpy().astype(np.float32)}
        return scalars, arrays


# What a latent records from metrics.latent_statistics, by the same names.
LATENT_QUANTITIES = ("effective_rank", "effective_rank_centred", "rankme_centred",
                     "participation_ratio", "normalized_std", "total_variance", "active_units",
                     "latent_norm")


class NonFinite(Exception):
    """A watched value holds NaN or Inf: recorded as an event, not as a number."""


def latent_pair(a: str, za: torch.Tensor, b: str, zb: torch.Tensor) -> Scalars:
    """On the host: the dependence between two latents of the same batch (the record's
    Corr(z_I, z_E)), from their recorded rows."""
    if za.shape[0] != zb.shape[0] or za.shape[0] < 4:
        return {}
    key = f"{a}|{b}"
    pair = metrics.latent_pair_summary(za, zb)
    return {
        ("cka", key): float(pair["cka"]),
        ("max_abs_correlation", key): float(pair["max_abs_correlation"]),
        ("max_abs_correlation_null", key):
            metrics.max_abs_correlation_null(za.shape[0], za.shape[1], zb.shape[1]),
    }


class PrototypeWatch(Watch):
    """A set of prototypes (rows indexed by group id): drift, staleness, spread, usage, lag.
    ``groups``: the name of the observed tensor of each latent row's prototype id."""

    def __init__(self, name: str, source: Any, latent: str | None, groups: str,
                 every: int | None):
        super().__init__(name, every)
        self.source = source
        self.latent = latent
        self.groups = groups
        # Where the step's transfer carries them: the batch's groups travel as "groups".
        self.groups_key = groups if groups == "groups" else f"groups:{groups}"
        self.previous: torch.Tensor | None = None
        self.last_moved: torch.Tensor | None = None  # probe step at which each row last moved
        self.group_means: dict[int, torch.Tensor] = {}

    def prepare(self) -> dict[str, torch.Tensor]:
        """On the training thread: the table as it is now (copied with the step's transfer)."""
        value = self.source() if callable(self.source) else self.source
        if hasattr(value, "full_tensor"):  # a DTensor: FSDP2 sharded it, rows are missing here
            raise ProbeUsageError(
                f"prototypes {self.name!r} are a sharded DTensor (FSDP2): this rank holds only "
                "its shard; pass a plain tensor gathered on every rank (docs/distributed.md)")
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ProbeUsageError(f"prototypes {self.name!r} must be a [num_prototypes, dim] "
                                  f"tensor, got {shape}")
        return {f"prototypes:{self.name}": value.detach()}

    def record(self, step: int, values: Mapping[str, torch.Tensor]) -> tuple[Scalars, Arrays]:
        """On the host (the table's history lives there): ``values`` holds the table, the
        rows of its latent (when recorded) and its rows' prototype ids (when observed)."""
        now = values[f"prototypes:{self.name}"]
        latent = values.get(f"latent:{self.latent}") if self.latent else None
        groups = values.get(self.groups_key)
        key = self.name
        arrays: Arrays = {}
        spread = metrics.prototype_spread(now)
        scalars: Scalars = {("prototype_min_distance", key): spread["min_distance"],
                            ("prototype_mean_distance", key): spread["mean_distance"],
                            ("prototype_rank", key): spread["effective_rank"],
                            ("prototype_count", key): float(now.shape[0])}
        if self.previous is None or self.previous.shape != now.shape:
            self.last_moved = torch.full((now.shape[0],), step, dtype=torch.int64)
        else:
            drift = metrics.prototype_drift(self.previous, now)
            scalars[("prototype_drift", key)] = drift["relative"]
            scalars[("prototype_moved_share", key)] = float(drift["moved"].double().mean())
            self.last_moved[drift["moved"]] = step
            scalars[("prototype_steps_since_moved", key)] = float((step - self.last_moved).max())
        self.previous = now
        if latent is not None:
            e = latent
            if e.shape[1] == now.shape[1]:
                counts = metrics.prototype_assignments(e, now)
                scalars[("prototype_usage", key)] = metrics.usage_entropy(counts.numpy())
                # Per step, so that the diagnosis can pool usage over many batches.
                arrays[("prototype_assignments", key)] = counts.numpy().astype(np.float64)
                if groups is not None and len(groups) == e.shape[0]:
                    scalars.update(self._lag(now, e, groups))
        return scalars, arrays

    def _lag(self, protos: torch.Tensor, e: torch.Tensor, groups: torch.Tensor) -> Scalars:
        groups = groups[: e.shape[0]].to(torch.int64)
        in_range = (groups >= 0) & (groups < protos.shape[0])
        if not bool(in_range.all()):
            return {}
        scalars = {("prototype_lag", self.name): metrics.prototype_lag(protos, e, groups)}
        shifts = []
        for g in torch.unique(groups).tolist():
            mean = e[groups == g].mean(0)
            before = self.group_means.get(g)
            if before is not None and float(before.norm()) > 0:
                shifts.append(float((mean - before).norm() / before.norm()))
            self.group_means[g] = mean
        if shifts:
            # How far what the prototypes summarise moved since it was last seen.
            scalars[("prototype_target_shift", self.name)] = float(np.mean(shifts))
        return scalars

    def state(self) -> dict[str, Any]:
        if self.previous is None:
            return {}
        return {"previous": self.previous.clone(), "last_moved": self.last_moved.clone()}

    def load_state(self, state: dict[str, Any]) -> None:
        if "previous" in state:
            self.previous = state["previous"].clone()
            self.last_moved = state["last_moved"].clone()


def resolve_scalar(value: Any) -> float | torch.Tensor | None:
    """A temperature: a number, a one-value tensor (detached, not read) or a callable of one."""
    if value is None:
        return None
    if callable(value):
        value = value()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ProbeUsageError(f"temperature must be a number, got shape {list(value.shape)}")
        return value.detach()
    return float(value)


class SaturationWatch(Watch):
    """Pre-sigmoid values: share in the flat region, mean sigmoid', a fixed-bin histogram;
    with a target, the share saturated on the wrong side of it."""

    def __init__(self, name: str, module: torch.nn.Module | None,
                 temperature: float | Callable[[], Any] | None, threshold: float,
                 terms: tuple[str, str] | None, target: str | None, every: int | None):
        super().__init__(name, every)
        self.module = module
        self.temperature = temperature
        self.threshold = threshold
        self.terms = terms
        self.target = target

    def observed_names(self) -> tuple[str, ...]:
        """Names besides its own that this watch reads from ``observe``."""
        return (*(self.terms or ()), *((self.target,) if self.target else ()))

    def prepare(self, x: torch.Tensor, observed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """On the training thread: the pieces to copy to the host (shapes checked only)."""
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            raise ProbeUsageError(f"saturation watch {self.name!r} needs a non-empty tensor")
        pieces = {f"saturation:{self.name}": x.detach().reshape(-1)}
        target = observed.get(self.target) if self.target else None
        if target is not None:
            if not isinstance(target, torch.Tensor) or target.numel() != x.numel():
                got = f"{target.numel()} values" if isinstance(target, torch.Tensor) else \
                    type(target).__name__
                raise ProbeUsageError(f"saturation watch {self.name!r}: target {self.target!r} "
                                      f"needs one value per sigmoid input ({x.numel()}), got {got}")
            pieces[f"target:{self.name}"] = target.detach().reshape(-1)
        temperature = resolve_scalar(self.temperature)
        if temperature is not None:
            pieces[f"temperature:{self.name}"] = torch.as_tensor(temperature).reshape(())
        if self.terms is not None:
            u, r = (observed.get(t) for t in self.terms)
            if isinstance(u, torch.Tensor) and isinstance(r, torch.Tensor):
                pieces[f"term:{self.name}:u"] = u.detach().reshape(-1)
                pieces[f"term:{self.name}:r"] = r.detach().reshape(-1)
        return pieces

    def record(self, values: Mapping[str, torch.Tensor]) -> tuple[Scalars, Arrays]:
        """On the host, from the pieces of :meth:`prepare`."""
        x = values[f"saturation:{self.name}"]
        if not bool(torch.isfinite(x).all()):
            raise NonFinite(f"sigmoid input {self.name!r}")
        key = self.name
        terms = None
        if f"term:{key}:u" in values:
            terms = (values[f"term:{key}:u"], values[f"term:{key}:r"])
        summary = metrics.saturation_summary(x, threshold=self.threshold, terms=terms)
        scalars = {
            ("saturated_fraction", key): float(summary["saturated_fraction"]),
            ("mean_sigmoid_grad", key): float(summary["mean_sigmoid_grad"]),
            ("saturation_threshold", key): float(self.threshold),
        }
        target = values.get(f"target:{key}")
        if target is not None:
            shares = metrics.saturated_wrong_shares(x, target, threshold=self.threshold)
            scalars.update({(name, key): share for name, share in shares.items()})
        temperature = values.get(f"temperature:{key}")
        if temperature is not None:
            scalars[("temperature", key)] = float(temperature)
        if terms is not None:
            scalars[("energy_scale_ratio", key)] = float(summary["energy_scale_ratio"])
        arrays = {("saturation_histogram", key): summary["histogram"].numpy().astype(np.float64)}
        return scalars, arrays


class ContrastiveWatch(Watch):
    """An InfoNCE batch: how much signal the negatives it actually uses carry.

    ``observe(name=...)`` accepts:

    - ``(anchors, positives)``: in-batch negatives only (row j's positive is a negative of
      every other anchor), the plain SimCLR/InfoNCE batch;
    - ``(anchors, positives, negatives)`` or ``(anchors, positives, negatives,
      negative_groups)``: plus extra negatives [m, d] shared by all anchors (a cross-batch
      memory bank), with their group ids [m] when known;
    - a mapping with keys ``anchors``, ``positives`` and optionally ``negatives``,
      ``negative_groups`` and ``mask_same_group`` (bool): with ``mask_same_group`` the
      negatives from the anchor's own group (per ``observe(groups=...)``) are left out, as
      ``gradprobe.remedies.info_nce(..., groups=...)`` leaves them out of the loss.

    Anchors and positives are limited to ``max_rows`` rows like every latent; extra negatives
    are used in full (they are what the loss compares every anchor with).
    """

    KEYS = ("anchors", "positives", "negatives", "negative_groups", "mask_same_group")

    def __init__(self, name: str, temperature: float, every: int | None):
        super().__init__(name, every)
        self.temperature = temperature

    def _unpack(self, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(self.KEYS))
            if unknown or "anchors" not in value or "positives" not in value:
                raise ProbeUsageError(
                    f"observe({self.name}={{...}}) needs keys 'anchors' and 'positives' (optional: "
                    f"'negatives', 'negative_groups', 'mask_same_group'); got {sorted(value)}")
            return dict(value)
        if isinstance(value, (tuple, list)) and 2 <= len(value) <= 4:
            return dict(zip(self.KEYS, value))
        raise ProbeUsageError(f"observe({self.name}=...) needs (anchors, positives), (anchors, "
                              "positives, negatives[, negative_groups]) or a dict with those keys")

    def prepare(self, pair: Any, groups: torch.Tensor | None,
                max_rows: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """On the training thread: the pieces to copy to the host and the facts beside them
        (shapes checked only)."""
        spec = self._unpack(pair)
        anchors = as_matrix(self.name, spec["anchors"], max_rows)
        positives = as_matrix(self.name, spec["positives"], max_rows)
        key = f"contrastive:{self.name}"
        pieces = {f"{key}:anchors": anchors, f"{key}:positives": positives}
        negatives = spec.get("negatives")
        if negatives is not None:
            if not isinstance(negatives, torch.Tensor) or negatives.ndim != 2 or \
                    (negatives.shape[0] and negatives.shape[1] != anchors.shape[1]):
                shape = list(negatives.shape) if isinstance(negatives, torch.Tensor) else \
                    type(negatives).__name__
                raise ProbeUsageError(f"contrastive {self.name!r}: negatives must be [m, "
                                      f"{anchors.shape[1]}], got {shape}")
            if negatives.shape[0] == 0:
                negatives = None
        neg_groups = spec.get("negative_groups") if negatives is not None else None
        if negatives is not None:
            pieces[f"{key}:negatives"] = negatives.detach()
        if neg_groups is not None:
            neg_groups = torch.as_tensor(neg_groups).detach().reshape(-1)
            if neg_groups.shape[0] != negatives.shape[0]:
                raise ProbeUsageError(f"contrastive {self.name!r}: {neg_groups.shape[0]} "
                                      f"negative_groups for {negatives.shape[0]} negatives")
            pieces[f"{key}:negative_groups"] = neg_groups
        mask = bool(spec.get("mask_same_group", False))
        extra = 0 if negatives is None else negatives.shape[0]
        if anchors.shape != positives.shape or (anchors.shape[0] < 2 and extra == 0):
            raise ProbeUsageError(f"contrastive pair {self.name!r}: anchors {list(anchors.shape)}"
                                  f" and positives {list(positives.shape)} must match, n >= 2")
        has_groups = groups is not None and len(groups) >= anchors.shape[0]
        if has_groups:
            pieces[f"{key}:groups"] = torch.as_tensor(groups).reshape(-1)[: anchors.shape[0]]
        if mask and (not has_groups or (negatives is not None and neg_groups is None)):
            raise ProbeUsageError(f"contrastive {self.name!r}: mask_same_group needs "
                                  "observe(groups=...) and negative_groups for the negatives")
        return pieces, {f"{key}:mask": mask}

    def record(self, values: Mapping[str, Any]) -> Scalars:
        """On the host, from the pieces and facts of :meth:`prepare`."""
        key = f"contrastive:{self.name}"
        mask = values[f"{key}:mask"]
        try:
            signal = metrics.contrastive_signal(
                values[f"{key}:anchors"], values[f"{key}:positives"],
                temperature=self.temperature, groups=values.get(f"{key}:groups"),
                negatives=values.get(f"{key}:negatives"),
                negative_groups=values.get(f"{key}:negative_groups"), mask_same_group=mask)
        except ValueError as exc:
            if mask and "no anchor has a negative" in str(exc):
                return {}  # e.g. an empty memory and single-group batches: nothing to measure yet
            raise ProbeUsageError(f"contrastive {self.name!r}: {exc}") from None
        key = self.name
        scalars = {
            ("contrastive_loss_ratio", key): signal["loss_ratio"],
            ("contrastive_gap", key): signal["gap"],
            ("contrastive_effective_negatives", key): signal["effective_negatives"],
            ("contrastive_negatives", key): signal["num_negatives"],
        }
        share = signal.get("same_group_negative_share")
        if share is not None and np.isfinite(share):
            scalars[("contrastive_same_group_share", key)] = share
        return scalars


def batch_scalars(groups: torch.Tensor) -> Scalars:
    """On the host: the composition of a batch from its group ids."""
    diversity = metrics.batch_summary(groups.to(torch.int64))
    return {
        ("groups_per_batch", "batch"): float(diversity["distinct"]),
        ("group_entropy", "batch"): float(diversity["entropy"]),
        ("same_group_pair_share", "batch"): float(diversity["same_group_pair_share"]),
        ("batch_size", "batch"): float(diversity["batch_size"]),
    }
