"""Reading an offline W&B run as W&B's own reader sees it (``wandb leet inspect``), for the
tests of the W&B sink and of Lightning's WandbLogger."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def wandb_inspect(run_dir: Path, *options: str):
    """The run's records, one JSON line each, or with ``--summary`` the run's state and summary
    as one object."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                             *options, str(run_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    if "--summary" in options:
        return json.loads(result.stdout)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def finished_run(wandb_parent: Path, deadline: float = 60.0) -> tuple[Path, dict]:
    """The one offline run under ``wandb_parent``/wandb and its summary once the run file holds
    the run's end: W&B's service process writes the file, and finish() can return before its
    last records are there (seen about one run in three)."""
    run_dir = next((wandb_parent / "wandb").glob("offline-run-*"))
    give_up = time.monotonic() + deadline
    while (inspected := wandb_inspect(run_dir, "--summary"))["state"] != "finished":
        assert time.monotonic() < give_up, "the offline run file never recorded the run's end"
        time.sleep(0.2)
    return run_dir, inspected["summary"]
