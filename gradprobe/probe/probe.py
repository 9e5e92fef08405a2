"""The probe: attach to a multi-loss model and record per-loss gradient statistics.

Cadence: a non-probe step costs the weighted sum and one ordinary backward, nothing else.
On a probe step the per-loss gradients are taken with ``torch.autograd.grad`` (exact, no
estimates), their Gram matrix G = J J^T on the shared parameters is recorded, and the
parameters' ``.grad`` is filled either from those same gradients (the *assembled* path:
no extra backward) or by the ordinary backward (the *separate* path). docs/probe.md says
which path runs when.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from gradprobe import __version__, metrics
from gradprobe.record import ROLES, STATE_FORMAT, SCHEMA_VERSION, RunFileError, RunWriter

from .cadence import describe as describe_cadence, is_probe_step
from .distributed import rank_group_for
from .graph import has_user_hooks, infer_shared, reachable_leaves
from .live import LiveFindings
from .watches import (ContrastiveWatch, LatentWatch, NonFinite, PrototypeWatch,
                      ProbeUsageError, SaturationWatch, as_matrix, batch_scalars, latent_pair)


# Substrings of common loss names, checked in this order, for roles the user did not give.
_ROLE_HINTS = (
    ("task", ("task", "ce", "bce", "mse", "xent", "cls", "pred", "main", "sup")),
    ("contrastive", ("cont", "nce", "clr", "simclr", "moco", "triplet")),
    ("prototype", ("proto", "center", "centroid", "cluster")),
    ("orthogonality", ("orth",)),
    ("decorrelation", ("corr", "decor", "hsic", "mi")),
    ("adversarial", ("adv", "domain", "grl", "disc", "gan")),
    ("reconstruction", ("rec", "recon", "ae")),
    ("kl", ("kl", "kld", "prior")),
    ("regularization", ("reg", "l1", "l2", "sparse", "wd", "entropy")),
)

RESERVED_OBSERVE = ("groups",)


@dataclass
class PerLossGradients:
    """The per-loss gradients of one probe step: rows of the Jacobian J, split by input kind."""

    path: str
    weights: torch.Tensor
    inputs: list[torch.Tensor]  # shared parameters, then other leaves, then latents
    grads: list[tuple[torch.Tensor | None, ...]]  # one tuple per loss, aligned with inputs
    n_shared: int
    n_others: int
    latent_names: list[str]
    per_loss_leaves: list[dict]
    shared_ids: set[int]
    scale: float  # the GradScaler's scale the gradients carry (1.0 without one)


@dataclass
class StepNumbers:
    """What one probe step records, before the metrics: global (all ranks') values under DDP."""

    loss_values: torch.Tensor  # [K] float64
    jacobian: torch.Tensor  # [K, P] float64: unscaled per-loss gradients on the shared set
    latent_grad_sq: torch.Tensor  # [L, K] float64: squared norms of dL_k / d latent
    observed: dict[str, Any]  # watched tensors by name (gathered over the ranks under DDP)
    local_groups: torch.Tensor | None  # this rank's batch: what a per-rank loss sees


@dataclass
class ProbeStep:
    """A step between :meth:`Probe.before_backward` and :meth:`Probe.after_backward`."""

    step: int
    probing: bool
    losses: Mapping[str, torch.Tensor]
    total: torch.Tensor
    gradients: PerLossGradients | None
    scaler: Any


class GradprobeWarning(UserWarning):
    """Something the probe noticed or could not do; training continues."""


def is_compiled(model: torch.nn.Module) -> bool:
    """A ``torch.compile``d module (possibly inside DDP)."""
    inner = getattr(model, "module", model)
    return any(type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")
               for m in (model, inner))


def guess_role(name: str) -> str:
    lowered = name.lower()
    for role, hints in _ROLE_HINTS:
        if any(lowered == h or lowered.startswith(h) or h in lowered.split("_") for h in hints):
            return role
    return "other"


class Probe:
    """Records per-loss gradient statistics of a multi-loss model on the shared parameters.

    Parameters
    ----------
    model: the ``nn.Module`` being trained (parameter names come from it).
    shared: a module, or parameters, the losses compete for. ``None``: inferred at the first
        probe step as the layer nearest the losses that every path of every loss's gradient
        crosses (docs/probe.md; ``shared="all"``: every parameter two or more losses reach).
    every: a fixed probe cadence in steps (step 0 is a probe step). ``None`` (the default):
        dense at the start, then thinning out: every step before step 4, every 2nd from 4,
        every 4th from 16, ... every 64th from step 4,096 on (a 300-step run gets 49 probe
        steps, a 100,000-step run 1,689); docs/probe.md has the schedule.
    log: path of the run file (SQLite, crash-safe); ``None`` keeps the run in memory
        (it still travels in ``state_dict()``).
    task: the primary loss (default: the first key of the first ``backward`` call).
    roles: ``{loss name: role}`` with roles from :data:`ROLES`; omitted names are guessed
        from common names and the run file says which roles were guessed.
    expect_groups_per_batch: what the batch sampler is meant to give (e.g. 1 for
        single-group batches), so diagnosis can tell when the batches look otherwise.
    max_rows: rows of each latent used per probe step (a bounded sample).
    assemble: fill ``.grad`` from the per-loss gradients instead of running the ordinary
        backward on probe steps (saves one backward; equal up to float32 rounding).
    overwrite: replace an existing run file instead of refusing it.
    sinks: objects with ``write_step(step, scalars)`` (``scalars``: ``{(quantity, name):
        value}``) that also receive every recorded step, e.g.
        :class:`gradprobe.integrations.tensorboard.TensorBoardSink`. A sink that also has
        ``write_finding(step, finding)`` receives each finding as ``on_finding`` does, e.g.
        :class:`gradprobe.integrations.wandb.WandbSink`.
    on_finding: ``callback(finding)``, called once when a finding first appears at warning or
        error while the run trains (a :class:`gradprobe.diagnose.Finding`); see
        :meth:`findings` and docs/live.md. Never called from inside a backward; an exception
        it raises is reported once and training goes on.
    findings_every: with ``on_finding`` or a finding sink, the run recorded so far is
        diagnosed at the start of ``backward`` on every step that is a multiple of this (when
        something new was committed since).

    With a ``DistributedDataParallel`` model the statistics describe the global (all-reduced)
    gradients and the global batch, only rank 0 writes ``log`` (and feeds the sinks), and
    parameter names drop DDP's ``module.`` prefix; docs/distributed.md has the details.
    """

    def __init__(self, model: torch.nn.Module, shared: Any = None, *, every: int | None = None,
                 log: str | Path | None = None, task: str | None = None,
                 roles: Mapping[str, str] | None = None, name: str | None = None,
                 expect_groups_per_batch: int | None = None, max_rows: int = 1024,
                 assemble: bool = False, overwrite: bool = False, sinks: Iterable[Any] = (),
                 on_finding: Callable[[Any], Any] | None = None, findings_every: int = 500):
        if not isinstance(model, torch.nn.Module):
            raise ProbeUsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if is_compiled(model):
            raise ProbeUsageError(
                "Probe cannot attach to a torch.compile'd model: its forward is one fused "
                "autograd node, so every loss appears to reach every parameter (the shared "
                "set and inert losses cannot be found) and forward hooks on its submodules "
                "do not run. Attach the probe to the eager model (compiled._orig_mod) and "
                "train with that model on the runs you want to probe")
        for sink in sinks:
            if not callable(getattr(sink, "write_step", None)):
                raise ProbeUsageError(f"sink {sink!r} has no write_step(step, scalars) method")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ProbeUsageError(f"every must be a positive integer (probe cadence in steps) or "
                                  f"None (the default schedule), got {every!r}")
        if on_finding is not None and not callable(on_finding):
            raise ProbeUsageError(f"on_finding must be a callable taking a finding, got "
                                  f"{type(on_finding).__name__}")
        if isinstance(findings_every, bool) or not isinstance(findings_every, int) \
                or findings_every < 1:
            raise ProbeUsageError(f"findings_every must be a positive integer (steps), got "
                                  f"{findings_every!r}")
        for loss_name, role in (roles or {}).items():
            if role not in ROLES:
                raise ProbeUsageError(f"unknown role {role!r} for loss {loss_name!r}; "
                                      f"roles are: {', '.join(ROLES)}")
        self.model = model
        self.every = every
        self.task = task
        self.roles = dict(roles or {})
        self.expect_groups_per_batch = expect_groups_per_batch
        self.max_rows = max_rows
        self.assemble = assemble
        self.run_name = name or (Path(log).stem if log else "run")
        self.step = 0
        self.enabled = True
        self.last_grad_norms: dict[str, float] | None = None
        self._ranks = rank_group_for(model)
        self._writes = self._ranks is None or self._ranks.writes
        # Names of the module DDP wraps: the same names as a single-process run of the model.
        unwrapped = model.module if isinstance(
            model, torch.nn.parallel.DistributedDataParallel) else model
        self._names = {id(p): n for n, p in unwrapped.named_parameters()}
        self._sinks = list(sinks) if self._writes else []
        self._failure: str | None = None
        self._scaler: Any = None
        self._scale_check: tuple[int, float] | None = None  # (probe step, scale it ran with)
        self._shared_spec = shared
        self._shared: list[torch.Tensor] | None = self._resolve_shared(shared)
        self._latents: dict[str, LatentWatch] = {}
        self._prototypes: dict[str, PrototypeWatch] = {}
        self._saturations: dict[str, SaturationWatch] = {}
        self._contrastive: dict[str, ContrastiveWatch] = {}
        self._captured: dict[str, Any] = {}
        self._jacobian_buffer: torch.Tensor | None = None
        self._losses: list[str] | None = None
        self._warned: set[tuple[str, str]] = set()
        self._roles_guessed: list[str] = []
        self._resumed = False
        self._meta_written = False
        self.backward_path = "separate"
        if not self._writes:
            # Ranks other than 0 record nothing: no file, no lock, never a wait on I/O.
            log = None
        self._writer = RunWriter(log, overwrite=overwrite)
        self._live = LiveFindings(on_finding, findings_every, GradprobeWarning)
        self._existing_steps = self._writer.last_step() is not None

    # -- what to watch ---------------------------------------------------------------------

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "|" in name:
            raise ProbeUsageError(f"watch names must be non-empty strings without '|', got {name!r}")
        if name in self._observable_names() | set(self._prototypes):
            raise ProbeUsageError(f"the name {name!r} is already watched (names must be unique)")

    def watch_latent(self, name: str, module: torch.nn.Module | None = None, *,
                     labels: str | None = None,
                     select: int | str | Callable[[Any], torch.Tensor] | None = None,
                     every: int | None = None) -> None:
        """Record a latent ([batch, dim]): from ``module``'s forward output, or ``observe(name=...)``.

        ``labels``: the name of an observed tensor holding the class label of each row (e.g.
        ``labels="y"`` with ``observe(y=...)``, or ``labels="groups"``). The number of
        classes it shows tells the diagnosis that a supervised latent whose rank settles
        near classes - 1 has the geometry of neural collapse, not a collapse.

        ``select`` picks the latent from a module that returns more than a tensor: an index
        (``select=0`` for ``(rep, mask)``), a key (``select="z"`` for a dict, or an attribute
        of a dataclass or named tuple) or a function of the output (``select=lambda out:
        out.hidden[-1]``). Without it, a tuple or list whose first element is a tensor gives
        that first element (one warning says so). A latent that cannot be read is dropped
        alone, with one warning and a ``watch_disabled`` event; the rest goes on recording.
        """
        self._check_new_name(name)
        self._check_observed_name(f"latent {name!r}: labels", labels, name)
        watch = LatentWatch(name, module, labels, every, select)
        if module is not None:
            watch.handle = module.register_forward_hook(self._capture_output(name))
        self._latents[name] = watch

    def watch_prototypes(self, name: str, source: Any, *, latent: str | None = None,
                         every: int | None = None) -> None:
        """Record a prototype matrix (tensor, Parameter, buffer or zero-argument callable).

        ``latent``: the watched latent the prototypes summarise (rows indexed by the group
        ids passed as ``observe(groups=...)``), for usage and lag.
        """
        self._check_new_name(name)
        if not (isinstance(source, torch.Tensor) or callable(source)):
            raise ProbeUsageError(f"prototypes {name!r}: pass a tensor, Parameter, buffer or a "
                                  f"zero-argument callable, got {type(source).__name__}")
        self._prototypes[name] = PrototypeWatch(name, source, latent, every)

    def watch_saturation(self, name: str, module: torch.nn.Module | None = None, *,
                         temperature: Any = None, threshold: float = metrics.SATURATION_THRESHOLD,
                         terms: tuple[str, str] | None = None, target: str | None = None,
                         every: int | None = None) -> None:
        """Record the inputs of a sigmoid (its logits).

        ``module``: an ``nn.Sigmoid`` (its input is recorded), or the layer that computes the
        logits a functional ``torch.sigmoid`` then reads (its *output* is recorded); without
        a module, the logits passed as ``observe(name=...)``. ``target``: the name of an
        observed tensor holding what each sigmoid output is trained towards (0/1 labels or
        probabilities, one per logit), e.g. ``target="y"`` with ``observe(y=...)``: the
        diagnosis then tells a saturation towards the targets (harmless) from one on the
        wrong side of them. ``temperature``: a number or callable recorded beside it;
        ``terms``: the names of two energy terms passed to ``observe`` (e.g.
        ``("U_I", "R_E")``) whose scale ratio is kept.
        """
        self._check_new_name(name)
        for term in terms or ():
            self._check_new_name(term)
        self._check_observed_name(f"saturation {name!r}: target", target, name,
                                  allow_groups=False)
        watch = SaturationWatch(name, module, temperature, threshold,
                                tuple(terms) if terms else None, target, every)
        if isinstance(module, torch.nn.Sigmoid):
            watch.handle = module.register_forward_pre_hook(self._capture_input(name))
        elif module is not None:
            watch.handle = module.register_forward_hook(self._capture_output(name))
        self._saturations[name] = watch

    def _check_observed_name(self, what: str, value: str | None, name: str, *,
                             allow_groups: bool = True) -> None:
        """A watch's extra input: the name of a tensor passed to ``observe`` that no watch
        records itself (several watches may share it)."""
        if value is None or (allow_groups and value == "groups"):
            return
        watched = {name, *self._latents, *self._saturations, *self._contrastive,
                   *self._prototypes, *RESERVED_OBSERVE}
        if not isinstance(value, str) or not value or "|" in value or value in watched:
            raise ProbeUsageError(f"{what} must name a tensor passed to observe() that is not "
                                  f"itself watched, got {value!r}")

    def watch_contrastive(self, name: str, *, temperature: float = 0.1,
                          every: int | None = None) -> None:
        """Record an InfoNCE batch passed as ``observe(name=(anchors, positives))``."""
        self._check_new_name(name)
        self._contrastive[name] = ContrastiveWatch(name, temperature, every)

    # -- the training loop -------------------------------------------------------------------

    @property
    def is_probe_step(self) -> bool:
        """Whether the current step (the next ``backward``) records."""
        return self.enabled and is_probe_step(self.step, self.every)

    def _capture_output(self, name: str) -> Callable:
        def hook(module, inputs, output):
            if self.is_probe_step:
                self._captured[name] = output
        return hook

    def _capture_input(self, name: str) -> Callable:
        def hook(module, inputs):
            if self.is_probe_step and inputs:
                self._captured[name] = inputs[0]
        return hook

    def _observable_names(self) -> set[str]:
        """Every name ``observe`` accepts: the watches fed by it, energy terms, ``groups``."""
        names = set(self._latents) | set(self._saturations) | set(self._contrastive) | \
            set(RESERVED_OBSERVE)
        for watch in self._saturations.values():
            names.update(watch.observed_names())
        names.update(w.labels for w in self._latents.values() if w.labels)
        return names

    def observe(self, **tensors: Any) -> None:
        """Hand the probe tensors it watches (latents, sigmoid inputs, pairs, ``groups``)."""
        known = self._observable_names()
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise ProbeUsageError(f"observe() got {', '.join(map(repr, unknown))}, which no watch "
                                  f"expects; watched names: {', '.join(sorted(known))}")
        if self.is_probe_step:
            self._captured.update(tensors)

    def _validate(self, losses: Mapping[str, Any], weights: Mapping[str, Any]) -> None:
        if not isinstance(losses, Mapping) or not losses:
            raise ProbeUsageError("backward() needs a non-empty dict {loss name: 0-dim tensor}")
        names = list(losses)
        if self._losses is not None and names != self._losses:
            if set(names) != set(self._losses):
                raise ProbeUsageError(f"the losses changed from {self._losses} to {names}; "
                                      "pass the same loss names every step")
        device = None
        for loss_name, value in losses.items():
            if not isinstance(loss_name, str) or not loss_name or "|" in loss_name:
                raise ProbeUsageError(f"loss names must be non-empty strings without '|', "
                                      f"got {loss_name!r}")
            if not isinstance(value, torch.Tensor):
                raise ProbeUsageError(f"loss {loss_name!r} is a {type(value).__name__}, "
                                      "expected a 0-dim tensor")
            if value.ndim != 0:
                raise ProbeUsageError(f"loss {loss_name!r} has shape {list(value.shape)}; expected "
                                      "a scalar (0-dim) tensor: reduce it, e.g. with .mean()")
            if not value.is_floating_point():
                raise ProbeUsageError(f"loss {loss_name!r} has dtype {value.dtype}; expected "
                                      "a floating-point tensor")
            if value.device.type == "meta":
                raise ProbeUsageError(f"loss {loss_name!r} is on the meta device (shapes only, no "
                                      "data): compute the losses on a real device")
            if device is not None and value.device != device:
                raise ProbeUsageError(f"loss {loss_name!r} is on {value.device}, the others "
                                      f"on {device}; compute all losses on one device")
            device = value.device
        unknown = sorted(set(weights) - set(losses))
        if unknown:
            raise ProbeUsageError(f"weights for unknown losses {unknown}; the losses are "
                                  f"{sorted(losses)}")
        for loss_name, w in weights.items():
            if isinstance(w, torch.Tensor):
                if w.numel() != 1:
                    raise ProbeUsageError(f"weight {loss_name!r} must be a float or a 0-dim "
                                          f"tensor, got shape {list(w.shape)}")
            elif isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ProbeUsageError(f"weight {loss_name!r} must be a float or a 0-dim tensor, "
                                      f"got {type(w).__name__} {w!r}")
        if self.task is not None and self.task not in losses:
            raise ProbeUsageError(f"task loss {self.task!r} is not among the losses {names}")

    def backward(self, losses: Mapping[str, torch.Tensor],
                 weights: Mapping[str, Any] | None = None, *,
                 scaler: "torch.amp.GradScaler | None" = None) -> torch.Tensor:
        """Backpropagate ``sum_k w_k L_k`` (missing weights are 1.0); returns the detached total.

        On probe steps the per-loss gradient statistics are recorded as well. ``scaler``: a
        ``torch.amp.GradScaler``; the backward is then ``scaler.scale(total).backward()`` and
        the recorded gradients are unscaled. Call ``scaler.step`` and ``scaler.update`` as usual.
        """
        pending = self.before_backward(losses, weights, scaler=scaler, assemble=self.assemble)
        if pending.gradients is not None and pending.gradients.path == "assembled":
            self._assemble(pending.gradients)
        elif scaler is not None:
            # The user's own backward stays outside any try: its errors are theirs to see.
            scaler.scale(pending.total).backward()
        else:
            pending.total.backward()
        self.after_backward(pending)
        return pending.total.detach()

    def before_backward(self, losses: Mapping[str, torch.Tensor],
                        weights: Mapping[str, Any] | None = None, *, scaler: Any = None,
                        assemble: bool = False) -> ProbeStep:
        """For loops that run the backward themselves (e.g. Lightning): the first half of
        :meth:`backward`. Returns the step; backpropagate ``step.total`` (scaled, with a
        scaler), then call :meth:`after_backward` with it.
        """
        if self._writes:  # a safe point: between optimiser steps, outside any backward
            self._live.at_safe_point(self.step, self._writer, self._sinks)
        weights = dict(weights or {})
        # The full check runs when anything differs from the last step that passed it.
        if (self._losses is None or list(losses) != self._losses
                or not weights.keys() <= losses.keys()):
            self._validate(losses, weights)
        if self._losses is None:
            self._start(list(losses))
        total = sum(weights.get(k, 1.0) * v for k, v in losses.items())
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            raise ProbeUsageError("no loss requires grad: every loss is computed from detached "
                                  "tensors, so nothing can be trained")
        self._check_skipped()
        self._scaler = scaler
        probing = self.is_probe_step
        gradients = None
        if probing and self._failure is None:
            try:
                self._pick_latents()
                gradients = self._per_loss_gradients(losses, weights, scaler, assemble)
            except Exception as exc:  # the observer must not harm the observed
                self._fail(exc)
        return ProbeStep(self.step, probing, losses, total, gradients, scaler)

    def after_backward(self, pending: ProbeStep) -> None:
        """The second half of :meth:`backward`: records the probe step, advances the counter."""
        if pending.probing:
            self._finish(pending)
        self._captured.clear()
        self.step += 1

    def findings(self, thresholds: Any = None) -> list:
        """The findings of the run recorded so far (``gradprobe analyze`` on the run file now).

        Reads what the run file holds, as another reader would (nothing is flushed, nothing
        waits for the device); diagnoses again only when something new was committed since the
        last call, else returns the same findings. ``thresholds``: a
        :class:`gradprobe.diagnose.Thresholds`. Under DDP, ranks other than 0 record nothing
        and get ``[]``. A run kept in memory (``log=None``) is copied for each call.

        The probe stage imports ``gradprobe.diagnose`` (a later stage) here, inside the call:
        the one documented exception to the one-way stage rule (gradprobe/probe/live.py).
        docs/live.md has what a call costs.
        """
        if not self._writes:
            return []
        return self._live.findings(self._writer, thresholds)

    def log(self, **scalars: Any) -> None:
        """Record extra scalars (learning rate, validation losses...) at the current step.

        Under DDP only rank 0 records them (other ranks ignore the call).
        """
        if not self.enabled or not self._writes:
            return
        try:
            values = {}
            for key, value in scalars.items():
                if isinstance(value, torch.Tensor):
                    value = value.detach()
                    if value.numel() != 1:
                        raise ProbeUsageError(f"log({key}=...) needs a number, got shape "
                                              f"{list(value.shape)}")
                values[("logged", key)] = float(value)
            step = max(self.step - 1, 0)
            self._writer.add_scalars(step, values)
            self._to_sinks(step, values)
        except ProbeUsageError:
            raise
        except Exception as exc:
            self._fail(exc)

    # -- the probe step ------------------------------------------------------------------

    def _start(self, names: list[str]) -> None:
        if self._existing_steps and not self._resumed:
            self._writer.close()
            raise ProbeUsageError(
                f"run file {self._writer.path} already holds a recorded run; choose another "
                "log= path, pass overwrite=True, or load_state_dict() to resume it")
        self._losses = names
        if self.task is None:
            self.task = names[0]
        guessed = []
        for loss_name in names:
            if loss_name not in self.roles:
                self.roles[loss_name] = "task" if loss_name == self.task else guess_role(loss_name)
                guessed.append(loss_name)
        self._roles_guessed = guessed

    def _pick_latents(self) -> None:
        """Each latent watch's tensor from what its hook or ``observe`` captured; a watch that
        cannot read it is dropped here, before any gradient is taken."""
        for name, watch in self._latents.items():
            if name not in self._captured:
                continue
            if watch.disabled is not None:
                del self._captured[name]
                continue
            try:
                self._captured[name], note = watch.pick(self._captured[name])
            except Exception as exc:  # a select function of the user's may raise anything
                del self._captured[name]
                self._drop_watch(watch, exc)
                continue
            if note is not None and ("picked", name) not in self._warned:
                self._warned.add(("picked", name))
                warnings.warn(f"gradprobe: {note}", GradprobeWarning, stacklevel=4)

    def _drop_watch(self, watch: Any, exc: BaseException) -> None:
        """Disable one watch that cannot record: one warning, one ``watch_disabled`` event;
        the losses' statistics and every other watch go on.

        Under DDP the failure disables the probe instead (on every rank, at the next vote):
        every rank must take the same per-loss gradients and gather the same tensors, and a
        watch dropped on one rank only would break those collectives.
        """
        if self._ranks is not None:
            raise exc
        if watch.disabled is not None:
            return
        reason = str(exc) if isinstance(exc, ProbeUsageError) else \
            f"{type(exc).__name__}: {exc}".splitlines()[0]
        watch.disabled = reason
        if watch.handle is not None:
            watch.handle.remove()
            watch.handle = None
        warnings.warn(f"gradprobe: step {self.step}: watch {watch.name!r} disabled ({reason}); "
                      "the losses and the other watches go on recording", GradprobeWarning,
                      stacklevel=5)
        self._writer.add_event(self.step, "watch_disabled", watch.name, reason)

    def _resolve_shared(self, shared: Any) -> list[torch.Tensor] | None:
        if shared is None or shared == "all":
            return None
        if isinstance(shared, torch.nn.Module):
            params = [p for p in shared.parameters() if p.requires_grad]
        elif isinstance(shared, torch.Tensor):
            params = [shared]
        elif isinstance(shared, Iterable) and not isinstance(shared, str):
            params = list(shared)
        else:
            raise ProbeUsageError(f"shared must be a module, parameters, None or 'all', "
                                  f"got {shared!r}")
        if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
            raise ProbeUsageError("shared must name at least one parameter that requires grad")
        return params

    def _choose_path(self, per_loss_leaves: list[dict], weights: Mapping[str, Any],
                     assemble: bool) -> str:
        """'assembled' fills .grad from the per-loss gradients; 'separate' runs the ordinary backward.

        'separate' is the default: the parameter updates are then bit-identical to training
        without the probe. ``assemble=True`` saves that backward (worth it when the shared
        set reaches deep into the model, where each per-loss pass costs a full backward) and
        gives the same ``.grad`` up to float32 rounding; it is used only when the ordinary
        backward has no side effects of its own: no DDP reducer, no hooks on the leaves, no
        loss weight that itself needs a gradient.
        """
        if not assemble:
            return "separate"
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return "separate"
        if any(isinstance(w, torch.Tensor) and w.requires_grad for w in weights.values()):
            return "separate"
        if any(has_user_hooks(t) for leaves in per_loss_leaves for t, _ in leaves.values()):
            return "separate"
        return "assembled"

    def _per_loss_gradients(self, losses: Mapping[str, torch.Tensor],
                            weights: Mapping[str, Any], scaler: Any,
                            assemble: bool) -> "PerLossGradients":
        """One ``torch.autograd.grad`` per loss, over the shared parameters and watched latents
        (and, on the assembled path, every other leaf, so that ``.grad`` can be filled exactly)."""
        names = self._losses
        per_loss_leaves = [reachable_leaves(losses[k]) for k in names]
        if self._shared is None:
            regularisers = [k for k, n in enumerate(names) if self.roles[n] == "regularization"]
            self._shared = infer_shared([losses[k] for k in names], self._names,
                                        task=names.index(self.task), exempt=regularisers,
                                        whole=self._shared_spec == "all")
            if not self._shared:
                raise ProbeUsageError("no parameter of the model receives gradient from "
                                      + ("two or more losses" if self._shared_spec == "all"
                                         else "the losses")
                                      + ": there is nothing shared to probe (pass shared=...)")
        all_leaves: dict[int, torch.Tensor] = {}
        for leaves in per_loss_leaves:
            all_leaves.update((k, t) for k, (t, _) in leaves.items())
        path = self._choose_path(per_loss_leaves, weights, assemble)
        self.backward_path = path
        latents = {n: t for n, t in self._captured.items()
                   if n in self._latents and isinstance(t, torch.Tensor) and t.requires_grad}
        shared_ids = {id(p) for p in self._shared}
        others = [t for k, t in all_leaves.items() if k not in shared_ids] \
            if path == "assembled" else []
        inputs = list(self._shared) + others + list(latents.values())
        # With a GradScaler the per-loss gradients are taken of the scaled losses, as the
        # ordinary backward is (small half-precision gradients would underflow otherwise);
        # the recorded statistics divide the scale out again.
        scale = 1.0 if scaler is None else float(scaler.get_scale()) if scaler.is_enabled() \
            else 1.0
        grads = []
        for loss_name in names:
            loss = losses[loss_name]
            if not loss.requires_grad:
                grads.append((None,) * len(inputs))
                continue
            if scale != 1.0:
                loss = scaler.scale(loss)
            # The graph is kept so that a failure anywhere in the probe step can still fall
            # back to the ordinary backward; it is freed when the loop drops its losses.
            grads.append(torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True))
        w = torch.tensor([float(weights.get(k, 1.0)) for k in names], dtype=torch.float64)
        return PerLossGradients(path, w, inputs, grads, len(self._shared), len(others),
                                list(latents), per_loss_leaves, shared_ids, scale)

    @staticmethod
    def _assemble(gradients: "PerLossGradients") -> None:
        """``.grad += sum_k w_k g_k``: what the ordinary backward of the weighted sum gives."""
        n_params = gradients.n_shared + gradients.n_others
        weights = gradients.weights.tolist()
        for j, param in enumerate(gradients.inputs[:n_params]):
            combined = None
            for k, per_loss in enumerate(gradients.grads):
                g = per_loss[j]
                if g is None:
                    continue
                term = g if weights[k] == 1.0 else g * weights[k]
                combined = term if combined is None else combined + term
            if combined is None:
                continue
            param.grad = combined if param.grad is None else param.grad + combined

    # -- recording a probe step -------------------------------------------------------

    def _finish(self, pending: ProbeStep) -> None:
        if self._ranks is None:
            if pending.gradients is None:  # the probe failed earlier in this step
                return
            try:
                numbers = self._local_numbers(pending.losses, pending.gradients)
                self._record(pending.step, pending.gradients, numbers)
            except Exception as exc:
                self._fail(exc)
            return
        self._finish_distributed(pending)

    def _finish_distributed(self, pending: ProbeStep) -> None:
        """Vote, then all-reduce and all-gather, then (rank 0 only) the metrics and the write."""
        names = self._gathered_names()
        numbers, rows = None, [0] * len(names)
        if self._failure is None and pending.gradients is not None:
            try:
                numbers = self._local_numbers(pending.losses, pending.gradients)
                rows = [self._rows(numbers.observed.get(n)) for n in names]
            except Exception as exc:
                self._fail(exc)
        try:
            failed, rows = self._ranks.agree(self._failure is not None, rows)
            if not failed:
                numbers = self._globalize(numbers, names, rows)
        except Exception as exc:  # the process group itself failed: nothing left to agree on
            self._fail(exc)
            self._stop()
            return
        if failed:
            if self._failure is None:
                self._report_failure("the probe failed on another rank, whose warning says why")
            self._stop()
            return
        if self._writes:
            try:
                self._record(pending.step, pending.gradients, numbers)
            except Exception as exc:  # the other ranks stop with this one at the next vote
                self._fail(exc)

    def _gathered_names(self) -> list[str]:
        """Watched tensors whose statistics use every rank's rows (the same list on all ranks).

        Contrastive pairs stay per rank: an InfoNCE loss computed on each rank sees only its
        own batch as negatives, so that batch is what its signal describes.
        """
        return sorted(self._observable_names() - set(self._contrastive))

    @staticmethod
    def _rows(tensor: Any) -> int:
        return tensor.shape[0] if isinstance(tensor, torch.Tensor) and tensor.ndim else 0

    def _local_numbers(self, losses: Mapping[str, torch.Tensor],
                       gradients: PerLossGradients) -> StepNumbers:
        names, grads, n_shared = self._losses, gradients.grads, gradients.n_shared
        n_params = n_shared + gradients.n_others
        device = self._shared[0].device
        loss_values = torch.stack([losses[k].detach().to(device, torch.float64) for k in names])
        # The float64 Jacobian of a large shared set is the biggest thing a probe step
        # allocates: one buffer, kept between probe steps (a fresh one costs a page fault per
        # 4 KiB: 14 ms for 4 losses x 2.6M parameters) and filled in place.
        sizes = [p.numel() for p in self._shared]
        shape = (len(names), sum(sizes))
        jacobian = self._jacobian_buffer
        if jacobian is None or jacobian.shape != shape or jacobian.device != device:
            jacobian = self._jacobian_buffer = torch.empty(shape, dtype=torch.float64,
                                                           device=device)
        for k, per_loss in enumerate(grads):
            offset = 0
            for g, size in zip(per_loss[:n_shared], sizes):
                segment = jacobian[k, offset:offset + size]
                if g is None:
                    segment.zero_()
                else:
                    segment.copy_(g.reshape(-1))
                offset += size
        if gradients.scale != 1.0:
            jacobian /= gradients.scale
        latent_grad_sq = torch.zeros(len(gradients.latent_names), len(names), dtype=torch.float64,
                                     device=device)
        for i in range(len(gradients.latent_names)):
            for k in range(len(names)):
                g = grads[k][n_params + i]
                if g is not None:
                    latent_grad_sq[i, k] = (g.to(device, torch.float64) / gradients.scale).square().sum()
        observed = dict(self._captured)
        groups = observed.get("groups")
        if groups is not None:
            observed["groups"] = torch.as_tensor(groups).detach().reshape(-1)
        if self._ranks is not None:
            # Checked here, before the vote: a malformed tensor on one rank must not reach a
            # collective whose shapes the other ranks expect to match.
            for name in self._gathered_names():
                if isinstance(observed.get(name), torch.Tensor) and name != "groups":
                    observed[name] = self._rows_matrix(name, observed[name])
        return StepNumbers(loss_values, jacobian, latent_grad_sq, observed, observed.get("groups"))

    def _rows_matrix(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A watched tensor as [rows, features], single or double precision, for the gather."""
        if name in self._latents:
            matrix = as_matrix(name, tensor, self.max_rows)
        else:
            if tensor.ndim == 0 or tensor.is_complex():
                raise ProbeUsageError(f"{name!r} must be a real tensor with a batch dimension, "
                                      f"got {tensor.dtype} of shape {list(tensor.shape)}")
            matrix = tensor.detach().reshape(tensor.shape[0], -1)
        # Integer labels and targets travel as float64, exact for any class id below 2^53.
        return matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.double()

    def _globalize(self, numbers: StepNumbers, names: list[str], rows: list[int]) -> StepNumbers:
        """The ranks' numbers combined into those of the global batch (see distributed.py)."""
        ranks = self._ranks
        k, p = numbers.jacobian.shape
        flat = torch.cat([numbers.loss_values, numbers.jacobian.reshape(-1),
                          numbers.latent_grad_sq.reshape(-1)])
        mean = ranks.mean(flat).to(numbers.jacobian.device)
        # The global loss is the mean of the ranks' losses, so d(global)/d(latent rows of rank r)
        # is the rank's own latent gradient divided by the world size: squared norms add up
        # divided by world^2, i.e. their mean divided by world.
        observed = dict(numbers.observed)
        per_rank = max(1, self.max_rows // ranks.world)
        for name, fewest in zip(names, rows):
            if fewest == 0:  # missing on some rank: nothing comparable to gather
                observed.pop(name, None)
            else:
                observed[name] = ranks.gather_rows(observed[name], min(fewest, per_rank))
        return StepNumbers(mean[:k], mean[k:k + k * p].reshape(k, p),
                           mean[k + k * p:].reshape(numbers.latent_grad_sq.shape) / ranks.world,
                           observed, numbers.local_groups)

    def _record(self, step: int, gradients: PerLossGradients, numbers: StepNumbers) -> None:
        names = self._losses
        w = gradients.weights
        per_loss_leaves, shared_ids = gradients.per_loss_leaves, gradients.shared_ids
        scalars: dict[tuple[str, str], float] = {}
        arrays: dict[tuple[str, str], np.ndarray] = {}
        loss_values = numbers.loss_values.cpu().tolist()
        non_finite = [(n, v) for n, v in zip(names, loss_values) if not np.isfinite(v)]
        if non_finite:
            listed = ", ".join(f"{n!r} = {v}" for n, v in non_finite)
            hint = " (an empty batch?)" if all(np.isnan(v) for _, v in non_finite) else ""
            self._event(step, "non_finite", non_finite[0][0],
                        f"non-finite loss: {listed}{hint}",
                        also=[n for n, _ in non_finite[1:]])
        for k, loss_name in enumerate(names):
            scalars[("loss", loss_name)] = loss_values[k]
            scalars[("weight", loss_name)] = float(w[k])
            reach = per_loss_leaves[k]
            if not reach:
                self._event(step, "inert_loss", loss_name,
                            f"loss {loss_name!r} has no gradient path to any parameter "
                            "(computed from detached tensors?): it trains nothing")
            elif not (set(reach) & shared_ids):
                # Recorded for every loss, but a regulariser touching only its own parameters
                # (an L2 penalty on one head) is that way by design: no warning.
                self._event(step, "no_shared_path", loss_name,
                            self._unshared_message(loss_name, reach, per_loss_leaves),
                            warn=self.roles[loss_name] != "regularization")
        if gradients.scale != 1.0:
            scalars[("grad_scale", "amp")] = gradients.scale
        jacobian = numbers.jacobian
        gram = (jacobian @ jacobian.T).cpu()
        arrays[("grad_gram", "shared")] = gram.numpy()
        if torch.isfinite(gram).all():
            stats = metrics.gram_statistics(gram, w)
            if gradients.scale != 1.0:
                # The scaler skips this step only if it finds inf/NaN; the next call checks.
                self._scale_check = (step, gradients.scale)
        else:
            if gradients.scale != 1.0:
                # Overflow of the scaled gradients is what a GradScaler expects now and then:
                # it skips the optimizer step and lowers the scale; not a failure of the model.
                self._event(step, "skipped_step", "scaler",
                            f"the scaled gradients (scale {gradients.scale:g}) hold inf/NaN: "
                            "GradScaler skips this optimizer step")
            else:
                self._event(step, "non_finite", "gradient",
                            "a per-loss gradient on the shared parameters holds NaN or Inf")
            nan_matrix = torch.full_like(gram, float("nan"))
            stats = {"norm": gram.diagonal().sqrt(), "weighted_norm": w.abs() * gram.diagonal().sqrt(),
                     "cosine": nan_matrix, "magnitude_similarity": nan_matrix,
                     "combined_norm": float("nan"),
                     "contribution": torch.full((len(names),), float("nan"), dtype=torch.float64)}
        self.last_grad_norms = {}
        for k, loss_name in enumerate(names):
            norm = float(stats["norm"][k])
            self.last_grad_norms[loss_name] = norm
            scalars[("grad_norm", loss_name)] = norm
            scalars[("weighted_grad_norm", loss_name)] = float(stats["weighted_norm"][k])
            scalars[("grad_contribution", loss_name)] = float(stats["contribution"][k])
            for j in range(k + 1, len(names)):
                pair = f"{loss_name}|{names[j]}"
                scalars[("grad_dot", pair)] = float(gram[k, j])
                scalars[("grad_cosine", pair)] = float(stats["cosine"][k, j])
                scalars[("magnitude_similarity", pair)] = float(stats["magnitude_similarity"][k, j])
        scalars[("combined_grad_norm", "shared")] = float(stats["combined_norm"])
        latent_norms = numbers.latent_grad_sq.sqrt().cpu().tolist()
        for i, latent_name in enumerate(gradients.latent_names):
            for k, loss_name in enumerate(names):
                scalars[("latent_grad_norm", f"{latent_name}|{loss_name}")] = latent_norms[i][k]
        self._record_watches(step, scalars, arrays, numbers.observed, numbers.local_groups)
        self._write(step, scalars, arrays)

    def _unshared_message(self, loss_name: str, reach: dict, per_loss_leaves: list[dict]) -> str:
        task_reach = per_loss_leaves[self._losses.index(self.task)]
        if loss_name != self.task and not (set(reach) & set(task_reach)):
            return (f"loss {loss_name!r} shares no parameter with the task loss {self.task!r} "
                    "(computed from detached features?): it reaches none of the shared parameters")
        return f"loss {loss_name!r} reaches none of the shared parameters"

    def _check_skipped(self) -> None:
        """Whether the GradScaler skipped the last probe step: it lowers its scale if it did."""
        if self._scale_check is None or self._scaler is None:
            return
        step, scale = self._scale_check
        self._scale_check = None
        try:
            now = float(self._scaler.get_scale())
            if now < scale:
                self._event(step, "skipped_step", "scaler",
                            f"GradScaler skipped the optimizer step (inf/NaN in the scaled "
                            f"gradients); its scale fell from {scale:g} to {now:g}")
        except Exception as exc:
            self._fail(exc)

    @staticmethod
    def _due(watch: Any, step: int) -> bool:
        return watch.disabled is None and (watch.every is None or step % watch.every == 0)

    def _watch_record(self, step: int, watch: Any, *args: Any) -> Any:
        """``watch.record(*args)``, or None: NaN/Inf in what it reads is a ``non_finite`` event,
        and any other failure drops this watch alone."""
        try:
            return watch.record(*args)
        except NonFinite as exc:
            self._event(step, "non_finite", watch.name, f"{exc} holds NaN or Inf")
        except Exception as exc:
            self._drop_watch(watch, exc)
        return None

    def _record_watches(self, step: int, scalars: dict, arrays: dict, captured: dict,
                        local_groups: torch.Tensor | None) -> None:
        """``captured``: the watched tensors (all ranks' rows under DDP); ``local_groups``: the
        group ids of this rank's own batch, which is what batch composition describes."""
        if local_groups is not None and local_groups.numel():
            scalars.update(batch_scalars(local_groups.cpu()))
        groups = captured.get("groups")
        if groups is not None:
            groups = groups.cpu()
        latents = {}
        for name, watch in self._latents.items():
            if name in captured and self._due(watch, step):
                labels = captured.get(watch.labels) if watch.labels else None
                got = self._watch_record(step, watch, captured[name], self.max_rows, labels)
                if got is not None:
                    scalars.update(got[0])
                    arrays.update(got[1])
                    latents[name] = captured[name]
        ordered = list(latents)
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                scalars.update(latent_pair(a, latents[a], b, latents[b], self.max_rows))
        for name, watch in self._prototypes.items():
            if self._due(watch, step):
                source = self._latents.get(watch.latent)
                feature = captured.get(watch.latent) \
                    if watch.latent and (source is None or source.disabled is None) else None
                got = self._watch_record(step, watch, step, feature, groups, self.max_rows)
                scalars.update(got or {})
        for name, watch in self._saturations.items():
            if name in captured and self._due(watch, step):
                got = self._watch_record(step, watch, captured[name], captured)
                if got is not None:
                    scalars.update(got[0])
                    arrays.update(got[1])
        for name, watch in self._contrastive.items():
            if name in captured and self._due(watch, step):
                scalars.update(self._watch_record(step, watch, captured[name], local_groups,
                                                  self.max_rows) or {})

    def _event(self, step: int, kind: str, name: str, message: str,
               also: Iterable[str] = (), warn: bool = True) -> None:
        """Record an event (for ``name`` and the names in ``also``) and warn once per kind and name."""
        if not self._writes:
            return
        names = [name, *also]
        for each in names:
            self._writer.add_event(step, kind, each, message)
        # A GradScaler skipping a step now and then is how it works: recorded, not warned.
        fresh = [(kind, each) for each in names if (kind, each) not in self._warned]
        if warn and kind != "skipped_step" and fresh:
            self._warned.update(fresh)
            warnings.warn(f"gradprobe: step {step}: {message}", GradprobeWarning, stacklevel=4)

    def _write_meta(self) -> None:
        if not self._meta_written:
            self._writer.set_meta(**self._meta())
            self._meta_written = True

    def _write(self, step: int, scalars: dict, arrays: dict) -> None:
        self._write_meta()
        self._writer.write_step(step, scalars, arrays)
        self._to_sinks(step, scalars)

    def _to_sinks(self, step: int, scalars: dict) -> None:
        """A sink that fails is dropped with one warning; the run file and training go on."""
        for sink in list(self._sinks):
            try:
                sink.write_step(step, scalars)
            except Exception as exc:
                self._sinks.remove(sink)
                warnings.warn(f"gradprobe: sink {type(sink).__name__} failed at step {step} "
                              f"({type(exc).__name__}: {exc}); it receives nothing more",
                              GradprobeWarning, stacklevel=4)

    def _meta(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "gradprobe_version": __version__,
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "losses": self._losses or [],
            "task": self.task,
            "roles": self.roles,
            "roles_guessed": self._roles_guessed,
            "every": self.every,
            "cadence": describe_cadence(self.every),
            "shared_parameters": [self._names.get(id(p), f"<unnamed {tuple(p.shape)}>")
                                  for p in self._shared or []],
            "shared_numel": int(sum(p.numel() for p in self._shared or [])),
            "backward_path": self.backward_path,
            "latents": sorted(self._latents),
            "prototypes": {n: w.latent for n, w in self._prototypes.items()},
            "saturations": sorted(self._saturations),
            "contrastive": sorted(self._contrastive),
            "expect_groups_per_batch": self.expect_groups_per_batch,
            "max_rows": self.max_rows,
            "world_size": 1 if self._ranks is None else self._ranks.world,
            # Under DDP: statistics of the all-reduced (mean) gradients and the gathered batch.
            "gradient_statistics": "global",
            "grad_scaler": self._scaler is not None and bool(self._scaler.is_enabled()),
        }

    def _fail(self, exc: BaseException) -> None:
        """Report once, stop probing, keep what was recorded; training goes on.

        Under DDP this rank stops recording now, and every rank stops together at the next
        probe step's vote (the others may be about to enter a collective with this one).
        """
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self._report_failure(message)
        if self._ranks is None:
            self._stop()

    def _report_failure(self, message: str) -> None:
        self._failure = message
        rank = "" if self._ranks is None else f" on rank {self._ranks.rank}"
        warnings.warn(f"gradprobe disabled itself{rank} at step {self.step} ({message}); training "
                      "continues and everything recorded before stays readable",
                      GradprobeWarning, stacklevel=4)
        if not self._writes:
            return
        try:
            # The metadata too, so that a run disabled before its first record still names
            # its losses and watches.
            self._write_meta()
            self._writer.add_event(self.step, "probe_disabled", "probe", message)
            self._writer.flush()
        except Exception:  # the run file itself may be what failed
            pass

    def _stop(self) -> None:
        self.enabled = False
        self._remove_hooks()

    # -- lifecycle ----------------------------------------------------------------------

    def _remove_hooks(self) -> None:
        for watch in list(self._latents.values()) + list(self._saturations.values()):
            if watch.handle is not None:
                watch.handle.remove()
                watch.handle = None

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, strings, lists, dicts) holding the recorded run itself.

        A checkpoint holding it loads with ``torch.load(path, weights_only=True)`` and can be
        analysed on its own with ``gradprobe analyze``.
        """
        try:
            data = self._writer.to_bytes()
        except RunFileError as exc:
            # A broken run file must not break the user's checkpoint save.
            warnings.warn(f"gradprobe: the recorded run could not be read for the checkpoint "
                          f"({exc}); the run file on disk keeps what was written",
                          GradprobeWarning, stacklevel=2)
            data = b""
        return {
            "format": STATE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "gradprobe_version": __version__,
            "step": self.step,
            "every": self.every,
            "log": str(self._writer.path) if self._writer.path else "",
            "database": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "prototypes": {n: w.state() for n, w in self._prototypes.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the step counter continues and the same run file is appended to."""
        if state.get("format") != STATE_FORMAT:
            raise ProbeUsageError("not a gradprobe probe state (no format marker)")
        if int(state.get("schema_version", -1)) != SCHEMA_VERSION:
            raise ProbeUsageError(f"probe state has schema version {state.get('schema_version')}, "
                                  f"this gradprobe reads {SCHEMA_VERSION}")
        self.step = int(state["step"])
        if self._writer.last_step() is None:
            # Nothing recorded here yet (a new or missing run file): continue from the copy
            # of the run that the state carries.
            path = self._writer.path
            self._writer.close()
            self._writer = RunWriter(path, initial_bytes=state["database"].numpy().tobytes(),
                                     overwrite=True)
        for name, proto_state in state.get("prototypes", {}).items():
            if name in self._prototypes:
                self._prototypes[name].load_state(proto_state)
        self._resumed = True

    def close(self) -> None:
        """Flush and close the run file and remove the hooks; safe to call twice."""
        self._check_skipped()
        self._remove_hooks()
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:
                warnings.warn(f"gradprobe: could not close the run file cleanly ({exc})",
                              GradprobeWarning, stacklevel=2)

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


