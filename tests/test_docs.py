"""The documented examples run as written."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import gradprobe
from gradprobe.probe.cadence import is_probe_step

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, out: Path, steps: int) -> str:
    """``python examples/<name>.py --out OUT --steps STEPS`` as a user runs it; its output."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--out",
                             str(out), "--steps", str(steps)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart_example_runs_and_records(tmp_path):
    out = tmp_path / "quickstart.gprobe"
    stdout = run_example("quickstart", out, 60)
    run = gradprobe.load_run(out)
    assert run.probe_steps().tolist() == list(range(0, 60, 10))
    assert f"recorded 6 probe steps of {run.losses}" in stdout
    assert run.meta["shared_parameters"][0].startswith("backbone.")


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for marker in ("main-job", "tests"):
        match = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", readme)
        assert match, f"README.md lost its {marker} command"
        assert "pip install torch==2.13.0" in match.group(1)
        assert f"command_after {marker}" in ci


def example(name: str):
    """An example script, imported as a module (its main() is not run)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pcgrad_example_runs_and_the_probe_leaves_its_surgery_unchanged(tmp_path):
    stdout = run_example("pcgrad", tmp_path / "pcgrad.gprobe", 30)
    scheduled = [s for s in range(30) if is_probe_step(s, None)]
    assert f"recorded {len(scheduled)} probe steps of ['left', 'right']" in stdout
    pcgrad = example("pcgrad")
    probed = pcgrad.train(30, str(tmp_path / "again.gprobe"))
    plain = pcgrad.train(30, None)
    for a, b in zip(probed["parameters"], plain["parameters"]):
        assert torch.equal(a, b)
    # what the probe records is what the surgery saw: the task gradients before projection
    run = gradprobe.load_run(tmp_path / "again.gprobe")
    steps, cosine = run.series("grad_cosine", "left|right")
    assert steps.tolist() == scheduled
    np.testing.assert_allclose(cosine, np.array(plain["cosines"])[steps], rtol=1e-4, atol=1e-6)


def test_scaler_and_accumulation_examples_leave_training_unchanged(tmp_path):
    loops = example("amp_and_accumulation")
    for loop, steps, calls in (("scaler", 12, 12), ("accumulation", 6, 6 * loops.MICRO_BATCHES)):
        train = loops.LOOPS[loop]
        for a, b in zip(train(steps, str(tmp_path / f"{loop}.gprobe")), train(steps, None)):
            assert torch.equal(a, b), loop
        run = gradprobe.load_run(tmp_path / f"{loop}.gprobe")
        # the step counter counts probe.backward calls: micro-batches when accumulating
        assert run.probe_steps().tolist() == [s for s in range(calls) if is_probe_step(s, None)]
    assert np.all(run.series("loss", "task")[1] > 0)
