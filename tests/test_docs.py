"""The documented examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gradprobe

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_and_records(tmp_path):
    out = tmp_path / "quickstart.gprobe"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out",
                             str(out), "--steps", "60"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    run = gradprobe.load_run(out)
    assert run.probe_steps().tolist() == list(range(0, 60, 10))
    assert f"recorded 6 probe steps of {run.losses}" in result.stdout
    assert run.meta["shared_parameters"][0].startswith("backbone.")


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for marker in ("main-job", "tests"):
        match = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", readme)
        assert match, f"README.md lost its {marker} command"
        assert "pip install torch==2.13.0" in match.group(1)
        assert f"command_after {marker}" in ci
