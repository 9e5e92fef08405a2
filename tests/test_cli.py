"""The command line, run as a real subprocess on real recorded runs."""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe.diagnose import diagnose

from models import train


def gradprobe_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradprobe.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real 4-loss run: its run file and a checkpoint holding probe.state_dict()."""
    folder = tmp_path_factory.mktemp("cli")

    def factory(model):
        probe = gradprobe.Probe(model, shared=model.trunk, every=2, run_file=folder / "r.gprobe")
        probe.watch_latent("z_I", model.f_I)
        probe.watch_latent("z_E")
        return probe

    model, probe = train(40, factory)
    torch.save({"model": model.state_dict(), "gradprobe": probe.state_dict()}, folder / "r.ckpt")
    return folder


def test_analyze_prints_summary_and_writes_schema_json(recorded):
    result = gradprobe_cli("analyze", recorded / "r.gprobe", "--json", recorded / "f.json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("run r: 20 probe steps (every 2, last step 38)")
    document = json.loads((recorded / "f.json").read_text())
    assert document["gradprobe"] == gradprobe.__version__
    assert document["run"]["losses"] == ["task", "cont", "proto", "orth"]
    expected = diagnose(gradprobe.load_run(recorded / "r.gprobe"))
    assert [f["id"] for f in document["findings"]] == [f.id for f in expected]
    for finding in document["findings"]:
        assert set(finding) >= {"id", "severity", "title", "evidence", "remedy", "steps"}
        assert finding["id"] in result.stdout


def test_checkpoint_and_run_file_give_the_same_findings(recorded):
    from_ckpt = gradprobe_cli("analyze", recorded / "r.ckpt", "--json", "-")
    from_file = gradprobe_cli("analyze", recorded / "r.gprobe", "--json", "-")
    assert from_ckpt.returncode == from_file.returncode == 0
    a, b = json.loads(from_ckpt.stdout), json.loads(from_file.stdout)
    assert a["findings"] == b["findings"] and a["run"]["probe_steps"] == 20


def test_fail_on_gates_on_severity(recorded, tmp_path):
    findings = diagnose(gradprobe.load_run(recorded / "r.gprobe"))
    severities = {f.severity for f in findings}
    result = gradprobe_cli("analyze", recorded / "r.gprobe", "--fail-on", "warning")
    assert result.returncode == (1 if severities & {"warning", "error"} else 0)
    result = gradprobe_cli("analyze", recorded / "r.gprobe", "--fail-on", "error")
    assert result.returncode == (1 if "error" in severities else 0)
    config = tmp_path / "bad.toml"
    config.write_text("not_a_threshold = 3\n")
    result = gradprobe_cli("analyze", recorded / "r.gprobe", "--config", config)
    assert result.returncode == 2
    assert "not_a_threshold" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_export_writes_every_scalar_in_long_form(recorded, tmp_path):
    out = tmp_path / "m.csv"
    result = gradprobe_cli("export", recorded / "r.gprobe", "-o", out)
    assert result.returncode == 0, result.stderr
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    run = gradprobe.load_run(recorded / "r.gprobe")
    assert len(rows) == sum(len(run.series(q, n)[0]) for q in run.quantities()
                            for n in run.names(q))
    cosine = [(int(r["step"]), float(r["value"])) for r in rows
              if r["quantity"] == "grad_cosine" and r["name"] == "task|cont"]
    steps, values = run.series("grad_cosine", "task|cont")
    assert [s for s, _ in cosine] == steps.tolist()
    np.testing.assert_allclose([v for _, v in cosine], values)


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("kind", ["empty", "directory", "text", "truncated", "pickle-code",
                                  "missing", "no-state"])
def test_bad_input_exits_2_with_one_line(recorded, tmp_path, kind):
    path = tmp_path / f"{kind}.bin"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("step,loss\n1,2\n")
    elif kind == "truncated":
        path.write_bytes((recorded / "r.gprobe").read_bytes()[:3000])
    elif kind == "pickle-code":
        path.write_bytes(pickle.dumps({"gradprobe": RunsCode()}))
    elif kind == "no-state":
        torch.save({"model": {"w": torch.ones(2)}}, path)
    result = gradprobe_cli("analyze", path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "this must never run" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradprobe: error: ")
    assert str(path) in lines[0]


def test_help_teaches_the_commands():
    result = gradprobe_cli("--help")
    assert result.returncode == 0
    for command in ("analyze", "export", "compare", "demo"):
        assert command in result.stdout
    result = gradprobe_cli("analyze", "--help")
    assert "--fail-on" in result.stdout and "weights_only" in result.stdout
