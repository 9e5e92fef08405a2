"""PyTorch Lightning: a callback that runs the probe around Lightning's own backward.

The pattern: ``training_step`` returns a dict whose tensors that require grad are the (0-dim)
losses (``{loss name: tensor}``), and automatic optimisation stays on. The callback wraps
``training_step``: it hands the losses to :meth:`Probe.before_backward` (per-loss gradients on
probe steps) and returns ``{"loss": weighted sum}`` plus the dict's other entries to
Lightning, which runs its ordinary backward (with its precision plugin's GradScaler, if any);
``on_after_backward`` then records the step. The gradients Lightning steps on are exactly
those without the callback (the probe's 'separate' path).

The other entries of the dict (an accuracy, a detached tensor, a float) are not losses: on
probe steps the scalar ones are recorded with ``probe.log``. Metrics logged with
``self.log(...)`` (and ``self.log_dict``) reach the probe too: at the end of each validation
run and of each training epoch (where Lightning's own callbacks read them), the value in
``trainer.callback_metrics`` of each metric logged since the last such point is recorded at
the probe's current step, so ``val_*`` metrics feed the overfitting rule.

    callback = GradProbeCallback(weights={"cont": 0.05},
                                 configure=lambda probe, module: probe.watch_latent("z", module.enc))
    Trainer(callbacks=[callback]).fit(module)
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from typing import Any, Callable, Mapping

try:
    import lightning.pytorch as pl
except ImportError as exc:
    raise ImportError("gradprobe.integrations.lightning needs Lightning: "
                      "pip install 'gradprobe[lightning]'") from exc
import torch

from gradprobe.probe import Probe, ProbeUsageError


class GradProbeCallback(pl.Callback):
    """Probe a LightningModule whose ``training_step`` returns a dict of losses.

    run_file: the run file (default: ``gradprobe-<logger version>.gprobe`` in
        ``trainer.log_dir``, or ``default_root_dir``; see :func:`default_run_file`).
    weights: ``{loss name: weight}``, or a callable ``(module) -> weights`` read every step
        (loss-weight schedules).
    configure: ``(probe, module) -> None``, called once the probe exists: add watches there.
    probe_kwargs: passed to :class:`gradprobe.Probe` (``every``, ``shared``, ``roles``...);
        without ``name=`` the run is named ``<logger name>/<logger version>``.

    ``callback.run_path`` is the run file of the latest fit (``None`` for a run kept in memory).
    """

    def __init__(self, run_file: str | Path | None = None,
                 weights: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None = None,
                 configure: Callable[[Probe, Any], None] | None = None, **probe_kwargs: Any):
        self.run_file = run_file
        self.weights = weights
        self.configure = configure
        self.probe_kwargs = probe_kwargs
        self.probe: Probe | None = None
        self.run_path: Path | None = None
        self._pending = None  # (the probe's step, the dict's scalars that are not losses)
        self._original_training_step = None
        self._logged: set[str] = set()  # names passed to self.log since the last hand-over

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not pl_module.automatic_optimization:
            raise ProbeUsageError("GradProbeCallback needs automatic optimisation; with manual "
                                  "optimisation call probe.backward(losses) in training_step")
        directory = Path(trainer.log_dir or trainer.default_root_dir)  # all ranks: a broadcast
        name, version = logger_identity(trainer)
        run_file = self.run_file
        if run_file is None and "log" not in self.probe_kwargs:  # log=: the former name
            run_file = default_run_file(directory, version)
        kwargs = dict(self.probe_kwargs)
        if version is not None:
            kwargs.setdefault("name", f"{name}/{version}" if name else version)
        path = run_file if run_file is not None else kwargs.get("log")
        self.run_path = Path(path) if path is not None else None
        # Under a DDP strategy the wrapped model is what averages gradients across ranks.
        wrapped = trainer.strategy.model
        model = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) \
            else pl_module
        self.probe = Probe(model, run_file=run_file, **kwargs)
        self._logged = set()
        if self.configure is not None:
            self.configure(self.probe, pl_module)
        self._original_training_step = pl_module.training_step
        pl_module.training_step = self._training_step(trainer, pl_module)
        pl_module.log = self._log(pl_module.log)

    def _training_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"):
        original = self._original_training_step

        def training_step(*args: Any, **kwargs: Any):
            outputs = original(*args, **kwargs)
            if not isinstance(outputs, Mapping):
                raise ProbeUsageError("with GradProbeCallback, training_step must return a dict "
                                      f"{{loss name: 0-dim tensor}}, got {type(outputs).__name__}")
            losses = {k: v for k, v in outputs.items()
                      if isinstance(v, torch.Tensor) and v.requires_grad}
            if not losses:
                raise ProbeUsageError("with GradProbeCallback, training_step must return a dict "
                                      "{loss name: 0-dim tensor}; no entry requires grad, got "
                                      f"{sorted(map(str, outputs))}")
            others = {k: v for k, v in outputs.items() if k not in losses}
            if self._pending is not None:  # Lightning ran no backward for the last step
                self._record(*self._pending)
            weights = self.weights(pl_module) if callable(self.weights) else self.weights
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            step = self.probe.before_backward(losses, weights, scaler=scaler)
            self._pending = (step, {k: v for k, v in others.items() if is_scalar(v)})
            return {**others, "loss": step.total}

        return training_step

    def _log(self, original: Callable[..., None]) -> Callable[..., None]:
        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self._logged.add(name)
            original(name, value, *args, **kwargs)

        return log

    def _record(self, step: Any, scalars: dict[str, Any]) -> None:
        self._pending = None
        self.probe.after_backward(step)
        if step.probing and scalars:  # read on probe steps only: a host read of each
            self.probe.log(**scalars)

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._pending is not None:
            self._record(*self._pending)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking:  # not a step of the run
            self._logged.clear()
        else:
            self._forward_metrics(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._forward_metrics(trainer)

    def _forward_metrics(self, trainer: "pl.Trainer") -> None:
        """Record the latest value of each metric ``self.log`` got since the last hand-over (a
        metric logged both per step and per epoch: its epoch value, Lightning's ``<name>_epoch``).
        One that is not in ``callback_metrics`` yet (an epoch value, before the epoch's end)
        waits for the next hand-over."""
        metrics = trainer.callback_metrics
        values = {}
        for name in list(self._logged):
            value = metrics.get(f"{name}_epoch", metrics.get(name))
            if is_scalar(value):
                values[name] = float(value)
                self._logged.discard(name)
        if values and self.probe is not None:
            self.probe.log(**values)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                 stage: str) -> None:
        if self._original_training_step is not None:
            del pl_module.training_step  # the instance attributes; the class's methods show again
            del pl_module.log
            self._original_training_step = None
        if self.probe is not None:
            self.probe.close()


def is_scalar(value: Any) -> bool:
    """A number ``probe.log`` records: a real number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, numbers.Real)


def logger_identity(trainer: "pl.Trainer") -> tuple[str | None, str | None]:
    """The first logger's name and version as Lightning writes them (``version_3`` for the
    TensorBoard and CSV loggers' number, the run id for W&B); ``(None, None)`` without one."""
    logger = trainer.logger
    if logger is None:
        return None, None
    version = logger.version
    if isinstance(version, int):
        version = f"version_{version}"
    return logger.name or None, (str(version) if version is not None else None)


def default_run_file(directory: Path, version: str | None) -> Path:
    """The first of ``gradprobe-<version>.gprobe``, ``gradprobe-<version>-1.gprobe``, ...
    (``gradprobe.gprobe``, ``gradprobe-1.gprobe``, ... without a version) that does not exist
    yet: a new fit never lands on an earlier run's file, whatever the logger's directory."""
    stem = "gradprobe" if version is None else "gradprobe-" + re.sub(r"[^\w.-]+", "_", version)
    path, n = directory / f"{stem}.gprobe", 0
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}.gprobe"
    return path
