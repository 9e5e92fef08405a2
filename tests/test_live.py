"""Findings while the run trains: ``gradprobe watch`` on a run another process writes (through
a pseudo-terminal), ``probe.findings()`` and ``Probe(on_finding=...)`` on real runs."""

from __future__ import annotations

import fcntl
import io
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
from rich.console import Console

from gradprobe.cli import main
from gradprobe.record import CLOSED, GONE, WRITING, RunWriter, writer_state
from gradprobe.report import summary_lines
from gradprobe.report.live import watch as watch_live

import live_run
from screen import Screen

TESTS = Path(__file__).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\r")


def _env() -> dict:
    root = str(TESTS.parent)
    path = os.environ.get("PYTHONPATH")
    # The terminal's size is the pseudo-terminal's (TIOCSWINSZ), as for a user: no COLUMNS.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + (os.pathsep + path if path else ""),
            "TERM": "xterm-256color"}


def _default_sigint() -> None:
    """In the child: Ctrl-C interrupts, even where the test runs with SIGINT ignored (a
    background job of a non-interactive shell), which a child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """``gradprobe watch ...`` on the slave side of a ``rows`` x ``columns`` pseudo-terminal;
    the test reads the master side as a terminal emulator would receive it (``screen``: what
    that terminal shows)."""

    def __init__(self, *args: str, rows: int = 24, columns: int = 80):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.size = (rows, columns)
        self.process = subprocess.Popen([sys.executable, "-m", "gradprobe.cli", "watch", *args],
                                        stdin=slave, stdout=slave, stderr=slave, env=_env(),
                                        close_fds=True, preexec_fn=_default_sigint)
        os.close(slave)
        self.master = master
        self.raw = b""

    def read_until(self, pattern: str, timeout: float, on_screen: bool = False) -> bool:
        """Read until the text (escape codes removed), or with ``on_screen`` a row of the
        screen, matches ``pattern``; False at EOF or timeout."""
        deadline = time.monotonic() + timeout
        while not self._found(pattern, on_screen):
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return self._found(pattern, on_screen)
        return True

    def _found(self, pattern: str, on_screen: bool) -> bool:
        if on_screen:
            return any(re.search(pattern, row) for row in self.screen().rows)
        return bool(re.search(pattern, self.text))

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the process closed the terminal
            return False
        self.raw += chunk
        return bool(chunk)

    def finish(self, timeout: float = 60) -> int:
        """Read until the process ends and return its exit code; past ``timeout`` seconds
        kill it and fail."""
        deadline = time.monotonic() + timeout
        while self._read(0.5) and self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"gradprobe watch did not end within {timeout} s:\n"
                            + self.text[-2000:])
        end = time.monotonic() + 5
        while time.monotonic() < end and self._read(0.1):
            pass
        try:
            code = self.process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"gradprobe watch closed its terminal but did not exit within {timeout} s")
        os.close(self.master)
        return code

    def screen(self) -> Screen:
        screen = Screen(*self.size)
        screen.feed(self.raw.decode("utf-8", "replace"))
        return screen

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))


# The swamping title's where (per-layer blocks recorded) and per-layer spread, when shown.
ON_LAYERS = r"(?: on the layers they share(?: \([0-9.]+% to [0-9.]+% on its \d+ layers\))?)?"
SWAMPING_ROW = (r"^error\s+gradient-swamping\s+'b'\s+ratio ([0-9.e-]+) \(median\)\s+"
                r"seen (\d+), held (\d+)-(\d+)$")


def _start_trainer(run_file: Path, release: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "live_run.py"), str(run_file),
                             "--release", str(release)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_watch_at_80x24_shows_swamping_appear_while_another_process_trains(tmp_path):
    run_file, release = tmp_path / "live.gprobe", tmp_path / "release"
    # The watcher starts first, in an 80 x 24 terminal: it waits for the run file to appear.
    terminal = Terminal(str(run_file), "--every", "0.2", "--timeout", "120", "--fail-on", "error")
    assert terminal.read_until(r"waiting for the run file to appear", 120), terminal.text
    trainer = _start_trainer(run_file, release)
    try:
        seen = terminal.read_until(SWAMPING_ROW, 120, on_screen=True)
        rows = terminal.screen().rows
        still_training = trainer.poll() is None
        release.touch()
        out, _ = trainer.communicate(timeout=120)
        code = terminal.finish()
    finally:
        release.touch()
        trainer.kill()
        terminal.process.kill()
    assert seen and still_training, "\n".join(rows)
    trained = int(re.search(r"trained (\d+) steps", out).group(1))
    # One screen row of the running run's frame holds the id, the quoted subject and the key
    # number (and when it was seen and held); the title wraps under it, whole.
    at = next(i for i, row in enumerate(rows) if re.search(SWAMPING_ROW, row))
    ratio, since, first, last = re.search(SWAMPING_ROW, rows[at]).groups()
    assert live_run.ONSET < int(since) < trained and live_run.ONSET <= int(first) <= int(last)
    assert rows[0].startswith("gradprobe watch live")  # the path may wrap below it
    assert any(row.startswith("training  step") for row in rows[1:at])
    title = " ".join(row.strip() for row in rows[at + 1:] if row.startswith("        "))
    percent = float(re.fullmatch(r"'b' is swamped: its weighted gradient is ([0-9.]+)% of "
                                 r"that of 'a'" + ON_LAYERS, title).group(1))
    assert percent == pytest.approx(100 * float(ratio), rel=0.5)
    # The frame fits: no row cut off by rich's overflow marker, the losses table above.
    assert not any(row.strip() == "..." for row in rows)
    assert any(re.match(r" b\s+[0-9.e-]+\s+0\.002\s", row) for row in rows)
    # The final summary, as `gradprobe analyze` prints it, and analyze's exit code.
    final = diagnose(gradprobe.load_run(run_file))
    swamped = [f for f in final if f.id == "gradient-swamping"]
    assert swamped and swamped[0].subject == "b" and swamped[0].severity == "error"
    text = terminal.text
    assert "closed  step" in text[text.rindex("gradient-swamping") - 3000:]
    assert re.search(r"error\s+gradient-swamping\s+'b' is swamped", text)
    assert code == 1, text[-2000:]
    assert not (tmp_path / "live.gprobe.lock").exists()


def _read_lines(stream, until: str, timeout: float, lines: list[str]) -> bool:
    """Append the lines ``stream`` gives (as they come) until one matches ``until``."""
    deadline, buffer = time.monotonic() + timeout, b""
    fd = stream.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        done = [line.decode() for line in complete]
        lines.extend(done)
        if any(re.search(until, line) for line in done):
            return True
    return False


def test_watch_plain_in_a_pipe_prints_one_line_per_change_as_it_happens(tmp_path):
    run_file, release = tmp_path / "live.gprobe", tmp_path / "release"
    # A pipe, as a CI log: no terminal, so --plain is the default.
    watcher = subprocess.Popen([sys.executable, "-m", "gradprobe.cli", "watch", str(run_file),
                                "--every", "0.2", "--timeout", "120", "--fail-on", "error"],
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=_default_sigint)
    trainer, lines = None, []
    try:
        assert _read_lines(watcher.stdout, "waiting for the run file", 120, lines), lines
        trainer = _start_trainer(run_file, release)
        # The finding's line arrives while the run trains: flushed as it happens.
        seen = _read_lines(watcher.stdout, "gradient-swamping", 120, lines)
        still_training = trainer.poll() is None
        release.touch()
        out, _ = trainer.communicate(timeout=120)
        _read_lines(watcher.stdout, r"^\d+ errors?$", 120, lines)
        code = watcher.wait(60)
    finally:
        release.touch()
        for process in (trainer, watcher):
            if process is not None:
                process.kill()
    assert seen and still_training, lines
    assert code == 1, lines
    run = gradprobe.load_run(run_file)
    final, summary = diagnose(run), run.summary()
    expected_summary = summary_lines(summary, final)
    # Line by line: waiting, training progress, the finding as it appeared, the ending, then
    # exactly analyze's lines.
    assert lines[0] == f"gradprobe watch {run_file}: waiting for the run file to appear"
    assert re.fullmatch(r"step (\d+|-): training, \d+ probe steps?", lines[1]), lines
    appeared = lines.index(next(line for line in lines if "gradient-swamping" in line))
    assert all(re.fullmatch(r"step \d+: training, \d+ probe steps?(, [0-9.]+ steps/s)?", line)
               for line in lines[2:appeared]), lines
    match = re.fullmatch(r"step (\d+): error  gradient-swamping 'b'  \[ratio [0-9.e-]+ "
                         r"\(median\)\]  'b' is swamped: its weighted gradient is [0-9.]+% of "
                         r"that of 'a'" + ON_LAYERS + r" \(held (\d+)-(\d+)\)", lines[appeared])
    assert match, lines[appeared]
    trained = int(re.search(r"trained (\d+) steps", out).group(1))
    assert live_run.ONSET < int(match.group(1)) < trained
    assert live_run.ONSET <= int(match.group(2)) <= int(match.group(3)) <= int(match.group(1))
    ending = len(lines) - len(expected_summary) - 1
    assert all(re.fullmatch(r"step \d+: training, .*", line) for line in lines[appeared + 1:ending])
    assert lines[ending] == (f"step {summary['last_step']}: closed, "
                             f"{summary['probe_steps']} probe steps") or \
        lines[ending].startswith(f"step {summary['last_step']}: closed, "
                                 f"{summary['probe_steps']} probe steps, ")
    assert lines[ending + 1:] == expected_summary


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
    assert "run open: 1 probe step (cadence not recorded, last step 0); losses: a" in terminal.text


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
    # Not a terminal: --plain, one line per finding found and the ending, then exactly
    # analyze's lines.
    found = diagnose(run)
    assert watch.output.splitlines() == [
        f"step 298: {f.severity}  {f.id} '{f.subject}'  [{f.key_number}]  {f.title} "
        f"(held {f.steps[0]}-{f.steps[1]})" for f in found] + ["step 298: closed, 150 probe steps",
                                                               *summary]


def test_the_tests_screen_wraps_scrolls_and_redraws_as_a_terminal():
    screen = Screen(3, 10)
    screen.feed("x" * 10 + "\n" + "y" * 11)  # exactly 10 columns: no extra row
    assert screen.rows == ["x" * 10, "y" * 10, "y"]
    screen.feed("\x1b[2K\x1b[1A\x1b[2K\x1b[1Gzz\x1b[31mz\x1b[0m")  # rich's redraw
    assert screen.rows == ["x" * 10, "zzz", ""]
    screen.feed("\n\n\nw")
    assert screen.scrolled == ["x" * 10, "zzz"] and screen.rows == ["", "", "w"]


def test_the_live_view_of_a_run_too_large_for_80x24_fits_the_terminal(tmp_path):
    """12 losses and 7 findings do not fit 24 rows whole: the frame keeps to 24 rows of 80
    columns (no overflow marker), and says how many losses and findings it left out."""
    run_file = tmp_path / "many.gprobe"
    live_run.many_losses(run_file)
    found = diagnose(gradprobe.load_run(run_file))
    assert len(found) == 7
    out = io.StringIO()
    watch_live(run_file, console=Console(file=out, force_terminal=True, width=80, height=24),
               plain=False)
    screen = Screen(24, 80)
    screen.feed(out.getvalue())
    rows = screen.scrolled + screen.rows
    top = max(i for i, row in enumerate(rows) if row.startswith("gradprobe watch many"))
    frame = [row for row in rows[top:] if row]
    assert len(frame) <= 24 and not any(row.strip() == "..." for row in frame), frame
    assert "closed  step 118  probe steps 60  rate -" in frame[1:3]  # below the path
    losses = [row for row in frame if re.match(r" task\d\d\s", row)]
    left_out = re.search(r"\.\.\. (\d+) more losses \(a taller terminal shows them\)",
                         "\n".join(frame))
    assert losses and left_out and len(losses) + int(left_out.group(1)) == 12
    # Every finding has its id, quoted subject and key number on one row, where those fit 80
    # columns; the one whose subject and key name six losses has its id and subject there.
    def row_of(f) -> str:
        return f"{f.severity:<8}{f.id}  '{f.subject}'  {f.key_number}"

    fitting = [f for f in found if len(row_of(f)) <= 80]
    assert len(fitting) == 6
    for f in fitting:
        assert any(re.fullmatch(rf"{f.severity}\s+{f.id}\s+'{re.escape(f.subject)}'\s+"
                                rf"{re.escape(f.key_number)}(\s+held \d+-\d+)?", row)
                   for row in frame), (f.id, f.subject, frame)
    # The seventh (its subject and key name six losses) has its id and subject on a row,
    # or, where the rows left are too few for it, the frame says it left one finding out.
    wide = next(f for f in found if f not in fitting)
    more = re.search(r"\.\.\. (\d+) more findings? \(listed at the end\)", "\n".join(frame))
    shown = any(row == f"warning {wide.id}  '{wide.subject}'" for row in frame)
    assert shown != bool(more) and (not more or more.group(1) == "1"), frame


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
    assert "step 0: writer gone (stale lock), 1 probe step" in result.output
    assert "run killed: 1 probe step (cadence not recorded, last step 0)" in result.output
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


def test_findings_right_after_the_first_backward_is_never_probe_incomplete(tmp_path):
    """The writer thread commits the first step while the training thread goes on:
    findings() waits for it (bounded), so it never reads a run without a probe step."""
    for attempt in range(100):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        probe = gradprobe.Probe(model, shared=model[0], run_file=tmp_path / f"r{attempt}.gprobe")
        out = model(torch.randn(16, 4))
        probe.backward({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].abs().mean()})
        found = probe.findings()
        assert "probe-incomplete" not in [f.id for f in found], (attempt, found)
        assert probe._writer.committed_step == 0
        probe.close()


def test_a_loop_that_never_calls_backward_is_warned_about_at_close(tmp_path):
    model = torch.nn.Linear(4, 2)
    probe = gradprobe.Probe(model, run_file=tmp_path / "r.gprobe")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        model(torch.randn(8, 4)).pow(2).mean().backward()  # the user's own backward only
        opt.step()
        opt.zero_grad()
    with pytest.warns(gradprobe.GradprobeWarning) as caught:
        probe.close()
    assert [str(w.message) for w in caught] == [
        f"gradprobe: the probe is closed without having seen a backward, so the run "
        f"{tmp_path / 'r.gprobe'} records nothing: call probe.backward(losses) in the training "
        "loop instead of loss.backward() (or probe.before_backward(losses) and "
        "probe.after_backward(pending) around a backward of your own)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe.close()  # once
    # analyze says it in words.
    result = cli("analyze", tmp_path / "r.gprobe")
    assert result.output.splitlines()[0] == "run r: no probe step was recorded; losses: none"
    assert "None" not in result.output
    # A loop that calls it is not warned.
    probe = gradprobe.Probe(model, run_file=tmp_path / "ok.gprobe")
    probe.backward({"a": model(torch.randn(8, 4)).pow(2).mean()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe.close()
