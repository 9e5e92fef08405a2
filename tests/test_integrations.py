"""Optional integrations, each tested where its package is installed (gradprobe[lightning],
gradprobe[tensorboard], gradprobe[wandb]); without them these tests are skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe.diagnose import diagnose

from _wandb_read import finished_run, wandb_inspect
from models import WEIGHTS, TwoLatentNet, four_losses, make_data


def test_tensorboard_sink_holds_the_same_numbers_as_the_run_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from gradprobe.integrations.tensorboard import TensorBoardSink

    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = SummaryWriter(tmp_path / "tb")
    probe = gradprobe.Probe(model, shared=model.trunk, every=2, run_file=tmp_path / "r.gprobe",
                            sinks=[TensorBoardSink(writer)])
    probe.watch_latent("z_E")
    for step in range(6):
        losses, (_, z_E, _) = four_losses(model, x[:16], y[:16], g[:16])
        probe.observe(z_E=z_E)
        probe.backward(losses, weights=WEIGHTS)
        opt.step()
        opt.zero_grad()
        probe.log(lr=0.01)
    probe.close()
    writer.close()

    run = gradprobe.load_run(tmp_path / "r.gprobe")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    compared = 0
    for quantity in run.quantities():
        for name in run.names(quantity):
            steps, values = run.series(quantity, name)
            tag = TensorBoardSink.tag("gradprobe", quantity, name)
            assert tag in tags, tag
            board = events.Scalars(tag)
            assert [e.step for e in board] == steps.tolist()
            # TensorBoard stores float32.
            np.testing.assert_allclose([e.value for e in board], values.astype(np.float32),
                                       rtol=1e-6, equal_nan=True)
            compared += 1
    assert compared > 20 and "gradprobe/grad_cosine/task|cont" in tags


def test_failing_sink_is_dropped_with_one_warning_and_the_run_file_goes_on(tmp_path):
    class BrokenSink:
        def write_step(self, step, scalars):
            raise ConnectionError("dashboard went away")

    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    probe = gradprobe.Probe(model, shared=model.trunk, every=1, run_file=tmp_path / "r.gprobe",
                            sinks=[BrokenSink()])
    # Sinks are fed on the run file's writer thread: the warning comes by close() at the latest.
    with pytest.warns(gradprobe.GradprobeWarning, match="dashboard went away"):
        for _ in range(3):
            losses, _ = four_losses(model, x[:16], y[:16], g[:16])
            probe.backward(losses)
        probe.close()
    assert probe.enabled
    assert gradprobe.load_run(tmp_path / "r.gprobe").probe_steps().tolist() == [0, 1, 2]
    with pytest.raises(gradprobe.ProbeUsageError, match="write_step"):
        gradprobe.Probe(model, sinks=[object()])


def test_lightning_callback_records_a_readable_run_and_leaves_training_unchanged(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradprobe.integrations.lightning import GradProbeCallback

    x, y, g = make_data(n=64)
    batches = torch.utils.data.TensorDataset(x, y, g)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = TwoLatentNet()

        def training_step(self, batch, batch_idx):
            losses, _ = four_losses(self.net, *batch)
            return losses

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def fit(callbacks, module):
        trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks,
                             default_root_dir=tmp_path)
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=16))
        return module

    callback = GradProbeCallback(run_file=tmp_path / "pl.gprobe", weights=WEIGHTS, every=1,
                                 configure=lambda probe, m: probe.watch_latent("z_I", m.net.f_I))
    probed = fit([callback], Module())

    # The same training by hand, with the probe's own backward: same run, same parameters.
    torch.manual_seed(0)
    model = TwoLatentNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = gradprobe.Probe(model, every=1, run_file=tmp_path / "loop.gprobe")
    probe.watch_latent("z_I", model.f_I)
    for step in range(4):
        losses, _ = four_losses(model, x[step * 16:(step + 1) * 16], y[step * 16:(step + 1) * 16],
                                g[step * 16:(step + 1) * 16])
        probe.backward(losses, weights=WEIGHTS)
        opt.step()
        opt.zero_grad()
    probe.close()

    for a, b in zip(probed.net.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    run, loop = gradprobe.load_run(tmp_path / "pl.gprobe"), gradprobe.load_run(tmp_path / "loop.gprobe")
    assert run.probe_steps().tolist() == [0, 1, 2, 3]
    assert run.meta["shared_parameters"] == [f"net.{n}" for n in loop.meta["shared_parameters"]]
    for quantity, name in [("grad_norm", "task"), ("grad_cosine", "task|cont"),
                           ("loss", "orth"), ("effective_rank", "z_I")]:
        np.testing.assert_allclose(run.series(quantity, name)[1], loop.series(quantity, name)[1],
                                   rtol=1e-5)
    assert not {"training_step", "log"} & set(vars(probed))  # the wrappers are gone after fit


def test_wandb_sink_logs_the_run_files_numbers_and_each_finding_once(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    import live_run
    from gradprobe.integrations.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wb = wandb.init(project="gradprobe-test", dir=tmp_path)
    sink = WandbSink(wb)
    _, probe, _ = live_run.train(400, make_probe=lambda m: live_run.attach(
        m, run_file=tmp_path / "r.gprobe", sinks=[sink], findings_every=25))
    live = wb.summary["gradprobe/findings"]  # what the live findings wrote, before summarize
    final = probe.findings()
    sink.summarize(final)
    wb.finish()

    run_dir, summary = finished_run(tmp_path)
    records = wandb_inspect(run_dir)
    history = {}  # key -> {gradprobe/step: value}
    for record in records:
        if record["type"] == "history":
            row = record["history"]["item"]
            for key, value in row.items():
                if key.startswith("gradprobe/") and key != "gradprobe/step":
                    history.setdefault(key, {})[row["gradprobe/step"]] = value
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    compared = 0
    for quantity in run.quantities():
        for name in run.names(quantity):
            steps, values = run.series(quantity, name)
            logged = history.pop(WandbSink.key("gradprobe", quantity, name))
            assert list(logged) == steps.tolist()
            np.testing.assert_allclose(list(logged.values()), values, rtol=1e-12)
            compared += 1
    assert compared >= 10 and not history
    # The finding: one alert, and the summary's list, from the step it first appeared at.
    alerts = [r["alert"] for r in records if r["type"] == "alert"]
    assert [(a["title"], a["level"]) for a in alerts] == [("gradprobe: gradient-swamping (b)", "ERROR")]
    assert "'b' is swamped" in alerts[0]["text"] and "GradNormBalancer" in alerts[0]["text"]
    (entry,) = live
    assert (entry["id"], entry["subject"], entry["severity"]) == ("gradient-swamping", "b", "error")
    assert live_run.ONSET < entry["step"] < 400 and entry["step"] % 25 == 0

    # The summary at the end holds the run's final findings, as `gradprobe analyze` finds them.
    analyzed = diagnose(run)
    assert [(f["id"], f["subject"], f["severity"], f["title"]) for f in summary["gradprobe/findings"]] \
        == [(f.id, f.subject, f.severity, f.title) for f in analyzed]
    shown = {key: text for key, text in summary.items() if key.startswith("gradprobe/finding/")}
    assert shown == {f"gradprobe/finding/{f.id}/{f.subject}" if f.subject else
                     f"gradprobe/finding/{f.id}": f"{f.severity}: {f.title} [{f.key_number}]"
                     for f in analyzed}
    assert shown["gradprobe/finding/gradient-swamping/b"].startswith("error: 'b' is swamped")
    steps = {(f["id"], f["subject"]): f["step"] for f in summary["gradprobe/findings"]}
    assert steps.pop(("gradient-swamping", "b")) == entry["step"]  # first seen live there
    assert all(step is None for step in steps.values())  # any other was never handed over live


def test_wandb_summary_drops_a_finding_that_cleared(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    import live_run
    from gradprobe.integrations.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb = wandb.init(project="gradprobe-test", dir=tmp_path)
    sink = WandbSink(wb, alerts=False)
    _, probe, _ = live_run.train(300, make_probe=lambda m: live_run.attach(
        m, run_file=tmp_path / "r.gprobe", sinks=[sink], findings_every=25))
    assert "gradprobe/finding/gradient-swamping/b" in wb.summary.keys()
    # As if a later remedy had cleared the swamping: the rest of the findings stay.
    rest = [f for f in probe.findings() if f.id != "gradient-swamping"]
    sink.summarize(rest)
    wb.finish()
    _, summary = finished_run(tmp_path)
    assert not [k for k in summary if k.startswith("gradprobe/finding/gradient-swamping")]
    assert [f["id"] for f in summary["gradprobe/findings"]] == [f.id for f in rest]
