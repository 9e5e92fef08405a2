"""A real ``torchrun`` (python -m torch.distributed.run) with 2 CPU processes on gloo, running
the documented example (examples/torchrun_train.py) with FSDP2, against one process that
trains the same model on the global batch (both ranks' shares)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gradprobe

ROOT = Path(__file__).resolve().parents[1]
STEPS = 7  # probe steps 0 and 5 at the example's every=5

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch build has no gloo backend for torchrun's 2 processes",
                allow_module_level=True)


def example():
    spec = importlib.util.spec_from_file_location("torchrun_train",
                                                  ROOT / "examples" / "torchrun_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_process_reference(out: Path) -> gradprobe.Run:
    """The example's loop in one process on the global batch: rank 0's rows, then rank 1's."""
    torch.manual_seed(0)
    model = example().TwoHeads()
    probe = gradprobe.Probe(model, every=5, run_file=out, overwrite=True)
    probe.watch_latent("h", model.trunk)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gens = [torch.Generator().manual_seed(rank) for rank in range(2)]
    for _ in range(STEPS):
        shares = [(torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g))
                  for g in gens]
        x, y = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
        pred, aux = model(x)
        probe.backward({"task": F.mse_loss(pred, y), "reg": aux.pow(2).mean()},
                       weights={"reg": 0.1})
        opt.step()
        opt.zero_grad()
    probe.close()
    return gradprobe.load_run(out)


def test_torchrun_fsdp2_records_the_global_batch_and_rank_0_writes(tmp_path):
    out = tmp_path / "fsdp.gprobe"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "examples" / "torchrun_train.py"), "--strategy", "fsdp",
         "--out", str(out), "--steps", str(STEPS)],
        capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = gradprobe.load_run(out)
    assert run.meta["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdp.gprobe"]  # rank 1 wrote none
    steps, cosines = run.series("grad_cosine", "task|reg")
    assert steps.tolist() == [0, 5]
    printed = [line for line in result.stdout.splitlines() if line.startswith("grad_cosine")]
    assert len(printed) == 1  # rank 0 only
    np.testing.assert_allclose(np.array(printed[0].split("[")[1].rstrip("]").split(), float),
                               cosines, rtol=1e-6)

    reference = single_process_reference(tmp_path.parent / "single_torchrun.gprobe")
    _, grams = run.arrays("grad_gram", "shared")
    _, ref_grams = reference.arrays("grad_gram", "shared")
    for gram, ref in zip(grams, ref_grams, strict=True):
        assert np.abs(gram - ref).max() <= 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(run.series("effective_rank", "h")[1],
                               reference.series("effective_rank", "h")[1], rtol=1e-4)
