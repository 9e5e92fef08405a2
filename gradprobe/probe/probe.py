"""The probe: attach to a multi-loss model and record per-loss gradient statistics.

Cadence: a non-probe step costs the weighted sum and one ordinary backward, nothing else.
On a probe step the per-loss gradients are taken with ``torch.autograd.grad`` (exact, no
estimates) and their Gram matrix G = J J^T on the shared parameters is recorded (a shared
Linear or Conv layer's part of it from the layer's inputs and output gradients where that
pays: layer_inputs.py). The parameters' ``.grad`` is filled either from those same gradients
(the *assembled* path: no extra backward) or by the ordinary backward (the *separate* path);
docs/probe.md says which path runs when. The collaborators: argument checks (checks.py), the
watch methods (watch_api.py) and watches (watchset.py, watches.py), per-loss gradients
(per_loss.py), recording a step on the writer thread (recording.py, transfer.py) and the
distributed case (distributed.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from gradprobe.record import BackgroundRunWriter

from . import checks
from .cadence import is_probe_step
from .checks import ROLES, guess_role
from .distributed import globalize, rank_group_for, rows_matrix, rows_of
from .fsdp import ShardedParameters, is_fully_sharded
from .layer_inputs import LayerInputs
from .live import LiveFindings
from .notices import GradprobeWarning, Notices, warn_user
from .per_loss import (JacobianBuffer, PerLossGradients, ProbeStep, assemble, graph_events,
                       per_loss_gradients, shared_set, step_numbers, weighted_total)
from .recording import (StepNumbers, StepRecorder, check_state, failure_reason, grad_norms,
                        probe_state, resumed_writer, run_meta, skipped_step)
from .roles import RoleReader
from .transfer import Transfer
from .watches import ProbeUsageError
from .watch_api import WatchMethods
from .watchset import WatchSet

__all__ = ["Probe", "ProbeStep", "GradprobeWarning", "ROLES", "guess_role"]


class Probe(WatchMethods):
    """Records per-loss gradient statistics of a multi-loss model on the shared parameters.

    Parameters
    ----------
    model: the ``nn.Module`` being trained (parameter names come from it).
    shared: a module, or parameters, the losses compete for. ``None``: inferred at the first
        probe step (docs/probe.md; ``shared="all"``: every parameter two or more losses reach).
    every: a fixed probe cadence in steps (step 0 is a probe step). ``None`` (the default):
        dense at the start, then thinning out: every step before step 4, every 2nd from 4,
        every 4th from 16, ... every 64th from step 4,096 on (a 300-step run gets 49 probe
        steps, a 100,000-step run 1,689); docs/probe.md has the schedule.
    run_file: path of the run file (SQLite, crash-safe); ``None`` keeps the run in memory
        (it still travels in ``state_dict()``). ``log=`` is its former name.
    task: the primary loss (default: the first key of the first ``backward`` call).
    roles: ``{loss name: role}`` with roles from :data:`ROLES`; the others are read from what
        each loss's graph reaches at the first probe step, or hinted by its name; the run
        file records each role with its source (docs/findings.md, "Roles").
    expect_groups_per_batch: what the batch sampler is meant to give (e.g. 1 for
        single-group batches), so diagnosis can tell when the batches look otherwise.
    max_rows: rows of each latent used per probe step (a bounded sample).
    assemble: fill ``.grad`` from the per-loss gradients instead of running the ordinary
        backward on probe steps (saves one backward; equal up to float32 rounding).
    overwrite: replace an existing run file instead of refusing it.
    sinks: objects with ``write_step(step, scalars)`` (``scalars``: ``{(quantity, name):
        value}``) that also receive every recorded step, e.g. :class:`gradprobe.integrations.
        tensorboard.TensorBoardSink`, called on the run file's
        writer thread in step order; one with ``write_finding(step, finding)`` also gets the
        findings as ``on_finding`` does (:class:`gradprobe.integrations.wandb.WandbSink`).
    on_finding: ``callback(finding)``, called once when a finding first appears at warning or
        error, at the start of a ``backward`` whose step is a multiple of ``findings_every``
        (never inside one; an exception it raises is reported once). docs/live.md.

    With a ``DistributedDataParallel`` or FSDP2 (``fully_shard``) model the statistics describe
    the global gradients and the global batch, only rank 0 writes ``run_file`` (and feeds the
    sinks), and parameter names are the unwrapped model's; docs/distributed.md has the details.

    A probe step reads no value on the host: it packs what it records into one copy to the
    host and hands it to the run file's writer thread, which computes the metrics, writes the
    step and feeds the sinks while training goes on (docs/performance.md). Warnings about what
    the writer thread found (a NaN loss, say) come at the next call into the probe.
    """

    def __init__(self, model: torch.nn.Module, shared: Any = None, *, every: int | None = None,
                 run_file: str | Path | None = None, task: str | None = None,
                 roles: Mapping[str, str] | None = None, name: str | None = None,
                 expect_groups_per_batch: int | None = None, max_rows: int = 1024,
                 assemble: bool = False, overwrite: bool = False, sinks: Iterable[Any] = (),
                 on_finding: Callable[[Any], Any] | None = None, findings_every: int = 500,
                 log: str | Path | None = None):
        sinks, run_file = list(sinks), checks.run_file_argument(run_file, log)
        checks.check_construction(model, every, roles, sinks, on_finding, findings_every)
        self.model, self.every, self.task = model, every, task
        self.roles = dict(roles or {})
        self.expect_groups_per_batch = expect_groups_per_batch
        self.max_rows, self.assemble = max_rows, assemble
        self.run_name = name or (Path(run_file).stem if run_file else "run")
        self.step = 0
        self.enabled = True
        # FSDP2: the forward uses unsharded parameters, the per-loss gradients are taken on them.
        self._sharded = ShardedParameters(model) if is_fully_sharded(model) else None
        self._ranks = rank_group_for(model, self._sharded)
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
        self._watches = WatchSet(lambda: self.is_probe_step)
        self._jacobian = JacobianBuffer(self._names)
        self._layer_inputs = LayerInputs(model)
        self._losses: list[str] | None = None
        self._role_reader = RoleReader(roles, task is not None)
        self._resumed = False
        self._saw_backward = self._closed = False  # close() warns when no backward came
        self._meta_written = False
        self._last: tuple[list[str], Transfer] | None = None  # the last recorded probe step
        self.backward_path = "separate"
        if not self._writes:
            # Ranks other than 0 record nothing: no file, no lock, never a wait on I/O.
            run_file = None
        self._writer = BackgroundRunWriter(run_file, overwrite=overwrite)
        self._notices = Notices(self._writer if self._writes else None)
        self._recorder = StepRecorder(self._writer, self._watches, self._sinks, self.max_rows,
                                      self._notices.later, self._notices.warn_once,
                                      self._drop_watch, self._watches.release)
        self._live = LiveFindings(on_finding, findings_every)
        self._existing_steps = self._writer.last_step() is not None

    @property
    def last_grad_norms(self) -> dict[str, float] | None:
        """The per-loss gradient norms on the shared set at the last probe step (None before
        the first), ``{loss name: norm}``.

        Read lazily: the probe step itself reads nothing on the host, so asking for these
        waits for that step's copy to the host (on a GPU, a wait for the device up to that
        step, only when asked)."""
        if self._last is None:
            return None
        return grad_norms(*self._last)

    # -- the training loop -------------------------------------------------------------------

    @property
    def is_probe_step(self) -> bool:
        """Whether the current step (the next ``backward``) records."""
        return self.enabled and is_probe_step(self.step, self.every)

    def observe(self, **tensors: Any) -> None:
        """Hand the probe tensors it watches (latents, sigmoid inputs, pairs, ``groups``)."""
        self._watches.observe(tensors)

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
        self._notices.run()
        self._saw_backward = True
        if self._writes:  # a safe point: between optimiser steps, outside any backward
            self._live.at_safe_point(self.step, self._writer, self._sinks)
        weights = dict(weights or {})
        # The full check runs when anything differs from the last step that passed it.
        if (self._losses is None or list(losses) != self._losses
                or not weights.keys() <= losses.keys()):
            checks.check_losses(losses, weights, self._losses, self.task)
        if self._losses is None:
            self._start(list(losses))
        # The loss weights' one form from here on: per loss in order, 1.0 if none, float or tensor.
        resolved = [checks.weight(weights.get(k, 1.0)) for k in self._losses]
        total = weighted_total([losses[k] for k in self._losses], resolved)
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            raise ProbeUsageError("no loss requires grad: every loss is computed from detached "
                                  "tensors, so nothing can be trained")
        self._check_skipped()
        self._scaler = scaler
        probing = self.is_probe_step
        gradients = None
        if probing and self._failure is None:
            try:
                self._watches.pick_latents(self._drop_watch, self._notices.note_once)
                self._find_shared(losses, resolved)
            except Exception as exc:  # the observer must not harm the observed
                self._fail(exc)
        if probing and self._ranks is not None and self._ranks.sharded:
            # The per-loss passes enter FSDP2's all-gathers: every rank takes them, or none.
            probing = not self._vote([])[0]
        if probing and self._failure is None:
            try:
                gradients = self._per_loss_gradients(losses, resolved, scaler, assemble)
            except Exception as exc:
                self._fail(exc)
        return ProbeStep(self.step, probing, losses, total, gradients, scaler)

    def _vote(self, rows: list[int]) -> tuple[bool, list[int]]:
        """Every rank's vote (distributed.py): did any rank's probe fail, and the fewest rows
        each holds per gathered tensor. If one failed, this rank stops probing too."""
        try:
            failed, rows = self._ranks.agree(self._failure is not None, rows)
        except Exception as exc:  # the process group itself failed: nothing left to agree on
            self._fail(exc)
            failed = True
        if failed:
            if self._failure is None:
                self._report_failure("the probe failed on another rank, whose warning says why")
            self._stop()
        return failed, rows

    def after_backward(self, pending: ProbeStep) -> None:
        """The second half of :meth:`backward`: records the probe step, advances the counter."""
        if pending.probing:
            self._finish(pending)
        self._watches.captured.clear()
        self.step += 1
        try:  # hooks on the shared layers' inputs for the next step if it probes (layer_inputs.py)
            self._layer_inputs.arm(self._shared if self.is_probe_step and self._ranks is None
                                   else None)
        except Exception as exc:
            self._fail(exc)

    def findings(self, thresholds: Any = None) -> list:
        """The findings of the run recorded so far (``gradprobe analyze`` on the run file now,
        once the steps already handed to the writer thread are committed: a bounded wait),
        diagnosed again only when something new was committed. ``[]`` on DDP ranks other
        than 0. It imports the
        later diagnose stage inside the call, the documented exception (probe/live.py,
        docs/architecture.md); docs/live.md has what a call costs."""
        if not self._writes:
            return []
        return self._live.findings(self._writer, thresholds)

    def log(self, **scalars: Any) -> None:
        """Record extra scalars (learning rate, validation losses...) at the current step
        (under DDP on rank 0 only; other ranks ignore the call)."""
        if not self.enabled or not self._writes:
            return
        try:
            values = checks.logged_values(scalars)
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
                "run_file= path, pass overwrite=True, or load_state_dict() to resume it")
        self._losses = names
        if self.task is None:
            self.task = names[0]
        self._role_reader.start(self.roles, names, self.task)

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
        watch.disable(failure_reason(exc), self.step)
        self._writer.add_event(self.step, "watch_disabled", watch.name, watch.disabled)
        self._watches.release(watch, self.step)

    def _find_shared(self, losses: Mapping[str, torch.Tensor], weights: list) -> None:
        names = self._losses
        if self._sharded is not None:
            self._names.update(self._sharded.unsharded_names())
            if self._shared is not None:
                self._shared = self._sharded.unsharded(self._shared)
        if not self._role_reader.read:  # the first probe step: what each loss reaches
            self._role_reader.read_graph(self.roles, names, self.task, [losses[k] for k in names],
                                         weights, self._names, self._watches.prototype_tables())
        if self._shared is None:
            self._shared, core, why = shared_set(
                [losses[k] for k in names], self._role_reader.parameter_names(self._names),
                self._role_reader.settled_roles(names), names.index(self.task), self._shared_spec,
                widen=self._sharded is None)
            self._jacobian.blocks.core = {id(p) for p in core}
            self._notices.event(self.step, "shared_set", "shared", why, warn=False)

    def _per_loss_gradients(self, losses: Mapping[str, torch.Tensor], weights: list,
                            scaler: Any, assemble: bool) -> PerLossGradients:
        names = self._losses
        latents = {n: t for n, t in self._watches.captured.items()
                   if n in self._watches.latents and isinstance(t, torch.Tensor) and t.requires_grad}
        gradients = per_loss_gradients(self.model, [losses[k] for k in names], weights,
                                       self._shared, latents, scaler, assemble,
                                       self._layer_inputs)
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
        names = self._watches.gathered_names()
        numbers, rows = None, [0] * len(names)
        if self._failure is None and pending.gradients is not None:
            try:
                numbers = self._local_numbers(pending.losses, pending.gradients)
                rows = [rows_of(numbers.observed.get(n)) for n in names]
            except Exception as exc:
                self._fail(exc)
        failed, rows = self._vote(rows)
        if failed:
            return
        try:
            numbers = globalize(self._ranks, numbers, names, rows, self.max_rows)
        except Exception as exc:  # the process group itself failed
            self._fail(exc)
            self._stop()
            return
        if self._writes:
            try:
                self._record(pending.step, pending.gradients, numbers)
            except Exception as exc:  # the other ranks stop with this one at the next vote
                self._fail(exc)

    def _local_numbers(self, losses: Mapping[str, torch.Tensor],
                       gradients: PerLossGradients) -> StepNumbers:
        observed = dict(self._watches.captured)
        if self._ranks is not None:
            # Checked before the vote: a malformed tensor must not reach another rank's collective.
            for name in self._watches.gathered_names():
                if isinstance(observed.get(name), torch.Tensor) and name != "groups":
                    observed[name] = rows_matrix(name, observed[name],
                                                 name in self._watches.latents, self.max_rows)
        return step_numbers([losses[k] for k in self._losses], gradients, self._shared,
                            self._jacobian, observed)

    def _record(self, step: int, gradients: PerLossGradients, numbers: StepNumbers) -> None:
        """Hand the step over: graph facts as events now, every number through one transfer."""
        names = self._losses
        for kind, loss_name, message in graph_events(names, self.task, gradients,
                                                     self._jacobian.blocks.core):
            # A regulariser on its own parameters only (L2 on one head): recorded, not warned.
            self._notices.event(step, kind, loss_name, message,
                        warn=kind == "inert_loss" or self.roles[loss_name] != "regularization")
        self._write_meta()
        transfer = self._recorder.hand_over(step, names, gradients.weights, gradients.scale,
                                            gradients.latent_names, numbers,
                                            lambda watch: WatchSet.due(watch, step))
        self._last = (names, transfer)
        if gradients.scale is not None:
            self._scale_check = (step, transfer)

    def _check_skipped(self) -> None:
        """Whether the GradScaler skipped the last probe step (it lowers its scale if it did)."""
        if self._scale_check is None or self._scaler is None:
            return
        step, transfer = self._scale_check
        self._scale_check = None
        try:
            message = skipped_step(transfer, float(self._scaler.get_scale()))
            if message is not None:
                self._notices.event(step, "skipped_step", "scaler", message)
        except Exception as exc:
            self._fail(exc)

    def _write_meta(self) -> None:
        if not self._meta_written:
            self._writer.set_meta(**run_meta(self, self._watches, self._ranks, self._scaler))
            self._meta_written = True

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
        warn_user(f"gradprobe disabled itself{rank} at step {self.step} ({message}); training "
                  "continues and everything recorded before stays readable")
        if not self._writes:
            return
        try:
            # The metadata too: a run disabled before its first record still names its losses.
            self._write_meta()
            self._writer.add_event(self.step, "probe_disabled", "probe", message)
            self._writer.flush()
        except Exception:  # the run file itself may be what failed
            pass

    def _stop(self) -> None:
        self.enabled = False
        self._watches.remove_hooks()

    # -- lifecycle ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, strings, lists, dicts) holding the recorded run itself.

        A checkpoint holding it loads with ``torch.load(path, weights_only=True)`` and can be
        analysed on its own with ``gradprobe analyze``.
        """
        prototypes = {n: w.state() for n, w in self._watches.prototypes.items()}
        return probe_state(self._writer, self.step, self.every, prototypes)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the step counter continues and the same run file is appended to."""
        self.step = check_state(state)
        writer = resumed_writer(self._writer, state)
        if writer is not self._writer:
            self._writer = self._recorder.writer = self._notices.writer = writer
        for name, proto_state in state.get("prototypes", {}).items():
            if name in self._watches.prototypes:
                self._watches.prototypes[name].load_state(proto_state)
        self._resumed = True

    def close(self) -> None:
        """Flush and close the run file, remove the hooks (safe twice); the writer thread's
        last warnings come here at the latest, and one when no backward reached the probe."""
        if not self._saw_backward and self._writes and not self._closed:
            warn_user("gradprobe: the probe is closed without having seen a backward, so the "
                      f"run {self._writer.path or '(in memory)'} records nothing: call "
                      "probe.backward(losses) in the training loop instead of "
                      "loss.backward() (or probe.before_backward(losses) and "
                      "probe.after_backward(pending) around a backward of your own)")
        self._check_skipped()
        if self._saw_backward and self._failure is None and not self._closed and (
                bad := checks.non_finite_parameters(self.model, self._names)):
            self._notices.event(self.step - 1, "non_finite_at_close", "parameters", bad)
        self._watches.remove_hooks()
        self._layer_inputs.disarm()
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:  # a failure already reported is not warned twice
                if self._failure is None:
                    warn_user(f"gradprobe: could not close the run file cleanly ({exc})")
        self._notices.run()
        self._closed = True

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
