"""Files from other people's runs are data: never executed, and every damaged one is refused
with one RunFileError line (never another exception, a traceback or a hang)."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradprobe
from gradprobe.record import RunFileError, RunWriter, load_run

ROOT = Path(__file__).resolve().parents[1]
CASES = {"tried": 0}          # fuzz cases tried (printed by the last test of this file)
_names = itertools.count()


class Evil:
    """A pickle whose loading would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def build_run(path: Path, steps: int = 40) -> Path:
    """A small but complete run file: meta, scalars, arrays and events, like a Probe writes."""
    losses = ["task", "cont", "proto"]
    writer = RunWriter(path)
    writer.set_meta(run_name="fuzz", gradprobe_version="test", losses=losses, task="task",
                    roles={"task": "task", "cont": "contrastive", "proto": "prototype"},
                    roles_guessed=["cont", "proto"], every=1, shared_parameters=["trunk.0.weight"],
                    shared_numel=320, latents=["z"], max_rows=1024)
    rng = np.random.default_rng(0)
    for step in range(steps):
        scalars = {}
        for name in losses:
            scalars[("loss", name)] = float(rng.random())
            scalars[("grad_norm", name)] = float(rng.random())
        scalars[("grad_cosine", "task|cont")] = float(rng.uniform(-1, 1))
        arrays = {("grad_gram", "shared"): rng.random((3, 3)),
                  ("singular_spectrum", "z"): rng.random(8).astype(np.float32)}
        if step == 7:
            writer.add_event(step, "non_finite", "cont", "loss 'cont' is nan")
        writer.write_step(step, scalars, arrays)
    writer.close()
    return path


def read_everything(run) -> None:
    """Touch every page a user (or analyze) can reach."""
    run.summary()
    for quantity in run.quantities():
        for name in run.names(quantity):
            run.series(quantity, name)
    for quantity in ("grad_gram", "singular_spectrum"):
        for name in run.array_names(quantity):
            run.arrays(quantity, name)
    run.events()
    run.probe_steps()
    sum(1 for _ in run.iter_scalars())


def load_and_read(path: Path) -> str:
    """'refused' or 'read'; any exception but RunFileError fails the test."""
    CASES["tried"] += 1
    try:
        with load_run(path) as run:
            read_everything(run)
    except RunFileError as exc:
        assert "\n" not in str(exc)
        return "refused"
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    return "read"


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gradprobe.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_bad_input(proc: subprocess.Popen, contains: str = "") -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("gradprobe: error: ") and contains in err, err
    return err.strip()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A valid run file and a valid checkpoint holding a probe state, as bytes."""
    base = tmp_path_factory.mktemp("corpus")
    run_bytes = build_run(base / "good.gprobe").read_bytes()
    probe = gradprobe.Probe(torch.nn.Linear(2, 2), every=1)
    probe._writer.close()
    probe._writer = RunWriter(None, initial_bytes=run_bytes)
    ckpt = base / "good.ckpt"
    torch.save({"model": {"w": torch.ones(2)}, "gradprobe": probe.state_dict()}, ckpt)
    with pytest.warns(gradprobe.GradprobeWarning, match="without having seen a backward"):
        probe.close()  # its own loop never ran: the run it carries was written above
    ckpt_bytes = ckpt.read_bytes()
    assert load_and_read(ckpt) == "read"
    return Corpus(run=run_bytes, ckpt=ckpt_bytes, dir=tmp_path_factory.mktemp("fuzz"))


class Corpus(dict):
    def __repr__(self) -> str:  # keep hypothesis' failure reports short
        return "<corpus>"


# -- code in a checkpoint is never run ---------------------------------------------------------

def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    paths = {
        "zip": tmp_path / "evil.ckpt",
        "legacy": tmp_path / "evil_legacy.ckpt",
        "pickle": tmp_path / "evil.pkl",
    }
    state = {"format": "gradprobe.state", "database": Evil(marker)}
    torch.save({"gradprobe": state}, paths["zip"])
    torch.save({"gradprobe": state}, paths["legacy"], _use_new_zipfile_serialization=False)
    paths["pickle"].write_bytes(pickle.dumps({"gradprobe": state}, protocol=4))
    for path in paths.values():
        with pytest.raises(RunFileError, match="refused: the checkpoint needs pickle code"):
            load_run(path)
        assert not marker.exists()


def test_run_file_with_views_triggers_or_generated_columns_is_refused(tmp_path):
    """A foreign SQLite file could hide SQL in its schema; only our own tables are read."""
    good = build_run(tmp_path / "good.gprobe").read_bytes()
    attacks = {
        "view": ["DROP TABLE steps",
                 "CREATE VIEW steps AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 "
                 "FROM c) SELECT x AS step, 0.0 AS wall_time FROM c"],
        "trigger": ["CREATE TRIGGER t AFTER INSERT ON events BEGIN DELETE FROM steps; END"],
        "generated": ["DROP TABLE events",
                      "CREATE TABLE events (step INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT "
                      "NOT NULL, message TEXT NOT NULL, x AS (zeroblob(1000000000)))"],
        "extra index": ["CREATE INDEX i ON step_scalars (step)"],
    }
    for label, statements in attacks.items():
        path = tmp_path / f"{label.replace(' ', '_')}.gprobe"
        path.write_bytes(good)
        conn = sqlite3.connect(path)
        for sql in statements:
            conn.execute(sql)
        conn.commit()
        conn.close()
        with pytest.raises(RunFileError, match="not a gradprobe run file|unexpected columns"):
            load_run(path)


# -- schema versions ---------------------------------------------------------------------------

def _with_meta(good: bytes, path: Path, **items) -> Path:
    path.write_bytes(good)
    conn = sqlite3.connect(path)
    conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                     [(k, json.dumps(v)) for k, v in items.items()])
    conn.commit()
    conn.close()
    return path


def test_newer_and_older_schema_versions_are_refused_never_misread(tmp_path):
    good = build_run(tmp_path / "good.gprobe").read_bytes()
    newer = _with_meta(good, tmp_path / "newer.gprobe", schema_version=2)
    older = _with_meta(good, tmp_path / "older.gprobe", schema_version=0)
    with pytest.raises(RunFileError, match="schema version 2, newer than the 1 this gradprobe "
                                           "reads; upgrade gradprobe"):
        load_run(newer)
    with pytest.raises(RunFileError, match="schema version 0 is older than any this gradprobe "
                                           "reads \\(1\\); it cannot be migrated"):
        load_run(older)
    # Appending to a file of another version is refused too (never half-converted).
    for path in (newer, older):
        with pytest.raises(RunFileError, match="cannot append.*schema version"):
            RunWriter(path)
    no_version = tmp_path / "no_version.gprobe"
    no_version.write_bytes(good)
    conn = sqlite3.connect(no_version)
    conn.execute("DELETE FROM meta WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RunFileError, match="no schema version"):
        load_run(no_version)


def test_metadata_of_the_wrong_type_is_refused(tmp_path):
    good = build_run(tmp_path / "good.gprobe").read_bytes()
    for i, (key, value) in enumerate([("losses", 5), ("roles", ["task"]), ("every", "1"),
                                      ("losses", [1, 2]), ("run_name", {"a": 1})]):
        path = _with_meta(good, tmp_path / f"meta{i}.gprobe", **{key: value})
        with pytest.raises(RunFileError, match=f"metadata '{key}'"):
            load_run(path)


def test_plain_failures_are_one_line(tmp_path):
    (tmp_path / "empty.gprobe").write_bytes(b"")
    (tmp_path / "text.gprobe").write_text("hello")
    (tmp_path / "adir").mkdir()
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.commit()
    expected = {"missing.gprobe": "no such file", "empty.gprobe": "empty file",
                "text.gprobe": "not a gradprobe run file or PyTorch checkpoint",
                "adir": "is a directory", "other.db": "not a gradprobe run file",
                "bad\0name": "no such file"}
    for name, message in expected.items():
        with pytest.raises(RunFileError, match=message):
            load_run(tmp_path / name if "\0" not in name else str(tmp_path) + "/" + name)


# -- fuzzing -----------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


def _write(corpus, data: bytes, suffix: str) -> Path:
    path = corpus["dir"] / f"case{next(_names)}{suffix}"
    path.write_bytes(data)
    return path


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for position, bit in flips:
        buf[position % len(buf)] ^= 1 << bit
    return bytes(buf)


@FUZZ
@given(data=st.binary(max_size=4096),
       prefix=st.sampled_from([b"", b"SQLite format 3\x00", b"PK\x03\x04", b"\x80\x02",
                               b"\x80\x04"]))
def test_fuzz_random_bytes(corpus, data, prefix):
    assert load_and_read(_write(corpus, prefix + data, ".bin")) == "refused" or prefix == b""


@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_fuzz_truncated_run_file(corpus, cut):
    good = corpus["run"]
    load_and_read(_write(corpus, good[:int(len(good) * cut)], ".gprobe"))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), min_size=1,
                      max_size=8),
       header_only=st.booleans())
def test_fuzz_bit_flipped_run_file(corpus, flips, header_only):
    good = corpus["run"]
    if header_only:  # the header and first pages (schema, meta) are where flips bite
        flips = [(p % 8192, b) for p, b in flips]
    load_and_read(_write(corpus, _flip(good, flips), ".gprobe"))


@FUZZ
@given(cut=st.floats(0.0, 0.999),
       flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), max_size=6))
def test_fuzz_truncated_and_bit_flipped_checkpoint(corpus, cut, flips):
    good = corpus["ckpt"]
    data = _flip(good, flips) if flips else good[:int(len(good) * cut)]
    load_and_read(_write(corpus, data, ".ckpt"))


def test_cli_refuses_bad_files_with_one_line_and_runs_nothing(tmp_path, corpus):
    """``python -m gradprobe.cli analyze``: exit 2, one line on stderr, no traceback, for the
    evil checkpoint, a newer schema and a sample of fuzzed files (run in parallel)."""
    marker = tmp_path / "MARKER"
    torch.save({"gradprobe": {"format": "gradprobe.state", "database": Evil(marker)}},
               tmp_path / "evil.ckpt")
    _with_meta(corpus["run"], tmp_path / "newer.gprobe", schema_version=2)
    good_run, good_ckpt = corpus["run"], corpus["ckpt"]
    rng = np.random.default_rng(1)
    samples = {
        "random.gprobe": rng.bytes(3000),
        "truncated.gprobe": good_run[:len(good_run) // 3],
        "flipped.gprobe": _flip(good_run, [(20, 3), (100, 5), (4096 + 10, 1)]),
        "truncated.ckpt": good_ckpt[:len(good_ckpt) // 2],
    }
    for name, data in samples.items():
        (tmp_path / name).write_bytes(data)
    expected = {"evil.ckpt": "refused: the checkpoint needs pickle code", "newer.gprobe":
                "upgrade gradprobe", **{name: "" for name in samples}}
    procs = {name: cli("analyze", name, cwd=tmp_path) for name in expected}
    for name, proc in procs.items():
        assert_bad_input(proc, expected[name])
        CASES["tried"] += name in samples
    assert not marker.exists()


def test_zz_report_fuzz_case_count():
    print(f"\nfuzz cases tried: {CASES['tried']}")
    assert CASES["tried"] >= 1000
