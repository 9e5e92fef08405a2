"""A quick command line: ``gradprobe`` imports torch only to read a checkpoint. Each command runs
as a real subprocess under ``python -X importtime``, which lists every module the process
imported, on a real recorded run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradprobe
from gradprobe.diagnose import diagnose

from models import train


def gradprobe_imports(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``gradprobe ARGS``; return the finished process and the top-level names of the
    modules it imported (``-X importtime`` writes one ``import time:`` line per module)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradprobe.cli", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    names = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:")]
    assert names[0] == "imported package"  # the listing's header: the listing is there
    return done, {name.split(".")[0] for name in names[1:]}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A real 4-loss run with a saturation watch (so the PDF draws the saturation page): its run
    file and a checkpoint holding probe.state_dict()."""
    folder = tmp_path_factory.mktemp("imports")

    def factory(model):
        probe = gradprobe.Probe(model, shared=model.trunk, every=2, run_file=folder / "r.gprobe")
        probe.watch_latent("z_I", model.f_I)
        probe.watch_latent("z_E")
        probe.watch_saturation("logit", model.head)
        return probe

    model, probe = train(30, factory)
    torch.save({"model": model.state_dict(), "gradprobe": probe.state_dict()}, folder / "r.ckpt")
    return folder


def test_help_and_version_import_no_torch(recorded):
    for args, shows in ((["--help"], "analyze"), (["--version"], gradprobe.__version__),
                        (["analyze", "--help"], "--fail-on")):
        done, imported = gradprobe_imports(*args, cwd=recorded)
        assert done.returncode == 0, done.stderr[-2000:]
        assert shows in done.stdout and "torch" not in imported, args


def test_analyze_of_a_run_file_imports_no_torch_for_terminal_json_and_pdf(recorded):
    expected = [f.id for f in diagnose(gradprobe.load_run(recorded / "r.gprobe"))]
    done, imported = gradprobe_imports("analyze", "r.gprobe", cwd=recorded)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(i in done.stdout for i in expected)
    assert not imported & {"torch", "matplotlib", "seaborn"}  # the terminal draws no figure

    done, imported = gradprobe_imports("analyze", "r.gprobe", "--json", "-", "-o", "r.pdf",
                                       cwd=recorded)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" not in imported
    assert "matplotlib" in imported  # the PDF was drawn in this process
    assert [f["id"] for f in json.loads(done.stdout)["findings"]] == expected
    pdf = (recorded / "r.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000


def test_export_and_compare_of_run_files_import_no_torch(recorded):
    done, imported = gradprobe_imports("export", "r.gprobe", "-o", "r.csv", cwd=recorded)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" not in imported
    with open(recorded / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == int(done.stdout.split()[0]) > 0
    assert {"loss", "saturated_fraction"} <= {row["quantity"] for row in rows}

    done, imported = gradprobe_imports("compare", "r.gprobe", "r.gprobe", "-o", "c.pdf",
                                       cwd=recorded)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" not in imported
    assert (recorded / "c.pdf").read_bytes().startswith(b"%PDF")


def test_a_checkpoint_is_read_with_torch(recorded):
    """The other side of the check: a checkpoint needs torch.load, and the same listing shows it
    (so the lists above would show torch had it been imported)."""
    done, imported = gradprobe_imports("analyze", "r.ckpt", "--json", "-", cwd=recorded)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" in imported
    expected = [f.id for f in diagnose(gradprobe.load_run(recorded / "r.gprobe"))]
    assert [f["id"] for f in json.loads(done.stdout)["findings"]] == expected
