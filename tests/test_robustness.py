"""Faults seen on public training loops, each on a real run: a watched module that returns a
tuple or a dict (PCGrad's multi-digit LeNet), a DANN run whose adversary is silent (its PDF
crashed), a probe that disabled itself, a run without a probe step, and an internal error in
the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import gradprobe
from gradprobe import GradprobeWarning
from gradprobe.cli import main
from gradprobe.demo.decoupling import GradReverse
from gradprobe.probe.cadence import is_probe_step
from gradprobe.record import RunWriter, run_from_state


class MultiLeNetR(nn.Module):
    """The shared encoder of the multi-digit LeNet used with PCGrad (Yu et al. 2020, after
    Sener & Koltun 2018): it returns the representation and the channel-dropout mask, which
    the task decoders reuse."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc = nn.Linear(320, 50)

    def forward(self, x, mask=None):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = self.conv2(x)
        if mask is None:
            mask = torch.bernoulli(torch.full((1, x.shape[1], 1, 1), 0.5)).expand(x.shape)
        if self.training:
            x = x * mask
        x = F.relu(F.max_pool2d(x, 2))
        return F.relu(self.fc(x.reshape(-1, 320))), mask


class MultiLeNetO(nn.Module):
    """A task decoder: (representation, mask) in, (log-probabilities, mask) out."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(50, 50), nn.Linear(50, 10)

    def forward(self, x, mask):
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1), mask


class DictLeNetR(MultiLeNetR):
    """The same encoder returning a dict, as some codebases write it."""

    def forward(self, x, mask=None):
        rep, mask = super().forward(x, mask)
        return {"rep": rep, "mask": mask}


def train_multilenet(encoder_class=MultiLeNetR, steps=12, log=None, watch=None, seed=0):
    """Left and right digit of two-digit images (random here: the run is about recording).
    Returns the probe's run, the representations of each step, and the warnings."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(16 * steps, 1, 28, 28, generator=gen)
    left, right = (torch.randint(0, 10, (16 * steps,), generator=gen) for _ in range(2))
    encoder, decoders = encoder_class(), nn.ModuleList([MultiLeNetO(), MultiLeNetO()])
    opt = torch.optim.SGD([*encoder.parameters(), *decoders.parameters()], lr=0.01)
    probe = gradprobe.Probe(nn.ModuleDict(dict(rep=encoder, heads=decoders)), run_file=log)
    if watch is not None:
        watch(probe, encoder)
    reps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            batch = slice(16 * step, 16 * (step + 1))
            out = encoder(x[batch])
            rep, mask = (out["rep"], out["mask"]) if isinstance(out, dict) else out
            reps.append(rep.detach().clone())
            (pred_l, _), (pred_r, _) = decoders[0](rep, mask), decoders[1](rep, mask)
            probe.backward({"left": F.nll_loss(pred_l, left[batch]),
                            "right": F.nll_loss(pred_r, right[batch])})
            opt.step()
            opt.zero_grad()
    probe.close()
    run = run_from_state(probe.state_dict(), "multilenet") if log is None else \
        gradprobe.load_run(log)
    messages = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    return run, reps, messages


def loss_statistics(run) -> dict:
    return {(q, n): run.series(q, n)[1] for q in ("loss", "grad_norm", "grad_cosine")
            for n in run.names(q)}


@pytest.fixture(scope="module")
def unwatched():
    return train_multilenet()[0]


def test_a_module_returning_rep_and_mask_records_rep(unwatched):
    run, reps, messages = train_multilenet(watch=lambda p, enc: p.watch_latent("rep", enc))
    assert messages == ["gradprobe: latent 'rep' is a tuple of 2 (tensor [16, 50], tensor "
                        "[16, 20, 8, 8]); recording its first element (pass select=0 to "
                        "confirm, or select= to pick another)"]
    steps = [s for s in range(12) if is_probe_step(s, None)]
    assert run.probe_steps().tolist() == steps
    assert run.series("latent_dim", "rep")[1].tolist() == [50.0] * len(steps)
    # the recorded norm is that of the representation each probe step saw
    expected = [float(reps[s].norm(dim=1).mean()) for s in steps]
    np.testing.assert_allclose(run.series("latent_norm", "rep")[1], expected, rtol=1e-6)
    # the losses' statistics are those of the same training without any watch
    ours, plain = loss_statistics(run), loss_statistics(unwatched)
    assert ours.keys() == plain.keys()
    for key in plain:
        np.testing.assert_allclose(ours[key], plain[key], rtol=1e-6, err_msg=str(key))
    # select=0 says the same without the warning
    chosen, _, quiet = train_multilenet(watch=lambda p, enc: p.watch_latent("rep", enc, select=0))
    assert quiet == []
    np.testing.assert_array_equal(chosen.series("latent_norm", "rep")[1],
                                  run.series("latent_norm", "rep")[1])


def test_select_picks_by_key_and_by_function():
    by_key, reps, quiet = train_multilenet(
        DictLeNetR, steps=4, watch=lambda p, enc: p.watch_latent("rep", enc, select="rep"))
    by_function, _, quiet_too = train_multilenet(
        DictLeNetR, steps=4, watch=lambda p, enc: p.watch_latent(
            "rep", enc, select=lambda out: out["rep"][:, :10]))
    assert quiet == quiet_too == []
    expected = [float(r.norm(dim=1).mean()) for r in reps]
    np.testing.assert_allclose(by_key.series("latent_norm", "rep")[1], expected, rtol=1e-6)
    np.testing.assert_allclose(by_function.series("latent_norm", "rep")[1],
                               [float(r[:, :10].norm(dim=1).mean()) for r in reps], rtol=1e-6)
    assert by_function.series("latent_dim", "rep")[1].tolist() == [10.0] * 4


def analyze(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["analyze", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_an_only_watch_that_cannot_be_read_is_dropped_and_reported(unwatched, tmp_path):
    log = tmp_path / "pcgrad.gprobe"
    run, _, messages = train_multilenet(DictLeNetR, log=log,
                                        watch=lambda p, enc: p.watch_latent("rep", enc))
    reason = ("latent 'rep' is a dict with keys ['rep', 'mask'], not a tensor; pass "
              "watch_latent('rep', module, select=...) with an index, a key or a function that "
              "returns the latent tensor")
    assert messages == [f"gradprobe: step 0: watch 'rep' disabled ({reason}); the losses and "
                        "the other watches go on recording"]
    # every loss statistic is recorded, at every probe step, as without the watch
    ours, plain = loss_statistics(run), loss_statistics(unwatched)
    assert ours.keys() == plain.keys()
    for key in plain:
        np.testing.assert_allclose(ours[key], plain[key], rtol=1e-6, err_msg=str(key))
    assert run.names("latent_norm") == []
    # analysed normally, with the watch's problem reported: terminal, JSON and PDF
    code, out, _ = analyze(log, "--json", tmp_path / "f.json", "-o", tmp_path / "r.pdf")
    assert code == 0
    assert "no failure modes found" not in out
    assert f"error   probe-incomplete  watch 'rep' was dropped at step 0: {reason}" in out
    found = [f for f in json.loads((tmp_path / "f.json").read_text())["findings"]
             if f["id"] == "probe-incomplete"]
    assert len(found) == 1 and found[0]["severity"] == "error"
    assert found[0]["subject"] == "rep" and found[0]["evidence"]["message"] == reason
    assert found[0]["evidence"]["probe_steps"] == len(run.probe_steps())
    pypdf = pytest.importorskip("pypdf")
    text = "".join(page.extract_text() for page in pypdf.PdfReader(tmp_path / "r.pdf").pages)
    assert "probe-incomplete" in text and "dropped at step 0" in text
    assert analyze(log, "--fail-on", "error")[0] == 1


def test_a_probe_that_disabled_itself_is_an_error_finding(tmp_path):
    """Two heads on two separate trunks, probed over every parameter two or more losses reach
    (``shared="all"``): there is none, so the probe cannot work."""
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    log = tmp_path / "separate.gprobe"
    probe = gradprobe.Probe(model, run_file=log, shared="all")
    with pytest.warns(GradprobeWarning, match="disabled itself at step 0"):
        for _ in range(5):
            x = torch.randn(8, 4)
            probe.backward({"a": model[0](x).pow(2).mean(), "b": model[1](x).abs().mean()})
    probe.close()
    code, out, _ = analyze(log, "--json", "-")
    assert code == 0
    title = ("the probe disabled itself at step 0: ProbeUsageError: no parameter of the model "
             "receives gradient from two or more losses: there is nothing shared to probe "
             "(pass shared=...)")
    assert title in out
    document = json.loads(out[out.index("{"):])
    assert document["run"]["losses"] == ["a", "b"]  # the metadata is written with the failure
    assert [(f["id"], f["severity"], f["title"]) for f in document["findings"]] == \
        [("probe-incomplete", "error", title)]


def test_a_run_without_a_probe_step_is_an_error_finding(tmp_path):
    """The loop calls loss.backward() itself and never probe.backward: nothing is recorded."""
    model = nn.Linear(4, 2)
    log = tmp_path / "empty.gprobe"
    probe = gradprobe.Probe(model, run_file=log)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
    with pytest.warns(gradprobe.GradprobeWarning, match=r"call probe\.backward\(losses\)"):
        probe.close()
    code, out, _ = analyze(log)
    assert code == 0
    assert out.splitlines()[0] == "run empty: no probe step was recorded; losses: none"
    assert "error   probe-incomplete  no probe step was recorded: there is nothing to analyse" \
        in out
    assert analyze(log, "--fail-on", "error")[0] == 1


def test_a_dann_run_whose_adversary_is_still_warming_up_gets_its_pdf(tmp_path):
    """DANN (Ganin et al. 2016) with the reversal coefficient held at 0 for a warm-up longer
    than the run: the domain loss's gradient on the features is exactly 0 at every probe
    step, an all-zero series on a log axis, which crashed the PDF report."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
    label_head, domain_head = nn.Linear(16, 2), nn.Linear(16, 2)
    model = nn.ModuleList([features, label_head, domain_head])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    log = tmp_path / "dann.gprobe"
    probe = gradprobe.Probe(model, shared=features, run_file=log, roles={"domain": "adversarial"})
    warm_up = 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradprobeWarning)
        for step in range(40):
            source, target = torch.randn(16, 6), torch.randn(16, 6) + 1.0
            labels = (source[:, 0] > 0).long()
            h_source, h_target = features(source), features(target)
            coefficient = 0.0 if step < warm_up else 1.0
            reversed_h = GradReverse.apply(torch.cat([h_source, h_target]), coefficient)
            domains = torch.cat([torch.zeros(16), torch.ones(16)]).long()
            probe.backward({"task": F.cross_entropy(label_head(h_source), labels),
                            "domain": F.cross_entropy(domain_head(reversed_h), domains)})
            opt.step()
            opt.zero_grad()
    probe.close()
    run = gradprobe.load_run(log)
    assert np.all(run.series("weighted_grad_norm", "domain")[1] == 0)
    result = subprocess.run([sys.executable, "-m", "gradprobe.cli", "analyze", str(log), "-o",
                             str(tmp_path / "dann.pdf")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    pypdf = pytest.importorskip("pypdf")
    pages = pypdf.PdfReader(tmp_path / "dann.pdf").pages
    assert any("Gradient balance" in page.extract_text() for page in pages)


def test_an_internal_error_is_one_line_and_exit_code_3(tmp_path):
    """A bug inside gradprobe (here a terminal view that raises) must not read as a finding
    (exit 1) or as bad input (exit 2), and prints no traceback."""
    writer = RunWriter(tmp_path / "r.gprobe")
    writer.set_meta(run_name="r", losses=["task"], task="task", every=1, roles={})
    writer.write_step(0, {("loss", "task"): 1.0})
    writer.close()
    script = ("import gradprobe.report as report\n"
              "def broken(*args, **kwargs):\n"
              "    raise RuntimeError('the view broke\\nwith a second line')\n"
              "report.summary_lines = broken\n"
              "from gradprobe.cli import main\n"
              f"main(['analyze', {str(tmp_path / 'r.gprobe')!r}, '--fail-on', 'warning'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "gradprobe: internal error: RuntimeError: the view broke (please report it, with the "
        "command that gave it)"]
