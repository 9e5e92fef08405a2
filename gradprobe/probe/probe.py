"""The probe: attach to a multi-loss model and record per-loss gradient statistics.

Cadence: a non-probe step costs the weighted sum and one ordinary backward, nothing else.
On a probe step the per-loss gradients are taken with ``torch.autograd.grad`` (exact, no
estimates), their Gram matrix G = J J^T on the shared parameters is recorded, and the
parameters' ``.grad`` is filled either from those same gradients (the *assembled* path:
no extra backward) or by the ordinary backward (the *separate* path). docs/probe.md says
which path runs when. The collaborators: argument checks (checks.py), per-loss gradients
(per_loss.py), recording a step on the writer thread (recording.py, transfer.py), the
distributed case (distributed.py) and the watches (watches.py).
"""

from __future__ import annotations

import collections
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from gradprobe import __version__
from gradprobe.record import STATE_FORMAT, SCHEMA_VERSION, BackgroundRunWriter, RunFileError

from . import checks
from .cadence import describe as describe_cadence, is_probe_step
from .checks import ROLES, RESERVED_OBSERVE, guess_role
from .distributed import rank_group_for
from .graph import infer_shared
from .per_loss import JacobianBuffer, PerLossGradients, assemble, latent_grad_norms, \
    per_loss_gradients
from .recording import StepNumbers, StepRecorder, Watches, failure_reason
from .transfer import Transfer
from .watches import (ContrastiveWatch, LatentWatch, PrototypeWatch, ProbeUsageError,
                      SaturationWatch, as_matrix)

__all__ = ["Probe", "ProbeStep", "GradprobeWarning", "ROLES", "guess_role"]


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
        :class:`gradprobe.integrations.tensorboard.TensorBoardSink`. They are called on the
        run file's writer thread, in step order.

    With a ``DistributedDataParallel`` model the statistics describe the global (all-reduced)
    gradients and the global batch, only rank 0 writes ``log`` (and feeds the sinks), and
    parameter names drop DDP's ``module.`` prefix; docs/distributed.md has the details.

    A probe step reads no value on the host: it packs what it records into one copy to the
    host and hands it to the run file's writer thread, which computes the metrics, writes the
    step and feeds the sinks while training goes on (docs/performance.md). Warnings about what
    the writer thread found (a NaN loss, say) come at the next call into the probe.
    """

    def __init__(self, model: torch.nn.Module, shared: Any = None, *, every: int | None = None,
                 log: str | Path | None = None, task: str | None = None,
                 roles: Mapping[str, str] | None = None, name: str | None = None,
                 expect_groups_per_batch: int | None = None, max_rows: int = 1024,
                 assemble: bool = False, overwrite: bool = False, sinks: Iterable[Any] = ()):
        sinks = list(sinks)
        checks.check_construction(model, every, roles, sinks)
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
        self._ranks = rank_group_for(model)
        self._writes = self._ranks is None or self._ranks.writes
        # Names of the module DDP wraps: the same names as a single-process run of the model.
        unwrapped = model.module if isinstance(
            model, torch.nn.parallel.DistributedDataParallel) else model
        self._names = {id(p): n for n, p in unwrapped.named_parameters()}
        self._sinks = sinks if self._writes else []
        self._failure: str | None = None
        self._scaler: Any = None
        self._scale_check: tuple[int, Transfer] | None = None  # (probe step, its transfer)
        self._shared_spec = shared
        self._shared: list[torch.Tensor] | None = checks.resolve_shared(shared)
        self._latents: dict[str, LatentWatch] = {}
        self._prototypes: dict[str, PrototypeWatch] = {}
        self._saturations: dict[str, SaturationWatch] = {}
        self._contrastive: dict[str, ContrastiveWatch] = {}
        self._captured: dict[str, Any] = {}
        self._jacobian = JacobianBuffer()
        self._losses: list[str] | None = None
        self._warned: set[tuple[str, str]] = set()
        self._roles_guessed: list[str] = []
        self._resumed = False
        self._meta_written = False
        self._last: tuple[list[str], Transfer] | None = None  # the last recorded probe step
        # What the writer thread hands back to run here: warnings, watches to release.
        self._notices: collections.deque[Callable[[], None]] = collections.deque()
        self.backward_path = "separate"
        if not self._writes:
            # Ranks other than 0 record nothing: no file, no lock, never a wait on I/O.
            log = None
        self._writer = BackgroundRunWriter(log, overwrite=overwrite)
        self._recorder = self._new_recorder()
        self._existing_steps = self._writer.last_step() is not None

    def _new_recorder(self) -> StepRecorder:
        watches = Watches(self._latents, self._prototypes, self._saturations, self._contrastive)
        return StepRecorder(self._writer, watches, self._sinks, self.max_rows,
                            self._notices.append, self._warn_once, self._drop_watch,
                            self._release_watch)

    @property
    def last_grad_norms(self) -> dict[str, float] | None:
        """The per-loss gradient norms on the shared set at the last probe step (None before
        the first), ``{loss name: norm}``.

        Read lazily: the probe step itself reads nothing on the host, so asking for these
        waits for that step's copy to the host (on a GPU, a wait for the device up to that
        step, only when asked)."""
        if self._last is None:
            return None
        names, transfer = self._last
        norms = transfer.values()["gram"].diagonal().clamp_min(0.0).sqrt().tolist()
        return dict(zip(names, norms))

    # -- what to watch ---------------------------------------------------------------------

    def _check_new_name(self, name: str) -> None:
        checks.check_new_name(name, self._observable_names() | set(self._prototypes))

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
                         temperature: Any = None, threshold: float = 4.6,
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
        watched = {name, *self._latents, *self._saturations, *self._contrastive,
                   *self._prototypes, *RESERVED_OBSERVE}
        checks.check_observed_name(what, value, watched, allow_groups=allow_groups)

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
            assemble(pending.gradients)
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
        self._run_notices()
        weights = dict(weights or {})
        # The full check runs when anything differs from the last step that passed it.
        if (self._losses is None or list(losses) != self._losses
                or not weights.keys() <= losses.keys()):
            checks.check_losses(losses, weights, self._losses, self.task)
        if self._losses is None:
            self._start(list(losses))
        # The one form of the loss weights from here to the run file: one per loss in the
        # order of the loss names, 1.0 where none was given, a float or the user's tensor.
        resolved = [self._weight(weights.get(k, 1.0)) for k in self._losses]
        total = sum(w * losses[k] for k, w in zip(self._losses, resolved))
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
                gradients = self._per_loss_gradients(losses, resolved, scaler, assemble)
            except Exception as exc:  # the observer must not harm the observed
                self._fail(exc)
        return ProbeStep(self.step, probing, losses, total, gradients, scaler)

    @staticmethod
    def _weight(w: Any) -> float | torch.Tensor:
        return w.reshape(()) if isinstance(w, torch.Tensor) else float(w)

    def after_backward(self, pending: ProbeStep) -> None:
        """The second half of :meth:`backward`: records the probe step, advances the counter."""
        if pending.probing:
            self._finish(pending)
        self._captured.clear()
        self.step += 1

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
            self._recorder.to_sinks(step, values)
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
        watch.disabled = failure_reason(exc)
        self._writer.add_event(self.step, "watch_disabled", watch.name, watch.disabled)
        self._release_watch(watch, self.step)

    def _release_watch(self, watch: Any, step: int) -> None:
        """The rest of disabling a watch: its hook removed, one warning."""
        if watch.handle is not None:
            watch.handle.remove()
            watch.handle = None
        warnings.warn(f"gradprobe: step {step}: watch {watch.name!r} disabled ({watch.disabled}); "
                      "the losses and the other watches go on recording", GradprobeWarning,
                      stacklevel=5)

    def _per_loss_gradients(self, losses: Mapping[str, torch.Tensor], weights: list,
                            scaler: Any, assemble: bool) -> PerLossGradients:
        names = self._losses
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
        latents = {n: t for n, t in self._captured.items()
                   if n in self._latents and isinstance(t, torch.Tensor) and t.requires_grad}
        gradients = per_loss_gradients(self.model, [losses[k] for k in names], weights,
                                       self._shared, latents, scaler, assemble)
        self.backward_path = gradients.path
        return gradients

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
        device = self._shared[0].device
        loss_values = torch.stack([losses[k].detach() for k in self._losses]).to(
            device, torch.float64)
        jacobian = self._jacobian.fill(gradients, self._shared)
        norms = latent_grad_norms(gradients, device)
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
        return StepNumbers(loss_values, jacobian, norms, observed, observed.get("groups"))

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
                          numbers.latent_grad_norms.square().reshape(-1)])
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
        squared = mean[k + k * p:].reshape(numbers.latent_grad_norms.shape) / ranks.world
        return StepNumbers(mean[:k], mean[k:k + k * p].reshape(k, p), squared.sqrt(),
                           observed, numbers.local_groups)

    def _record(self, step: int, gradients: PerLossGradients, numbers: StepNumbers) -> None:
        """Hand the step over: graph facts as events now, every number through one transfer."""
        names = self._losses
        for loss_name, reach in zip(names, gradients.per_loss_leaves):
            if not reach:
                self._event(step, "inert_loss", loss_name,
                            f"loss {loss_name!r} has no gradient path to any parameter "
                            "(computed from detached tensors?): it trains nothing")
            elif not (set(reach) & gradients.shared_ids):
                # Recorded for every loss, but a regulariser touching only its own parameters
                # (an L2 penalty on one head) is that way by design: no warning.
                self._event(step, "no_shared_path", loss_name,
                            self._unshared_message(loss_name, reach, gradients.per_loss_leaves),
                            warn=self.roles[loss_name] != "regularization")
        self._write_meta()
        transfer = self._recorder.hand_over(step, names, gradients.weights, gradients.scale,
                                            gradients.latent_names, numbers,
                                            lambda watch: self._due(watch, step))
        self._last = (names, transfer)
        if gradients.scale is not None:
            self._scale_check = (step, transfer)

    def _unshared_message(self, loss_name: str, reach: dict, per_loss_leaves: list[dict]) -> str:
        task_reach = per_loss_leaves[self._losses.index(self.task)]
        if loss_name != self.task and not (set(reach) & set(task_reach)):
            return (f"loss {loss_name!r} shares no parameter with the task loss {self.task!r} "
                    "(computed from detached features?): it reaches none of the shared parameters")
        return f"loss {loss_name!r} reaches none of the shared parameters"

    def _check_skipped(self) -> None:
        """Whether the GradScaler skipped the last probe step: it lowers its scale if it did
        (a step whose scaled gradients overflowed is recorded as skipped already)."""
        if self._scale_check is None or self._scaler is None:
            return
        step, transfer = self._scale_check
        self._scale_check = None
        try:
            values = transfer.values()
            if not bool(torch.isfinite(values["gram"]).all()):
                return
            scale, now = float(values["grad_scale"]), float(self._scaler.get_scale())
            if now < scale:
                self._event(step, "skipped_step", "scaler",
                            f"GradScaler skipped the optimizer step (inf/NaN in the scaled "
                            f"gradients); its scale fell from {scale:g} to {now:g}")
        except Exception as exc:
            self._fail(exc)

    @staticmethod
    def _due(watch: Any, step: int) -> bool:
        return watch.disabled is None and (watch.every is None or step % watch.every == 0)

    def _event(self, step: int, kind: str, name: str, message: str,
               also: Iterable[str] = (), warn: bool = True) -> None:
        """Record an event (for ``name`` and the names in ``also``) and warn once per kind and name."""
        if not self._writes:
            return
        names = [name, *also]
        for each in names:
            self._writer.add_event(step, kind, each, message)
        self._warn_once(step, kind, names, message, warn)

    def _warn_once(self, step: int, kind: str, names: list[str], message: str,
                   warn: bool = True) -> None:
        # A GradScaler skipping a step now and then is how it works: recorded, not warned.
        fresh = [(kind, each) for each in names if (kind, each) not in self._warned]
        if warn and kind != "skipped_step" and fresh:
            self._warned.update(fresh)
            warnings.warn(f"gradprobe: step {step}: {message}", GradprobeWarning, stacklevel=5)

    def _run_notices(self) -> None:
        """What the writer thread found since the last call (warnings, watches to release),
        here on the training thread. (An error of the writer thread itself is raised by the
        next hand-over, and disables the probe there.)"""
        while self._notices:
            self._notices.popleft()()

    def _write_meta(self) -> None:
        if not self._meta_written:
            self._writer.set_meta(**self._meta())
            self._meta_written = True

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
            self._writer = BackgroundRunWriter(
                path, initial_bytes=state["database"].numpy().tobytes(), overwrite=True)
            self._recorder.writer = self._writer
        for name, proto_state in state.get("prototypes", {}).items():
            if name in self._prototypes:
                self._prototypes[name].load_state(proto_state)
        self._resumed = True

    def close(self) -> None:
        """Flush and close the run file and remove the hooks; safe to call twice. Warnings
        about the last steps (found on the writer thread) come here at the latest."""
        self._check_skipped()
        self._remove_hooks()
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:
                warnings.warn(f"gradprobe: could not close the run file cleanly ({exc})",
                              GradprobeWarning, stacklevel=2)
        while self._notices:
            self._notices.popleft()()

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
