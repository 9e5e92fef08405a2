"""A training process killed with SIGKILL leaves a run file holding every committed step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gradprobe

TRAINER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch, gradprobe
    from models import TwoLatentNet, four_losses, make_data
    torch.manual_seed(0)
    model = TwoLatentNet()
    x, y, g = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradprobe.Probe(model, shared=model.trunk, every=1, run_file=sys.argv[1])
    probe.watch_latent("z_I", model.f_I)
    step = 0
    while True:
        idx = torch.arange(step * 16, (step + 1) * 16) % len(x)
        losses, _ = four_losses(model, x[idx], y[idx], g[idx])
        probe.backward(losses)
        opt.step(); opt.zero_grad()
        committed = probe._writer.committed_step   # the last step the writer thread committed
        print(step, -1 if committed is None else committed, flush=True)
        step += 1
""")


def test_sigkill_mid_run_keeps_every_committed_step(tmp_path):
    log = tmp_path / "killed.gprobe"
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER.format(tests=str(Path(__file__).parent)))
    proc = subprocess.Popen([sys.executable, str(script), str(log)], stdout=subprocess.PIPE,
                            text=True)
    reported = []
    deadline = time.monotonic() + 120
    while len(reported) < 8 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        reported.append(tuple(int(v) for v in line.split()))
    # Analyse while training still writes: a reader sees a consistent prefix.
    live = gradprobe.load_run(log).probe_steps().tolist()
    committed = max(c for _, c in reported)
    assert live == list(range(len(live))) and len(live) > committed
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) == 8, "the trainer did not get going"
    steps = gradprobe.load_run(log).probe_steps().tolist()
    assert steps == list(range(len(steps)))
    assert len(steps) >= len(live) and len(steps) > committed  # nothing committed is lost
    # The probe's writer holds at most 8 steps (its queue) and the one it writes.
    assert len(reported) - len(steps) <= 8 + 1
    run = gradprobe.load_run(log)
    assert len(run.series("grad_norm", "task")[0]) == len(steps)
