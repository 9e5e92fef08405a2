"""The background run-file writer on real files and real processes: nothing handed over is
lost at close, at exit or to garbage collection; a SIGKILL loses at most what was not yet
committed; errors reach the training thread once; a closed run is one file. (A reader
polling while it writes: tests/test_faults.py.)"""

from __future__ import annotations

import fcntl
import gc
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gradprobe.record import BackgroundRunWriter, RunFileError, RunWriter, load_run

from test_faults import ENV, FailingConnection, forking_server, train_then_kill


def _scalars(step: int) -> dict:
    return {("loss", "a"): float(step), ("grad_norm", "a"): step / 7.0}


def _write(writer, steps) -> None:
    for step in steps:
        writer.write_step(step, _scalars(step), {("grad_gram", "shared"): np.eye(2) * step})


def test_everything_handed_over_is_read_back_and_the_closed_run_is_one_file(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = BackgroundRunWriter(path)
    writer.set_meta(run_name="r", losses=["a"])
    _write(writer, range(40))
    writer.add_event(3, "non_finite", "a", "loss 'a' is NaN")
    writer.add_scalars(39, {("logged", "lr"): 0.1})
    writer.close()
    writer.close()  # safe twice
    assert sorted(os.listdir(tmp_path)) == ["r.gprobe"]
    with load_run(path) as run:
        assert run.probe_steps().tolist() == list(range(40))
        steps, values = run.series("grad_norm", "a")
        np.testing.assert_array_equal(values, np.arange(40) / 7.0)
        assert [float(a[0, 0]) for a in run.arrays("grad_gram", "shared")[1]] == list(range(40))
        assert run.events("non_finite")[0]["message"] == "loss 'a' is NaN"
        assert run.series("logged", "lr")[1].tolist() == [0.1]
        assert run.meta["run_name"] == "r"
    # Reading it created nothing beside it (a WAL-mode file would get -wal and -shm).
    assert sorted(os.listdir(tmp_path)) == ["r.gprobe"]


def test_flush_returns_once_every_step_handed_over_is_committed(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = BackgroundRunWriter(path)
    _write(writer, range(25))
    writer.flush()
    assert writer.committed_step == 24
    with load_run(path) as run:  # another connection: only committed data is visible
        assert run.probe_steps().tolist() == list(range(25))
    assert writer.last_step() == 24
    writer.close()


class GatedConnection(FailingConnection):
    """A connection whose commits wait until the test opens the gate (a disk that stalls)."""

    def __init__(self, conn, gate: threading.Event):
        super().__init__(conn)
        self.gate = gate

    def commit(self):
        self.gate.wait()
        return self._conn.commit()


def test_the_training_thread_never_waits_for_a_stalled_disk_until_the_queue_is_full(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = BackgroundRunWriter(path, max_pending=3)
    gate = threading.Event()
    writer._writer._conn = GatedConnection(writer._writer._conn, gate)
    _write(writer, range(3))  # returns although no commit has happened
    assert writer.committed_step is None
    trainer = threading.Thread(target=_write, args=(writer, range(3, 10)))
    trainer.start()
    deadline = time.monotonic() + 30
    while not writer._items.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer._items.full() and trainer.is_alive()  # handing over waits: back-pressure
    gate.set()
    trainer.join(timeout=30)
    writer.flush()
    assert writer.committed_step == 9
    writer.close()
    assert load_run(path).probe_steps().tolist() == list(range(10))


def test_submitted_functions_run_on_the_writer_thread_and_their_errors_surface_once(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = BackgroundRunWriter(path)
    threads = []

    def make(step):
        def numbers():
            threads.append(threading.get_ident())
            if step == 2:
                raise ValueError("eigen-decomposition failed")
            if step == 1:  # events found in the numbers travel with them
                return _scalars(step), None, [("non_finite", "a", "loss 'a' is NaN")]
            return _scalars(step), None
        return numbers

    for step in range(3):
        writer.submit(step, make(step))
    with pytest.raises(ValueError, match="eigen-decomposition failed"):
        writer.flush()
    writer.flush()  # raised once; the file is fine, so writing goes on
    writer.add_event(2, "probe_disabled", "probe", "ValueError: eigen-decomposition failed")
    writer.write_step(3, _scalars(3))
    writer.close()
    assert threads and threading.get_ident() not in threads
    with load_run(path) as run:
        assert run.probe_steps().tolist() == [0, 1, 3]
        assert [(e["step"], e["kind"]) for e in run.events()] == [(1, "non_finite"),
                                                                  (2, "probe_disabled")]


def test_a_failed_write_is_raised_once_then_every_write_fails_at_once(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = BackgroundRunWriter(path)
    writer._writer._conn = FailingConnection(writer._writer._conn, fail_after_commits=4)
    _write(writer, range(4))
    raised = []
    for step in range(4, 12):
        try:
            writer.write_step(step, _scalars(step))
            writer.flush()
        except RunFileError as exc:
            raised.append(str(exc))
    assert raised and "No space left on device" in raised[0]
    assert all(message == raised[0] for message in raised)  # the same failure, no new one
    writer.add_event(5, "probe_disabled", "probe", "dropped, never raises")
    writer.close()  # releases the file without raising again
    assert load_run(path).probe_steps().tolist() == [0, 1, 2, 3]
    RunWriter(path).close()  # the lock was released


def test_a_writer_dropped_without_close_commits_and_releases_the_file(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = BackgroundRunWriter(path)
    _write(writer, range(30))
    cycle = [writer]
    cycle.append(cycle)  # kept alive by a reference cycle, as a dropped probe is
    del writer, cycle
    gc.collect()
    assert load_run(path).probe_steps().tolist() == list(range(30))
    RunWriter(path).close()


EXITING = textwrap.dedent("""
    import sys
    import numpy as np
    from gradprobe.record import BackgroundRunWriter
    writer = BackgroundRunWriter(sys.argv[1], max_pending=64)
    for step in range(300):
        writer.write_step(step, {("loss", "a"): float(step)}, {("g", "s"): np.zeros((8, 8))})
    if sys.argv[2] == "raise":
        raise RuntimeError("the training loop crashed")
""")


@pytest.mark.parametrize("ending", ["exit", "raise"])
def test_the_interpreter_exit_commits_what_was_handed_over(tmp_path, ending):
    path = tmp_path / "r.gprobe"
    result = subprocess.run([sys.executable, "-c", EXITING, str(path), ending], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == (1 if ending == "raise" else 0), result.stderr
    assert load_run(path).probe_steps().tolist() == list(range(300))
    assert sorted(os.listdir(tmp_path)) == ["r.gprobe"]  # closed at exit: one file


# Each writer appends "handed committed" to <run>.steps after every step it hands over.
ZYGOTE = forking_server("""
    import os, sys
    import numpy as np
    from gradprobe.record import BackgroundRunWriter
""", """
    writer = BackgroundRunWriter(arg, max_pending=4)
    out = os.open(arg + ".steps", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    rng = np.random.default_rng(os.getpid())
    step = 0
    while True:
        writer.write_step(step, {("loss", k): float(rng.random()) for k in "abcd"},
                          {("grad_gram", "shared"): rng.random((4, 4))})
        committed = writer.committed_step
        os.write(out, f"{step} {-1 if committed is None else committed}\\n".encode())
        step += 1
""")


def test_sigkill_loses_only_steps_not_yet_committed(tmp_path):
    kills, max_pending = 8, 4
    rng = random.Random(3)
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for i in range(kills):
            log = tmp_path / f"kill{i}.gprobe"
            report = Path(str(log) + ".steps")
            train_then_kill(zygote, log, rng.uniform(0.05, 0.8))
            lines = [tuple(map(int, line.split())) for line in report.read_text().splitlines()
                     if len(line.split()) == 2]
            handed = max(h for h, _ in lines)
            committed = max(c for _, c in lines)
            with load_run(log) as run:
                steps = run.probe_steps().tolist()
                assert steps == list(range(len(steps))), "steps are not contiguous"
                assert committed < len(steps), "a step reported committed is missing"
                # Lost: at most the queue and the step being written (and the one being
                # handed over when the report line was cut short).
                assert handed + 1 - len(steps) <= max_pending + 2
                for quantity in run.quantities():
                    for name in run.names(quantity):
                        assert run.series(quantity, name)[0].tolist() == steps
                assert len(run.arrays("grad_gram", "shared")[1]) == len(steps)
                assert run._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)


# -- a closed run is one file ---------------------------------------------------------------

def test_close_under_an_open_reader_keeps_everything_the_reader_keeps_its_snapshot(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = RunWriter(path)
    _write(writer, range(5))
    live = load_run(path)  # holds its snapshot of a file being written
    writer.close()  # cannot leave WAL mode under the reader: stays in it, loses nothing
    assert live.probe_steps().tolist() == list(range(5))
    live.close()
    assert load_run(path).probe_steps().tolist() == list(range(5))
    assert not (tmp_path / "r.gprobe.lock").exists()


def test_a_reader_of_a_closed_run_does_not_block_a_resume(tmp_path):
    path = tmp_path / "r.gprobe"
    writer = RunWriter(path)
    _write(writer, range(5))
    writer.close()
    reader = load_run(path)
    assert reader.probe_steps().tolist() == list(range(5))
    resumed = RunWriter(path)  # would wait for the reader if it held a read transaction
    _write(resumed, range(5, 8))
    resumed.close()
    reader.close()
    assert load_run(path).probe_steps().tolist() == list(range(8))
    assert sorted(os.listdir(tmp_path)) == ["r.gprobe"]


def test_a_probed_and_analysed_run_leaves_only_its_run_file(tmp_path):
    from gradprobe import Probe
    from models import train

    log = tmp_path / "run.gprobe"

    def attach(model):
        probe = Probe(model, shared=model.trunk, every=2, run_file=log)
        probe.watch_latent("z_E")
        return probe

    train(6, attach)
    with load_run(log) as run:
        assert run.probe_steps().tolist() == [0, 2, 4]
    assert sorted(os.listdir(tmp_path)) == ["run.gprobe"]


def test_a_lock_taken_on_a_deleted_lock_file_is_taken_again_on_the_current_one(tmp_path,
                                                                               monkeypatch):
    path = tmp_path / "r.gprobe"
    lock_path = tmp_path / "r.gprobe.lock"
    real_flock, calls = fcntl.flock, []

    def flock_after_a_writer_closed(handle, operation):
        if not calls:
            # Between our open() and flock(), the writer holding the file closes: it deletes
            # the lock file, and a third writer creates a new one and locks it.
            lock_path.unlink()
            third = open(lock_path, "a+")
            real_flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
            calls.append(third)
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_writer_closed)
    with pytest.raises(RunFileError, match="already being written by another probe"):
        RunWriter(path)  # the lock on the deleted file is worthless: the new one is held
    calls[0].close()
    writer = RunWriter(path)
    assert os.fstat(writer._lock_file.fileno()).st_ino == os.stat(lock_path).st_ino
    writer.close()
    assert not lock_path.exists()


def test_an_unwritable_run_file_is_an_error_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunFileError, match="cannot create its directory"):
        BackgroundRunWriter(blocker / "sub" / "r.gprobe")
