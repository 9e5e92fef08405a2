"""The default cadence: dense at the start, one probe step in 64 on a long run.

The schedule is checked against an independent numpy evaluation of the formula in
docs/probe.md, the documented counts, and a real 300-step training run.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.probe.cadence import is_probe_step

DOC = Path(__file__).resolve().parents[1] / "docs" / "probe.md"


def documented_schedule(steps: int) -> np.ndarray:
    """The probe steps of the formula in docs/probe.md, min(64, 2^floor(log2 sqrt s)), in numpy."""
    s = np.arange(steps)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.sqrt(s)))
    interval = np.minimum(64, 2.0 ** np.clip(exponent, 0, None)).astype(np.int64)
    return s[s % interval == 0]


def test_the_schedule_is_the_documented_formula():
    steps = 20_000
    ours = np.array([s for s in range(steps) if is_probe_step(s, None)])
    np.testing.assert_array_equal(ours, documented_schedule(steps))


def test_documented_counts_hold_and_a_long_run_pays_less_than_every_50():
    table = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| ([\d,]+) steps \| ([\d,]+) \| ([\d,]+) \|$", line)
        if match:
            table[int(match.group(1).replace(",", ""))] = (
                int(match.group(2).replace(",", "")), int(match.group(3).replace(",", "")))
    assert set(table) == {300, 1000, 10_000, 100_000}
    for steps, (default, every_50) in table.items():
        assert len(documented_schedule(steps)) == default
        assert len(range(0, steps, 50)) == every_50
    assert table[300][0] >= 30  # enough for the diagnosis windows on a short run
    assert table[100_000][0] < table[100_000][1]
    # every interval divides the next: the multiples of 64 are probe steps everywhere
    assert set(range(0, 20_000, 64)) <= set(documented_schedule(20_000).tolist())
    # a fixed cadence is exactly its multiples
    assert [s for s in range(100) if is_probe_step(s, 7)] == list(range(0, 100, 7))


def test_a_300_step_run_at_the_defaults_records_the_schedule(tmp_path):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])
    model = nn.ModuleDict(dict(trunk=trunk, heads=heads))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    probe = gradprobe.Probe(model, run_file=tmp_path / "short.gprobe")
    x = torch.randn(300, 6)
    for step in range(300):
        h = trunk(x[step:step + 1].expand(8, 6) + 0.1 * torch.randn(8, 6))
        losses = {"task": F.mse_loss(heads[0](h), torch.ones(8, 1)),
                  "aux": heads[1](h).pow(2).mean()}
        probe.backward(losses)
        opt.step()
        opt.zero_grad()
    probe.close()
    run = gradprobe.load_run(tmp_path / "short.gprobe")
    assert run.probe_steps().tolist() == documented_schedule(300).tolist()
    assert len(run.probe_steps()) == 49
    assert run.every is None and run.meta["cadence"].startswith("default")
