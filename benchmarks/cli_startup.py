"""How long the ``gradprobe`` command takes from start to exit, and whether it imported torch.

Records a small run (a two-loss model, 300 steps, a probe step every 10) into a run file and a
checkpoint, then times, interleaved round by round in fresh processes: the bare interpreter,
``import torch`` alone (what a command that needs torch pays on top), ``gradprobe --help``,
``gradprobe analyze RUN.gprobe`` and ``gradprobe analyze RUN.ckpt``. Printed: the median and
fastest wall time of each, the median as a multiple of ``--help``'s, and whether the command
imported torch (one extra run each under ``python -X importtime``, which lists every import).

Usage: python benchmarks/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe


def record(folder: Path) -> tuple[Path, Path]:
    """A small real run: its run file, and a checkpoint holding the model and probe.state_dict()."""
    torch.manual_seed(0)
    trunk, a, b = nn.Sequential(nn.Linear(16, 64), nn.ReLU()), nn.Linear(64, 1), nn.Linear(64, 4)
    model = nn.ModuleDict({"trunk": trunk, "a": a, "b": b})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run_file, checkpoint = folder / "run.gprobe", folder / "run.ckpt"
    probe = gradprobe.Probe(model, shared=trunk, every=10, run_file=run_file)
    probe.watch_latent("z", trunk)
    for _ in range(300):
        x = torch.randn(64, 16)
        z = trunk(x)
        probe.backward({"reg": F.mse_loss(a(z).squeeze(1), x[:, 0]),
                        "cls": F.cross_entropy(b(z), (x[:, 1] > 0).long() * 3)},
                       weights={"cls": 0.01})
        opt.step()
        opt.zero_grad()
    probe.close()
    torch.save({"model": model.state_dict(), "gradprobe": probe.state_dict()}, checkpoint)
    return run_file, checkpoint


def commands(run_file: Path, checkpoint: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "gradprobe.cli"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "gradprobe --help": [*cli, "--help"],
        "gradprobe analyze run.gprobe": [*cli, "analyze", str(run_file)],
        "gradprobe analyze run.ckpt": [*cli, "analyze", str(checkpoint)],
    }


def imports_torch(command: list[str]) -> bool:
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True,
                          text=True, timeout=300)
    return any(line.rsplit("|", 1)[-1].strip().split(".")[0] == "torch"
               for line in done.stderr.splitlines() if line.startswith("import time:"))


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, timeout=300)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(*record(Path(tmp)))
        for command in cmds.values():  # warm the file cache and the bytecode
            wall_time(command)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.rounds):
            for name, command in cmds.items():
                times[name].append(wall_time(command))
        torch_used = {name: imports_torch(command) for name, command in cmds.items()}
    help_median = statistics.median(times["gradprobe --help"])
    print(f"{args.rounds} interleaved rounds, fresh process each, torch {torch.__version__}\n")
    print(f"{'command':32s} {'median s':>9s} {'fastest s':>10s} {'x --help':>9s}  imports torch")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32s} {median:9.2f} {min(values):10.2f} {median / help_median:9.2f}  "
              f"{'yes' if torch_used[name] else 'no'}")


if __name__ == "__main__":
    main()
