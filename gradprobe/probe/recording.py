"""Recording a probe step: the pieces gathered on the training thread, the numbers made of them
on the writer thread.

On the training thread (:meth:`StepRecorder.hand_over`) a probe step reduces what is large on
the device (the per-loss Jacobian to its K x K Gram matrix; each latent to at most ``max_rows``
rows), checks shapes, and packs every piece into one :class:`~.transfer.Transfer`: one
non-blocking copy to the host, no value read. On the writer thread (:meth:`StepRecorder._make`,
run by :meth:`gradprobe.record.BackgroundRunWriter.submit`, in step order) the host copy is
unpacked and turned into the recorded scalars, arrays and events with the metrics' device-side
summaries (here on host tensors: one eigen-decomposition per latent), and handed to the sinks.
What the writer thread finds that the user should hear about (a non-finite value, a watch that
cannot record, a failing sink) is passed back as a notice and warned about on the training
thread, at its next call into the probe.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from gradprobe import metrics
from gradprobe._version import __version__
from gradprobe.record import STATE_FORMAT, SCHEMA_VERSION, BackgroundRunWriter, RunFileError

from .cadence import describe as describe_cadence
from .layer_blocks import BlockLayout
from .notices import warn_user
from .transfer import Transfer
from .watches import NonFinite, ProbeUsageError, as_matrix, batch_scalars, latent_pair

Event = tuple[str, str, str]  # (kind, name, message)


@dataclass
class StepNumbers:
    """What one probe step records, before the metrics: global (all ranks') values under DDP."""

    loss_values: torch.Tensor  # [K] float64
    # [K, P] float64: unscaled per-loss gradients on the shared set (None: every shared
    # parameter is in a layer whose Gram came from its inputs)
    jacobian: torch.Tensor | None
    latent_grad_norms: torch.Tensor  # [L * K] float64, latent-major: |dL_k / d latent_i|
    observed: dict[str, Any]  # watched tensors by name (gathered over the ranks under DDP)
    local_groups: torch.Tensor | None  # this rank's batch: what a per-rank loss sees
    gram: torch.Tensor | None = None  # [K, K] float64, where no layout gives it (FSDP2)
    layout: BlockLayout | None = None  # the per-layer blocks (layer_blocks.py)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Gram matrix of the per-loss gradients on the shared set, and the per-layer
        blocks [L, K, K] of every probed layer (None where they are not recorded: FSDP2)."""
        if self.layout is None:
            return self.gram, None
        return self.layout.grams(self.jacobian)


@dataclass
class StepPlan:
    """What the writer thread needs beside the transfer: names and which watches it holds."""

    step: int
    losses: list[str]
    weights: list  # a float per loss; None where a tensor weight travels as "weight:<k>"
    scaled: bool
    latent_names: list[str]  # latents with gradient norms, in the order of their rows
    latents: list[str] = field(default_factory=list)
    prototypes: list[str] = field(default_factory=list)
    saturations: list[str] = field(default_factory=list)
    contrastive: list[str] = field(default_factory=list)
    batch: str | None = None  # the key of the group ids batch composition describes
    layers: list[str] = field(default_factory=list)  # the Gram matrix's per-layer blocks


class StepRecorder:
    """Hands probe steps to the writer and makes their numbers there (see the module docstring).

    ``watches``: the probe's :class:`~.watchset.WatchSet` (its ``latents``, ``prototypes``,
    ``saturations`` and ``contrastive`` by name).

    ``notify``: takes a zero-argument function to run on the training thread; ``warn(step,
    kind, names, message, warn)``: warns (once per kind and name) about a recorded event;
    ``drop(watch, exc)``: drops a watch that cannot record, on the training thread;
    ``release(watch, step)``: the rest of dropping a watch the writer thread disabled (its hook
    removed, one warning), on the training thread.
    """

    def __init__(self, writer: Any, watches: Any, sinks: list, max_rows: int,
                 notify: Callable[[Callable[[], None]], None],
                 warn: Callable[[int, str, list[str], str, bool], None],
                 drop: Callable[[Any, BaseException], None],
                 release: Callable[[Any, int], None]):
        self.writer = writer
        self.watches = watches
        self.sinks = sinks
        self.max_rows = max_rows
        self._notify = notify
        self._warn = warn
        self._drop = drop
        self._release = release
        self._sink_lock = threading.Lock()

    # -- the training thread -----------------------------------------------------------

    def hand_over(self, step: int, losses: list[str], weights: list, scale: torch.Tensor | None,
                  latent_names: list[str], numbers: StepNumbers,
                  due: Callable[[Any], bool]) -> Transfer:
        """Pack the step into one transfer and submit its numbers to the writer thread."""
        gram, blocks = numbers.grams()
        pieces: dict[str, torch.Tensor] = {"loss": numbers.loss_values, "gram": gram}
        facts: dict[str, Any] = {}
        plan = StepPlan(step, losses, [w if isinstance(w, float) else None for w in weights],
                        scale is not None, latent_names)
        if blocks is not None:
            pieces["layer_gram"] = blocks
            plan.layers = numbers.layout.names
        for k, w in enumerate(weights):
            if not isinstance(w, float):
                pieces[f"weight:{k}"] = w.reshape(())
        if scale is not None:
            pieces["grad_scale"] = scale
        if latent_names:
            pieces["latent_grad_norm"] = numbers.latent_grad_norms
        observed = numbers.observed
        groups = observed.get("groups")
        if groups is not None:
            pieces["groups"] = groups
        local = numbers.local_groups
        if local is not None and local.numel():
            plan.batch = "groups" if local is groups else "local_groups"
            pieces.setdefault(plan.batch, local)
        with torch.no_grad():
            self._prepare_watches(plan, pieces, facts, observed, local, due)
        transfer = Transfer(pieces, facts)
        self.writer.submit(step, functools.partial(self._make, plan, transfer))
        return transfer

    def _prepare_watches(self, plan: StepPlan, pieces: dict, facts: dict, observed: dict,
                         local_groups: torch.Tensor | None, due: Callable[[Any], bool]) -> None:
        w = self.watches
        for name, watch in w.latents.items():
            if name in observed and due(watch):
                labels = observed.get(watch.labels) if watch.labels else None
                if self._prepared(watch, pieces, watch.prepare, observed[name], self.max_rows,
                                  labels):
                    plan.latents.append(name)
        for name, watch in w.prototypes.items():
            if not due(watch) or not self._prepared(watch, pieces, watch.prepare):
                continue
            plan.prototypes.append(name)
            source = w.latents.get(watch.latent)
            key = f"latent:{watch.latent}"
            if source is not None and source.disabled is None and watch.latent in observed \
                    and key not in pieces:
                pieces[key] = as_matrix(watch.latent, observed[watch.latent], self.max_rows)
            if watch.groups in observed and watch.groups_key not in pieces:
                pieces[watch.groups_key] = torch.as_tensor(observed[watch.groups]).reshape(-1)
        for name, watch in w.saturations.items():
            if name in observed and due(watch) and \
                    self._prepared(watch, pieces, watch.prepare, observed[name], observed):
                plan.saturations.append(name)
        for name, watch in w.contrastive.items():
            if name not in observed or not due(watch):
                continue
            try:
                more, more_facts = watch.prepare(observed[name], local_groups, self.max_rows)
            except Exception as exc:
                self._drop(watch, exc)
                continue
            pieces.update(more)
            facts.update(more_facts)
            plan.contrastive.append(name)

    def _prepared(self, watch: Any, pieces: dict, prepare: Callable, *args: Any) -> bool:
        try:
            pieces.update(prepare(*args))
        except Exception as exc:  # a malformed tensor drops this watch alone
            self._drop(watch, exc)
            return False
        return True

    # -- the writer thread -------------------------------------------------------------

    def _make(self, plan: StepPlan, transfer: Transfer
              ) -> tuple[dict, dict, list[Event]]:
        values = transfer.values()
        scalars: dict[tuple[str, str], float] = {}
        arrays: dict[tuple[str, str], np.ndarray] = {}
        events: list[Event] = []
        self._record_losses(plan, values, scalars, arrays, events)
        self._record_watches(plan, values, scalars, arrays, events)
        self.to_sinks(plan.step, scalars)
        return scalars, arrays, events

    def to_sinks(self, step: int, scalars: dict) -> None:
        """A sink that fails is dropped with one warning (on the training thread, at its next
        call into the probe); the run file and training go on. Called on the writer thread
        for probe steps and on the training thread for logged scalars: one at a time."""
        with self._sink_lock:
            for sink in list(self.sinks):
                try:
                    sink.write_step(step, scalars)
                except Exception as exc:
                    self.sinks.remove(sink)
                    message = (f"gradprobe: sink {type(sink).__name__} failed at step {step} "
                               f"({type(exc).__name__}: {exc}); it receives nothing more")
                    self._notify(functools.partial(warn_user, message))

    def _event(self, events: list[Event], step: int, kind: str, names: list[str],
               message: str, warn: bool = True) -> None:
        events.extend((kind, name, message) for name in names)
        self._notify(functools.partial(self._warn, step, kind, names, message, warn))

    def _record_losses(self, plan: StepPlan, values: Mapping[str, torch.Tensor],
                       scalars: dict, arrays: dict, events: list[Event]) -> None:
        names, step = plan.losses, plan.step
        loss_values = values["loss"].tolist()
        for loss_name, value in zip(names, loss_values):
            if not np.isfinite(value):
                self._event(events, step, "non_finite", [loss_name],
                            f"loss {loss_name!r} is {value}")
        weights = [float(values[f"weight:{k}"]) if w is None else w
                   for k, w in enumerate(plan.weights)]
        for k, loss_name in enumerate(names):
            scalars[("loss", loss_name)] = loss_values[k]
            scalars[("weight", loss_name)] = weights[k]
        gram = values["gram"]
        arrays[("grad_gram", "shared")] = gram.numpy().copy()
        for layer, block in zip(plan.layers, values["layer_gram"] if plan.layers else ()):
            arrays[("grad_gram_layer", layer)] = block.numpy().copy()
        scale = float(values["grad_scale"]) if plan.scaled else 1.0
        if plan.scaled:
            scalars[("grad_scale", "amp")] = scale
        stats = metrics.gram_summary(gram, torch.tensor(weights, dtype=torch.float64))
        if not bool(stats["finite"]):
            if plan.scaled:
                # Overflow of the scaled gradients is what a GradScaler expects now and then:
                # it skips the optimizer step and lowers the scale; not a failure of the model.
                self._event(events, step, "skipped_step", ["scaler"],
                            f"the scaled gradients (scale {scale:g}) hold inf/NaN: "
                            "GradScaler skips this optimizer step", warn=False)
            else:
                bad = [repr(n) for n, d in zip(names, torch.diagonal(gram).tolist())
                       if not np.isfinite(d)]
                what = f"the gradient of loss {' and '.join(bad)}" if bad else \
                    "a per-loss gradient"
                self._event(events, step, "non_finite", ["gradient"],
                            f"{what} on the shared parameters holds NaN or Inf")
        norm, weighted = stats["norm"].tolist(), stats["weighted_norm"].tolist()
        contribution = stats["contribution"].tolist()
        cosine, similarity = stats["cosine"].tolist(), stats["magnitude_similarity"].tolist()
        dots = gram.tolist()
        for k, loss_name in enumerate(names):
            scalars[("grad_norm", loss_name)] = norm[k]
            scalars[("weighted_grad_norm", loss_name)] = weighted[k]
            scalars[("grad_contribution", loss_name)] = contribution[k]
            for j in range(k + 1, len(names)):
                pair = f"{loss_name}|{names[j]}"
                scalars[("grad_dot", pair)] = dots[k][j]
                scalars[("grad_cosine", pair)] = cosine[k][j]
                scalars[("magnitude_similarity", pair)] = similarity[k][j]
        scalars[("combined_grad_norm", "shared")] = float(stats["combined_norm"])
        if plan.latent_names:
            latent_norms = values["latent_grad_norm"].view(len(plan.latent_names),
                                                           len(names)).tolist()
            for i, latent_name in enumerate(plan.latent_names):
                for k, loss_name in enumerate(names):
                    scalars[("latent_grad_norm", f"{latent_name}|{loss_name}")] = \
                        latent_norms[i][k]

    def _record_watches(self, plan: StepPlan, values: Mapping[str, Any], scalars: dict,
                        arrays: dict, events: list[Event]) -> None:
        w = self.watches
        if plan.batch is not None:
            scalars.update(batch_scalars(values[plan.batch]))
        recorded = []
        for name in plan.latents:
            got = self._watch_record(plan.step, events, w.latents[name], values)
            if got is not None:
                scalars.update(got[0])
                arrays.update(got[1])
                recorded.append(name)
        for i, a in enumerate(recorded):
            for b in recorded[i + 1:]:
                scalars.update(latent_pair(a, values[f"latent:{a}"], b, values[f"latent:{b}"]))
        for name in plan.prototypes:
            got = self._watch_record(plan.step, events, w.prototypes[name], plan.step, values)
            if got is not None:
                scalars.update(got[0])
                arrays.update(got[1])
        for name in plan.saturations:
            got = self._watch_record(plan.step, events, w.saturations[name], values)
            if got is not None:
                scalars.update(got[0])
                arrays.update(got[1])
        for name in plan.contrastive:
            scalars.update(self._watch_record(plan.step, events, w.contrastive[name], values)
                           or {})

    def _watch_record(self, step: int, events: list[Event], watch: Any, *args: Any) -> Any:
        """``watch.record(*args)``, or None: NaN/Inf in what it reads is a ``non_finite`` event,
        and any other failure drops this watch alone (on the training thread, next call)."""
        if not watch.records_at(step):
            return None
        try:
            return watch.record(*args)
        except NonFinite as exc:
            self._event(events, step, "non_finite", [watch.name], f"{exc} holds NaN or Inf")
        except Exception as exc:
            watch.disable(failure_reason(exc), step)
            events.append(("watch_disabled", watch.name, watch.disabled))
            self._notify(functools.partial(self._release, watch, step))
        return None


def failure_reason(exc: BaseException) -> str:
    """A watch's failure in one line: a usage error as it is, anything else with its type."""
    return str(exc) if isinstance(exc, ProbeUsageError) else \
        f"{type(exc).__name__}: {exc}".splitlines()[0]


def skipped_step(transfer: Transfer, scale_now: float) -> str | None:
    """Why a GradScaler skipped the optimizer step of a probe step with finite scaled gradients
    (its scale fell since), or None. A step whose scaled gradients overflowed is recorded as
    skipped when it is made."""
    values = transfer.values()
    if not bool(torch.isfinite(values["gram"]).all()):
        return None
    scale = float(values["grad_scale"])
    if scale_now >= scale:
        return None
    return (f"GradScaler skipped the optimizer step (inf/NaN in the scaled gradients); its "
            f"scale fell from {scale:g} to {scale_now:g}")


def run_meta(probe: Any, watches: Any, ranks: Any, scaler: Any) -> dict[str, Any]:
    """The run file's metadata: what the probe records and how (its losses, roles, cadence,
    shared set, watches)."""
    probed = probe._shared or []
    shared = [p for p in probed if probe._jacobian.blocks.in_core(p)]
    return {
        "run_name": probe.run_name,
        "gradprobe_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "losses": probe._losses or [],
        "task": probe.task,
        "roles": probe.roles,
        "roles_guessed": [n for n in probe._losses or [] if n not in probe._role_reader.declared],
        "role_records": probe._role_reader.records,
        "every": probe.every,
        "cadence": describe_cadence(probe.every),
        "shared_parameters": [probe._names.get(id(p), f"<unnamed {tuple(p.shape)}>")
                              for p in shared],
        "shared_numel": int(sum(p.numel() for p in shared)),
        # the parameters the per-layer blocks (grad_gram_layer) cover: the whole shared set
        "layer_blocks_numel": int(sum(p.numel() for p in probed)),
        "backward_path": probe.backward_path,
        "latents": sorted(watches.latents),
        "prototypes": {n: w.latent for n, w in watches.prototypes.items()},
        "saturations": sorted(watches.saturations),
        "contrastive": sorted(watches.contrastive),
        "expect_groups_per_batch": probe.expect_groups_per_batch,
        "max_rows": probe.max_rows,
        "world_size": 1 if ranks is None else ranks.world,
        # Under DDP: statistics of the all-reduced (mean) gradients and the gathered batch.
        "gradient_statistics": "global",
        "grad_scaler": scaler is not None and bool(scaler.is_enabled()),
    }


def grad_norms(losses: list[str], transfer: Transfer) -> dict[str, float]:
    """``{loss name: |g_k|}`` of a recorded probe step, from its Gram matrix's diagonal."""
    norms = transfer.values()["gram"].diagonal().clamp_min(0.0).sqrt().tolist()
    return dict(zip(losses, norms))


def probe_state(writer: Any, step: int, every: int | None,
                prototypes: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`Probe.state_dict` returns: the recorded run itself, as plain data."""
    try:
        data = writer.to_bytes()
    except RunFileError as exc:
        # A broken run file must not break the user's checkpoint save.
        warn_user(f"gradprobe: the recorded run could not be read for the checkpoint "
                  f"({exc}); the run file on disk keeps what was written")
        data = b""
    return {
        "format": STATE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "gradprobe_version": __version__,
        "step": step,
        "every": every,
        "log": str(writer.path) if writer.path else "",
        "database": torch.frombuffer(bytearray(data), dtype=torch.uint8),
        "prototypes": prototypes,
    }


def check_state(state: Mapping[str, Any]) -> int:
    """The step a probe state resumes at; ``ProbeUsageError`` for what is not one."""
    if state.get("format") != STATE_FORMAT:
        raise ProbeUsageError("not a gradprobe probe state (no format marker)")
    if int(state.get("schema_version", -1)) != SCHEMA_VERSION:
        raise ProbeUsageError(f"probe state has schema version {state.get('schema_version')}, "
                              f"this gradprobe reads {SCHEMA_VERSION}")
    return int(state["step"])


def resumed_writer(writer: Any, state: Mapping[str, Any]) -> Any:
    """The writer to go on with: ``writer`` where its run file holds steps already, else a new
    one over the copy of the run that ``state`` carries (a new or missing run file)."""
    if writer.last_step() is not None:
        return writer
    path = writer.path
    writer.close()
    return BackgroundRunWriter(path, initial_bytes=state["database"].numpy().tobytes(),
                               overwrite=True)
