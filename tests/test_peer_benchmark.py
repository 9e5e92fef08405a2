"""benchmarks/probe_overhead.py --peers: every column trains the model the same way (so the
timings compare like with like), and a device that is not there is refused in one line."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import probe_overhead as bench  # noqa: E402


@pytest.mark.parametrize("make_model, batch", [
    (functools.partial(bench.ConvTwoLatent, length=20, width=8),
     (torch.randn(6, 4, 20), torch.randint(0, 2, (6,)).float(), torch.randint(0, 8, (6,)))),
    (functools.partial(bench.WideMLP, inp=16, width=32),
     (torch.randn(6, 16), torch.randint(0, 2, (6,)).float(), torch.randint(0, 8, (6,)))),
])
def test_every_peer_column_makes_the_plain_update(tmp_path, make_model, batch):
    if bench.torchjd_modules() is None:
        pytest.skip("torchjd is not installed")
    trained = {}
    for mode in bench.PEERS:
        trainer = bench.Trainer(make_model, batch, mode, tmp_path)
        for _ in range(3):  # past the first probe step: the layer-input route runs
            trainer.step()
        if trainer.probe is not None:
            trainer.probe.close()
        trained[mode] = list(trainer.model.parameters())
    plain = trained.pop("plain")
    reference = trained.pop(bench.REFERENCE)  # takes gradients, updates nothing
    assert any(not torch.equal(a, b) for a, b in zip(plain, reference))
    for mode, params in trained.items():
        for a, b in zip(params, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=mode)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_overhead.py"),
                           "--peers", "--device", "cuda"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]
