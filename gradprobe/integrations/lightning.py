"""PyTorch Lightning: a callback that runs the probe around Lightning's own backward.

The pattern: ``training_step`` returns a dict ``{loss name: 0-dim tensor}`` (every entry a
loss), and automatic optimisation stays on. The callback wraps ``training_step``: it hands
the losses to :meth:`Probe.before_backward` (per-loss gradients on probe steps) and returns
``{"loss": weighted sum}`` to Lightning, which runs its ordinary backward (with its precision
plugin's GradScaler, if any); ``on_after_backward`` then records the step. The gradients
Lightning steps on are exactly those without the callback (the probe's 'separate' path).

    callback = GradProbeCallback(run_file="run.gprobe", weights={"cont": 0.05},
                                 configure=lambda probe, module: probe.watch_latent("z", module.enc))
    Trainer(callbacks=[callback]).fit(module)
"""

from __future__ import annotations

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

    run_file: the run file (default: ``<trainer.log_dir or default_root_dir>/gradprobe.gprobe``).
    weights: ``{loss name: weight}``, or a callable ``(module) -> weights`` read every step
        (loss-weight schedules).
    configure: ``(probe, module) -> None``, called once the probe exists: add watches there.
    probe_kwargs: passed to :class:`gradprobe.Probe` (``every``, ``shared``, ``roles``...).
    """

    def __init__(self, run_file: str | Path | None = None,
                 weights: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None = None,
                 configure: Callable[[Probe, Any], None] | None = None, **probe_kwargs: Any):
        self.run_file = run_file
        self.weights = weights
        self.configure = configure
        self.probe_kwargs = probe_kwargs
        self.probe: Probe | None = None
        self._pending = None
        self._original_training_step = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not pl_module.automatic_optimization:
            raise ProbeUsageError("GradProbeCallback needs automatic optimisation; with manual "
                                  "optimisation call probe.backward(losses) in training_step")
        run_file = self.run_file
        if run_file is None and "log" not in self.probe_kwargs:  # log=: the former name
            run_file = Path(trainer.log_dir or trainer.default_root_dir) / "gradprobe.gprobe"
        # Under a DDP strategy the wrapped model is what averages gradients across ranks.
        wrapped = trainer.strategy.model
        model = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) \
            else pl_module
        self.probe = Probe(model, run_file=run_file, **self.probe_kwargs)
        if self.configure is not None:
            self.configure(self.probe, pl_module)
        self._original_training_step = pl_module.training_step
        pl_module.training_step = self._training_step(trainer, pl_module)

    def _training_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"):
        original = self._original_training_step

        def training_step(*args: Any, **kwargs: Any):
            losses = original(*args, **kwargs)
            if not isinstance(losses, Mapping) or not losses:
                raise ProbeUsageError("with GradProbeCallback, training_step must return a dict "
                                      f"{{loss name: 0-dim tensor}}, got {type(losses).__name__}")
            if self._pending is not None:  # Lightning ran no backward for the last step
                self.probe.after_backward(self._pending)
            weights = self.weights(pl_module) if callable(self.weights) else self.weights
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self._pending = self.probe.before_backward(losses, weights, scaler=scaler)
            return {"loss": self._pending.total}

        return training_step

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._pending is not None:
            self.probe.after_backward(self._pending)
            self._pending = None

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                 stage: str) -> None:
        if self._original_training_step is not None:
            del pl_module.training_step  # the instance attribute; the class's method shows again
            self._original_training_step = None
        if self.probe is not None:
            self.probe.close()
