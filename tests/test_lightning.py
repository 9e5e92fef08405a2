"""GradProbeCallback as Lightning users write their modules: extra entries in the dict that
training_step returns, metrics logged with ``self.log``, and one run per fit with the loggers
people use. Real Lightning fits on CPU, each under a deadline."""

from __future__ import annotations

import contextlib
import signal

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe.diagnose import diagnose

from _wandb_read import finished_run
from models import WEIGHTS, TwoLatentNet, four_losses, make_data

pl = pytest.importorskip("lightning.pytorch")
from gradprobe.integrations.lightning import GradProbeCallback  # noqa: E402

BATCH = 16
# The module has a validation_step; the fits without validation data make Lightning say so.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the test, instead of waiting forever, if the fit inside runs past ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"the Lightning fit ran past its {seconds} s deadline")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Module(pl.LightningModule):
    """Two losses and an accuracy in the returned dict; a validation loss through self.log."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = TwoLatentNet()
        self.train_accuracy: list[float] = []   # what training_step returned, step by step
        self.val_losses: list[list[float]] = []  # per validation run, its batches' losses

    def training_step(self, batch, batch_idx):
        losses, (_, _, logit) = four_losses(self.net, *batch)
        accuracy = ((logit > 0).float() == batch[1]).float().mean()
        self.train_accuracy.append(float(accuracy))
        self.log("train_accuracy", accuracy, on_step=False, on_epoch=True)
        return {**losses, "acc": accuracy, "lr": 0.05, "logit": logit.detach(), "note": "text"}

    def on_validation_epoch_start(self):
        self.val_losses.append([])

    def validation_step(self, batch, batch_idx):
        val_loss = four_losses(self.net, *batch)[0]["task"]
        self.val_losses[-1].append(float(val_loss))
        self.log("val_task", val_loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n: int, seed: int = 0):
    x, y, g = make_data(n=n, seed=seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, g), batch_size=BATCH)


def fit(tmp_path, callback, module, val=None, **trainer_kwargs):
    settings = dict(max_steps=4, accelerator="cpu", devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer = pl.Trainer(callbacks=[callback], **{**settings, **trainer_kwargs})
    with deadline(120):
        trainer.fit(module, loader(64), val)
    return trainer


def test_entries_that_need_no_grad_are_logged_not_trained(tmp_path):
    outputs = []

    class Outputs(pl.Callback):
        def on_train_batch_end(self, trainer, module, out, batch, batch_idx):
            outputs.append(sorted(out))

    module = Module()
    callback = GradProbeCallback(run_file=tmp_path / "pl.gprobe", weights=WEIGHTS, every=2)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, Outputs()], default_root_dir=tmp_path)
    with deadline(120):
        trainer.fit(module, loader(64))

    run = gradprobe.load_run(tmp_path / "pl.gprobe")
    assert run.losses == ["task", "cont", "proto", "orth"]
    # The scalars that are not losses, at the probe steps (every=2), as training_step made them.
    steps, acc = run.series("logged", "acc")
    assert steps.tolist() == [0, 2]
    np.testing.assert_allclose(acc, [module.train_accuracy[0], module.train_accuracy[2]], rtol=1e-7)
    assert run.series("logged", "lr")[1].tolist() == [0.05, 0.05]
    # the tensor and the text are not numbers; train_accuracy comes from self.log
    assert set(run.names("logged")) == {"acc", "lr", "train_accuracy"}
    assert not [f for f in diagnose(run) if f.id == "inert-loss"]
    # Lightning still gets every entry back, for the user's own hooks.
    assert outputs == [["acc", "logit", "loss", "lr", "note"]] * 4


def test_metrics_logged_with_self_log_reach_the_probe(tmp_path):
    module = Module()
    callback = GradProbeCallback(run_file=tmp_path / "pl.gprobe", weights=WEIGHTS, every=1)
    # 4 batches an epoch, validation after each of 3 epochs (and Lightning's sanity check first)
    fit(tmp_path, callback, module, val=loader(32, seed=1), max_steps=12, max_epochs=3)

    run = gradprobe.load_run(tmp_path / "pl.gprobe")
    steps, val_task = run.series("logged", "val_task")
    # Recorded at the last training step before each validation; the sanity check is not one.
    assert steps.tolist() == [3, 7, 11]
    assert len(module.val_losses) == 4  # the sanity check's run, then one per epoch
    # Lightning's epoch value: the mean over the equal-sized validation batches.
    np.testing.assert_allclose(val_task, [np.mean(v) for v in module.val_losses[1:]], rtol=1e-6)
    # An epoch-level training metric comes at the epoch's end: the mean of its 4 batches.
    steps, accuracy = run.series("logged", "train_accuracy")
    assert steps.tolist() == [3, 7, 11]
    np.testing.assert_allclose(accuracy, np.reshape(module.train_accuracy, (3, 4)).mean(1), rtol=1e-6)


def test_each_fit_gets_its_own_run_name_and_file(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    names, files = [], []
    for _ in range(2):
        callback = GradProbeCallback(weights=WEIGHTS, every=2)
        fit(tmp_path, callback, Module(), logger=CSVLogger(tmp_path, name="exp"))
        files.append(callback.run_path)
        names.append(gradprobe.load_run(files[-1]).name)
    assert names == ["exp/version_0", "exp/version_1"]
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "exp/version_0/gradprobe-version_0.gprobe", "exp/version_1/gradprobe-version_1.gprobe"]

    # W&B's logger keeps every run in one directory (no version in it): the run id tells them apart.
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = []
    for _ in range(2):
        logger = WandbLogger(project="gradprobe-test", save_dir=tmp_path / "wb", offline=True)
        callback = GradProbeCallback(weights=WEIGHTS, every=2)
        fit(tmp_path, callback, Module(), logger=logger)
        run_id = logger.experiment.id
        logger.experiment.finish()
        runs.append((run_id, callback.run_path))
    (first_id, first), (second_id, second) = runs
    assert first_id != second_id
    for run_id, path in runs:
        assert path == tmp_path / "wb" / f"gradprobe-{run_id}.gprobe"
        assert gradprobe.load_run(path).name == f"gradprobe-test/{run_id}"
        assert gradprobe.load_run(path).probe_steps().tolist() == [0, 2]

    # Without a logger there is no version: a second fit takes the next free name.
    paths = []
    for _ in range(2):
        callback = GradProbeCallback(weights=WEIGHTS, every=2)
        fit(tmp_path / "plain", callback, Module())
        paths.append(callback.run_path.name)
    assert paths == ["gradprobe.gprobe", "gradprobe-1.gprobe"]


def test_wandb_logger_run_summary_holds_the_findings(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from gradprobe.integrations.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="gradprobe-test", save_dir=tmp_path, offline=True)
    sink = WandbSink(logger.experiment)
    callback = GradProbeCallback(weights=WEIGHTS, every=1, sinks=[sink])
    fit(tmp_path, callback, Module(), logger=logger, max_steps=12, max_epochs=3)
    sink.summarize(callback.probe.findings())  # the documented last step, as with any W&B run
    logger.experiment.finish()

    found = diagnose(gradprobe.load_run(callback.run_path))
    _, summary = finished_run(tmp_path)
    assert found  # this short run's loss weights leave 'orth' swamped
    assert [(f["id"], f["subject"]) for f in summary["gradprobe/findings"]] == \
        [(f.id, f.subject) for f in found]
    for f in found:
        assert summary[f"gradprobe/finding/{f.id}/{f.subject}"].startswith(f"{f.severity}: ")
