"""Findings while the run trains: ``gradprobe watch`` on a run another process writes (through
a pseudo-terminal), ``probe.findings()`` and ``Probe(on_finding=...)`` on real runs."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import warnings
from pathlib import Path

import pytest
import torch

import gradprobe
from gradprobe.diagnose import diagnose
from click.testing import CliRunner

from gradprobe.cli import main
from gradprobe.record import CLOSED, GONE, WRITING, RunWriter, writer_state
from gradprobe.report import summary_lines

import live_run

TESTS = Path(__file__).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\r")


def _env() -> dict:
    root = str(TESTS.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + (os.pathsep + path if path else ""),
            "TERM": "xterm-256color", "COLUMNS": "150", "LINES": "60"}


class Terminal:
    """``gradprobe watch ...`` on the slave side of a pseudo-terminal; the test reads the
    master side as a terminal emulator would receive it."""

    def __init__(self, *args: str):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 150, 0, 0))
        self.process = subprocess.Popen([sys.executable, "-m", "gradprobe.cli", "watch", *args],
                                        stdin=slave, stdout=slave, stderr=slave, env=_env(),
                                        close_fds=True)
        os.close(slave)
        self.master = master
        self.raw = b""

    def read_until(self, pattern: str, timeout: float) -> bool:
        """Read until the text (escape codes removed) matches ``pattern``, or EOF or timeout."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return bool(re.search(pattern, self.text))
        return True

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the process closed the terminal
            return False
        self.raw += chunk
        return bool(chunk)

    def finish(self, timeout: float = 60) -> int:
        while self._read(0.5) and self.process.poll() is None:
            pass
        while self._read(0.1):
            pass
        code = self.process.wait(timeout)
        os.close(self.master)
        return code

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))


def test_watch_shows_swamping_appear_while_another_process_trains(tmp_path):
    run_file, release = tmp_path / "live.gprobe", tmp_path / "release"
    # The watcher starts first: it waits for the run file to appear.
    terminal = Terminal(str(run_file), "--every", "0.2", "--timeout", "120", "--fail-on", "error")
    assert terminal.read_until(r"waiting for the run file to appear", 120), terminal.text
    trainer = subprocess.Popen([sys.executable, str(TESTS / "live_run.py"), str(run_file),
                                "--release", str(release)], env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = terminal.read_until(r"gradient-swamping\s+\d+\s+\d+-\d+", 120)
        still_training = trainer.poll() is None
        release.touch()
        out, _ = trainer.communicate(timeout=120)
        code = terminal.finish()
    finally:
        release.touch()
        trainer.kill()
        terminal.process.kill()
    text = terminal.text
    assert seen and still_training, text[-3000:]
    trained = int(re.search(r"trained (\d+) steps", out).group(1))
    # The live view, refreshed in place, showed the finding in a frame of the running run,
    # with the step it first appeared at: after the onset, before training ended.
    first_frame = text[:re.search(r"gradient-swamping\s+\d+\s+\d+-\d+", text).end()]
    assert "training" in first_frame.splitlines()[-20:][0] or " training " in first_frame
    since = int(re.search(r"gradient-swamping\s+(\d+)\s+\d+-\d+", text).group(1))
    assert live_run.ONSET < since < trained
    # Then the final summary, as `gradprobe analyze` prints it, and analyze's exit code.
    final = diagnose(gradprobe.load_run(run_file))
    swamped = [f for f in final if f.id == "gradient-swamping"]
    assert swamped and swamped[0].subject == "b" and swamped[0].severity == "error"
    assert "closed" in text[text.rindex("gradient-swamping") - 3000:]
    assert re.search(r"error\s+gradient-swamping\s+'b' is swamped", text)
    assert code == 1, text[-2000:]
    assert not (tmp_path / "live.gprobe.lock").exists()


def test_watch_ends_on_ctrl_c_with_the_summary_and_analyzes_exit_code(tmp_path):
    run_file = tmp_path / "open.gprobe"
    writer = RunWriter(run_file)  # a run whose writer is alive and keeps it open
    writer.set_meta(losses=["a"], run_name="open")
    writer.write_step(0, {("loss", "a"): 1.0})
    terminal = Terminal(str(run_file), "--every", "0.2")
    try:
        assert terminal.read_until(r"training\s+step 0\s+probe steps 1", 120), terminal.text
        terminal.process.send_signal(signal.SIGINT)
        code = terminal.finish()
    finally:
        terminal.process.kill()
        writer.close()
    assert code == 0, terminal.text[-2000:]
    assert "interrupted  step 0" in terminal.text
    assert "run open: 1 probe steps (cadence not recorded, last step 0); losses: a" in terminal.text


def cli(*args: str):
    """The real command, in this process (the pseudo-terminal test above runs it as its own)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_watch_of_a_closed_run_prints_the_summary_and_exits_as_analyze(tmp_path):
    run_file = tmp_path / "done.gprobe"
    live_run.train(300, make_probe=lambda m: live_run.attach(m, run_file=run_file))
    run = gradprobe.load_run(run_file)
    summary = summary_lines(run.summary(), diagnose(run))
    assert summary[0].startswith("run done: 150 probe steps")
    assert any("gradient-swamping" in line for line in summary)
    analyze, watch = cli("analyze", run_file, "--fail-on", "warning"), \
        cli("watch", run_file, "--fail-on", "warning")
    assert watch.exit_code == analyze.exit_code == 1
    assert analyze.output.splitlines() == summary
    # watch shows the run's last state once (not a terminal), then exactly analyze's lines.
    assert watch.output.splitlines()[-len(summary):] == summary
    assert "closed  step 298  probe steps 150" in watch.output


def test_watch_waits_for_a_missing_run_and_gives_up_with_one_line(tmp_path):
    start = time.monotonic()
    result = cli("watch", tmp_path / "never.gprobe", "--timeout", "1", "--every", "0.2")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        f"gradprobe: error: {tmp_path / 'never.gprobe'}: no run file appeared within 1 s "
        "(start the training, or pass a longer --timeout)")
    assert time.monotonic() - start >= 1
    foreign = tmp_path / "notes.gprobe"
    foreign.write_text("not a run")
    result = cli("watch", foreign)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == \
        f"gradprobe: error: {foreign}: not a gradprobe run file or PyTorch checkpoint"


def test_writer_state_tells_writing_closed_and_a_stale_lock_apart(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = RunWriter(path)
    writer.write_step(0, {("loss", "a"): 1.0})
    assert writer_state(path) == WRITING
    writer.close()
    assert writer_state(path) == CLOSED
    # A writer killed without closing: its process is gone, its lock file stays.
    killed = tmp_path / "killed.gprobe"
    child = os.fork()
    if child == 0:
        try:
            RunWriter(killed).write_step(0, {("loss", "a"): 1.0})
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert (tmp_path / "killed.gprobe.lock").exists()
    assert writer_state(killed) == GONE
    # watch on it: the committed step, the stale lock named, analyze's exit code.
    result = cli("watch", killed, "--fail-on", "warning")
    assert "is gone without closing the run (stale lock" in result.output
    assert "writer gone (stale lock)  step 0  probe steps 1" in result.output
    assert "run killed: 1 probe steps" in result.output
    assert result.exit_code == 0
    # A new writer still takes the stale lock over.
    RunWriter(killed).close()
    assert writer_state(killed) == CLOSED


# ---------------------------------------------------------------- in the training process

def test_on_finding_fires_once_after_the_onset_with_the_finding(tmp_path):
    calls = []
    probe = None

    def on_finding(finding):
        calls.append((probe.step, finding))

    def make(model):
        nonlocal probe
        probe = live_run.attach(model, run_file=tmp_path / "r.gprobe", on_finding=on_finding,
                                findings_every=25)
        return probe

    live_run.train(400, make_probe=make)
    assert len(calls) == 1, [(s, f.id, f.subject) for s, f in calls]
    step, finding = calls[0]
    assert (finding.id, finding.subject, finding.severity) == ("gradient-swamping", "b", "error")
    assert step > live_run.ONSET and step % 25 == 0
    # The evidence is the recorded prefix: the ratio held below 1% only from the onset on,
    # and the finding names the held range that starts there.
    run = gradprobe.load_run(tmp_path / "r.gprobe")
    steps, weighted_b = run.series("weighted_grad_norm", "b")
    _, weighted_a = run.series("weighted_grad_norm", "a")
    swamped = steps[weighted_b / weighted_a < 0.01]
    assert swamped.min() >= live_run.ONSET
    assert live_run.ONSET <= finding.steps[0] and finding.steps[1] < step
    assert finding.evidence["median_ratio"] < 0.01


def test_a_raising_on_finding_is_reported_once_and_training_is_unchanged(tmp_path):
    calls = []

    def alarm(finding):
        calls.append(finding.id)
        raise RuntimeError("pager service unreachable")

    plain, _, _ = live_run.train(400)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probed, probe, _ = live_run.train(400, make_probe=lambda m: live_run.attach(
            m, run_file=tmp_path / "r.gprobe", on_finding=alarm, findings_every=25))
    reported = [w for w in caught if "pager service unreachable" in str(w.message)]
    assert len(reported) == 1 and issubclass(reported[0].category, gradprobe.GradprobeWarning)
    assert "on_finding raised RuntimeError" in str(reported[0].message)
    assert calls == ["gradient-swamping"]
    assert probe.enabled
    for a, b in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(a, b)
    assert gradprobe.load_run(tmp_path / "r.gprobe").probe_steps()[-1] == 398


def test_findings_is_analyze_of_what_was_recorded_so_far(tmp_path):
    seen = {}

    def check(probe, step):
        if step in (139, 399):
            # The writer thread commits handed-over steps while training goes on: with its
            # queue drained, the two readers below see the same committed steps.
            probe._writer.flush()
            found = probe.findings()
            # The same as analyze on the run file as it is now, read by another reader.
            expected = diagnose(gradprobe.load_run(tmp_path / "r.gprobe"))
            assert [f.to_dict() for f in found] == [f.to_dict() for f in expected]
            assert probe.findings() is not found  # a copy of the cached list
            seen[step] = {(f.id, f.subject) for f in found}

    live_run.train(400, make_probe=lambda m: live_run.attach(m, run_file=tmp_path / "r.gprobe"),
                   after_step=check)
    assert ("gradient-swamping", "b") not in seen[139]  # healthy before the onset
    assert ("gradient-swamping", "b") in seen[399]
    in_memory = gradprobe.Probe(torch.nn.Linear(2, 1))
    assert [f.id for f in in_memory.findings()] == ["probe-incomplete"]


def test_findings_arguments_are_checked():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(gradprobe.ProbeUsageError, match="on_finding must be a callable"):
        gradprobe.Probe(model, on_finding="print")
    with pytest.raises(gradprobe.ProbeUsageError, match="findings_every must be a positive"):
        gradprobe.Probe(model, on_finding=print, findings_every=0)
