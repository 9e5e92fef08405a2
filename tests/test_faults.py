"""Faults during training: SIGKILL at random moments, a disk that fills, a file that becomes
unwritable, a second writer, a reader polling while training writes."""

from __future__ import annotations

import errno
import inspect
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import gradprobe
from gradprobe import GradprobeWarning
from gradprobe.record import BackgroundRunWriter, RunFileError, RunWriter, load_run

from models import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}

FORK_LOOP = textwrap.dedent("""
    print("ready", flush=True)
    for line in sys.stdin:
        command, arg = line.split()
        if command == "reap":
            _, status = os.waitpid(int(arg), 0)
            print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)
            continue
        pid = os.fork()
        if pid:
            print(pid, flush=True)
            continue
""")


def forking_server(setup: str, child: str) -> str:
    """A script that runs ``setup`` once, then forks a child per "train PATH" line it reads,
    which runs ``child`` with ``arg`` = PATH; "reap PID" prints the signal that ended PID.
    (A fresh interpreter per child would spend a test's time importing torch.)"""
    return (textwrap.dedent(setup) + FORK_LOOP +
            textwrap.indent(textwrap.dedent(child), " " * 4))


# Each trainer appends "handed committed" to <run>.steps once probe.backward has returned: the
# step just handed to the run file's writer thread, and the last step that thread committed.
ZYGOTE = forking_server("""
    import os, sys
    import torch, gradprobe
    from torch import nn
    torch.set_num_threads(1)
""", """
    torch.manual_seed(os.getpid())
    trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradprobe.Probe(model, shared=trunk, every=1, run_file=arg)
    probe.watch_latent("z")
    out = os.open(arg + ".steps", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    step = 0
    while True:
        x = torch.randn(16, 8)
        z = trunk(x)
        losses = {f"l{k}": heads[k](z).pow(2).mean() for k in range(3)}
        probe.observe(z=z)
        probe.backward(losses)
        committed = probe._writer.committed_step
        os.write(out, f"{step} {-1 if committed is None else committed}\\n".encode())
        opt.step(); opt.zero_grad()
        step += 1
""")


# Steps the probe's writer holds before handing over waits (BackgroundRunWriter's default).
MAX_PENDING = inspect.signature(BackgroundRunWriter).parameters["max_pending"].default


def _steps_written(path: Path) -> list[tuple[int, int]]:
    """(handed over, committed) per line the trainer wrote; a line cut by the kill is left out."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [(int(a), int(b)) for a, b in
            (line.split() for line in text.splitlines(keepends=True) if line.endswith("\n"))]


def train_then_kill(zygote: subprocess.Popen, log: Path, pause: float) -> None:
    """Fork a child of the forking server to write ``log``; SIGKILL it ``pause`` seconds after
    it reported its first step, and reap it."""
    zygote.stdin.write(f"train {log}\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    deadline = time.monotonic() + 30
    while not _steps_written(Path(str(log) + ".steps")) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(pause)
    os.kill(pid, signal.SIGKILL)
    zygote.stdin.write(f"reap {pid}\n")
    zygote.stdin.flush()
    assert int(zygote.stdout.readline()) == signal.SIGKILL


def test_sigkill_at_random_moments_keeps_every_committed_step(tmp_path):
    kills = 20
    rng = random.Random(8)
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert zygote.stdout.readline().strip() == "ready"
        results = []
        for i in range(kills):
            log = tmp_path / f"kill{i}.gprobe"
            train_then_kill(zygote, log, rng.uniform(0.05, 1.5))
            printed = _steps_written(Path(str(log) + ".steps"))
            handed = max(h for h, _ in printed)
            committed = max(c for _, c in printed)
            with load_run(log) as run:
                steps = run.probe_steps().tolist()
                assert steps == list(range(len(steps))), "steps are not contiguous"
                assert committed < len(steps), "a step reported committed is missing"
                # Lost: at most the steps waiting in the writer's queue and the one being
                # written (plus the one handed over but not yet reported).
                assert handed + 1 - len(steps) <= MAX_PENDING + 1
                assert len(steps) <= handed + 2  # nothing that was never handed over
                for quantity in run.quantities():
                    for name in run.names(quantity):
                        assert run.series(quantity, name)[0].tolist() == steps
                assert run._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            results.append((committed + 1, len(steps), handed + 1))
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert len(results) == kills and all(handed > 0 for *_, handed in results)
    print(f"\n{kills} kills; steps reported committed / in the file / handed over: {results}")


# -- a writer that fails ---------------------------------------------------------------------

def _attach(model, log, **kwargs):
    probe = gradprobe.Probe(model, shared=model.trunk, every=1, run_file=log, **kwargs)
    probe.watch_latent("z_I", model.f_I)
    probe.watch_latent("z_E")
    return probe


class FailingConnection:
    """A sqlite3 connection whose commit (or a chosen statement) starts failing with ENOSPC."""

    def __init__(self, conn, fail_after_commits=None, fail_sql=None):
        self._conn, self.commits = conn, 0
        self.fail_after_commits, self.fail_sql = fail_after_commits, fail_sql

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, *rest):
        if kind is None:
            self.commit()
        else:
            self._conn.rollback()

    def commit(self):
        self.commits += 1
        if self.fail_after_commits is not None and self.commits > self.fail_after_commits:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._conn.commit()

    def execute(self, sql, *args):
        if self.fail_sql and self.fail_sql in sql:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._conn.execute(sql, *args)


def _train_with(tmp_path, break_writer, steps=10, log_lr=False):
    log = tmp_path / "r.gprobe"

    def factory(model):
        probe = _attach(model, log)
        break_writer(probe._writer._writer)  # the run file's writer, behind the writer thread
        return probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if log_lr:
            from models import four_losses, make_data, WEIGHTS
            torch.manual_seed(0)
            from models import TwoLatentNet
            model = TwoLatentNet()
            probe = factory(model)
            x, y, g = make_data()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for step in range(steps):
                losses, (_, z_E, _) = four_losses(model, x[:16], y[:16], g[:16])
                probe.observe(z_E=z_E)
                probe.backward(losses, weights=WEIGHTS)
                opt.step()
                opt.zero_grad()
                probe.log(lr=0.01)
            probe.close()
        else:
            _, probe = train(steps, factory)
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    return probe, ours, log


def test_disk_full_inside_sqlite_warns_once_and_keeps_what_was_written(tmp_path):
    def fill_up(writer):
        pages = writer._conn.execute("PRAGMA page_count").fetchone()[0]
        writer._conn.execute(f"PRAGMA max_page_count={pages + 2}")  # SQLITE_FULL soon

    probe, warned, log = _train_with(tmp_path, fill_up, steps=30)
    assert probe.step == 30 and not probe.enabled
    assert len(warned) == 1 and "disabled itself" in warned[0] and "full" in warned[0], warned
    steps = load_run(log).probe_steps().tolist()
    assert 0 < len(steps) < 30 and steps == list(range(len(steps)))


def test_failure_at_commit_warns_once_and_keeps_what_was_written(tmp_path):
    def at_commit(writer):
        writer._conn = FailingConnection(writer._conn, fail_after_commits=4)

    probe, warned, log = _train_with(tmp_path, at_commit)
    assert probe.step == 10 and len(warned) == 1 and "No space left" in warned[0], warned
    assert load_run(log).probe_steps().tolist() == list(range(3))  # commit 1 is the metadata


def test_failure_when_flushing_logged_scalars_warns_once(tmp_path):
    def at_flush(writer):
        writer.flush_seconds = 0.0  # every log() flushes
        writer._conn = FailingConnection(writer._conn, fail_after_commits=6)

    probe, warned, log = _train_with(tmp_path, at_flush, log_lr=True)
    assert probe.step == 10 and len(warned) == 1 and "No space left" in warned[0], warned
    run = load_run(log)
    steps = run.probe_steps().tolist()
    assert steps and steps == list(range(len(steps)))


def test_a_close_that_meets_the_failure_already_reported_does_not_warn_again(tmp_path):
    """The writer thread can meet the same full disk as the training thread's flush: the
    probe disabled itself with one warning, and the writer raises it again at close."""
    def at_flush(writer):
        writer.flush_seconds = 0.0
        writer._conn = FailingConnection(writer._conn, fail_after_commits=6)
        real_close = writer.close

        def close():
            real_close()
            raise OSError(errno.ENOSPC, "No space left on device")
        writer.close = close

    probe, warned, log = _train_with(tmp_path, at_flush, log_lr=True)
    assert not probe.enabled
    assert len(warned) == 1 and "disabled itself" in warned[0], warned
    steps = load_run(log).probe_steps().tolist()
    assert steps and steps == list(range(len(steps)))


def test_failure_at_close_warns_once_and_the_run_stays_readable(tmp_path):
    def at_close(writer):
        writer._conn = FailingConnection(writer._conn, fail_sql="wal_checkpoint")

    probe, warned, log = _train_with(tmp_path, at_close)
    assert len(warned) == 1 and "could not close the run file cleanly" in warned[0], warned
    assert load_run(log).probe_steps().tolist() == list(range(10))
    # The lock was released: a new writer can take the file.
    RunWriter(log).close()


def test_file_that_becomes_read_only_mid_run_warns_once(tmp_path):

    def read_only_later(writer):
        real = writer.write_step

        def write_step(step, *args, **kwargs):
            if step == 4:
                writer._conn.execute("PRAGMA query_only=ON")  # "attempt to write a readonly db"
            return real(step, *args, **kwargs)
        writer.write_step = write_step

    probe, warned, log = _train_with(tmp_path, read_only_later)
    assert probe.step == 10 and len(warned) == 1 and "readonly" in warned[0], warned
    assert load_run(log).probe_steps().tolist() == [0, 1, 2, 3]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_one_clear_error_at_construction(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RunFileError, match="cannot write the run file .*Permission denied"):
            gradprobe.Probe(torch.nn.Linear(2, 2), every=1, run_file=ro / "r.gprobe")
    finally:
        ro.chmod(0o755)


def test_unwritable_location_is_one_clear_error_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunFileError, match="cannot write the run file .*cannot create its "
                                           "directory"):
        gradprobe.Probe(torch.nn.Linear(2, 2), every=1, run_file=blocker / "sub" / "r.gprobe")


# -- two writers, a reader while writing -------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from gradprobe.record import RunWriter
    writer = RunWriter(sys.argv[1])
    writer.set_meta(format="gradprobe.run")
    writer.write_step(0, {("loss", "a"): 1.0})
    print("holding", flush=True)
    sys.stdin.readline()
    writer.close()
""")


def test_second_writer_in_another_process_is_refused_and_cannot_delete_the_file(tmp_path):
    log = tmp_path / "r.gprobe"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(log)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "holding"
        for overwrite in (False, True):
            with pytest.raises(RunFileError, match="already being written by another probe"):
                RunWriter(log, overwrite=overwrite)
        with pytest.raises(RunFileError, match="already being written by another probe"):
            gradprobe.Probe(torch.nn.Linear(2, 2), every=1, run_file=log)
        assert load_run(log).probe_steps().tolist() == [0]
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    assert load_run(log).probe_steps().tolist() == [0]


def test_probe_overwrite_never_deletes_a_file_another_probe_writes(tmp_path):
    log = tmp_path / "r.gprobe"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(log)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunFileError, match="already being written"):
            gradprobe.Probe(torch.nn.Linear(2, 2), every=1, run_file=log, overwrite=True)
        assert log.exists() and load_run(log).probe_steps().tolist() == [0]
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)


READER = textwrap.dedent("""
    import sys, time
    from gradprobe.record import RunFileError, load_run
    path, total = sys.argv[1], int(sys.argv[2])
    print("ready", flush=True)
    reads, seen, last = 0, [], -1
    deadline = time.monotonic() + 120
    while last < total and time.monotonic() < deadline:
        try:
            run = load_run(path)
        except RunFileError as exc:
            if any(s in str(exc) for s in ("no such file", "empty file", "not a gradprobe")):
                continue  # not created yet / schema not committed yet
            raise
        with run:
            steps = run.probe_steps().tolist()
            assert steps == list(range(len(steps))), steps
            for quantity in run.quantities():
                for name in run.names(quantity):
                    got = run.series(quantity, name)[0].tolist()
                    assert got == steps, (quantity, name, len(got), len(steps))
            assert len(run.arrays("grad_gram", "shared")[1]) == len(steps)
        assert len(steps) >= max(last, 0)
        last = len(steps)
        reads += 1
        seen.append(last)
    print(reads, len(set(seen)), last, flush=True)
""")


@pytest.mark.parametrize("writer_class", [RunWriter, BackgroundRunWriter])
def test_reader_in_another_process_sees_a_consistent_prefix_while_writing(tmp_path,
                                                                         writer_class):
    import numpy as np

    log = tmp_path / "live.gprobe"
    total = 1500
    reader = subprocess.Popen([sys.executable, "-c", READER, str(log), str(total)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert reader.stdout.readline().strip() == "ready"
    writer = writer_class(log)
    writer.set_meta(format="gradprobe.run", losses=["a", "b", "c"])
    rng = np.random.default_rng(0)
    for step in range(total):
        scalars = {(q, n): float(rng.random()) for q in ("loss", "grad_norm")
                   for n in ("a", "b", "c")}
        writer.write_step(step, scalars, {("grad_gram", "shared"): rng.random((3, 3))})
        if step % 100 == 0:
            time.sleep(0.05)
    writer.close()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    reads, distinct, last = map(int, out.split())
    assert last == total and distinct >= 3, out  # it did read while the file grew
