"""GradProbeCallback under Lightning's DDP strategy and its FSDP2 route (ModelParallelStrategy),
2 CPU processes on gloo each, against one process on the global batch
(tests/lightning_fit.py, run as a script under a deadline: Lightning's launcher runs it
again for rank 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

import gradprobe

pytest.importorskip("lightning.pytorch")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch build has no gloo backend for the 2-process fits",
                allow_module_level=True)

SCRIPT = Path(__file__).resolve().parent / "lightning_fit.py"


def fit(mode: str, run_file: Path) -> gradprobe.Run:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(SCRIPT), mode, str(run_file)],
                            capture_output=True, text=True, timeout=150, env=env,
                            cwd=run_file.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return gradprobe.load_run(run_file)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fit("single", tmp_path_factory.mktemp("single") / "single.gprobe")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_fit_records_the_global_gram_and_rank_0_writes(tmp_path, reference, mode):
    run = fit(mode, tmp_path / f"{mode}.gprobe")
    assert run.meta["world_size"] == 2 and reference.meta["world_size"] == 1
    assert sorted(run.meta["shared_parameters"]) == \
        sorted(reference.meta["shared_parameters"]) == ["trunk.2.bias", "trunk.2.weight"]
    steps, grams = run.arrays("grad_gram", "shared")
    ref_steps, ref_grams = reference.arrays("grad_gram", "shared")
    assert list(steps) == list(ref_steps) == [0, 2, 4]
    for gram, ref in zip(grams, ref_grams):
        assert np.abs(gram - ref).max() <= 1e-5 * np.abs(ref).max()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{mode}.gprobe"]
