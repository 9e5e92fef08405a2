"""Write, read and analyse a synthetic run of 1,000,000 probe steps at every=1.

    python benchmarks/long_run.py [--steps 1000000] [--commit-seconds 0.5] [--out /tmp/gp-long]

Each step carries 12 scalars (loss, weight, grad_norm, weighted_grad_norm of 3 losses) and its
``steps`` row, written with ``RunWriter.write_step``. ``--commit-seconds 0`` commits every step
(the default of a Probe, the crash-safe mode); the default here, 0.5, is group commit
(docs/run-file.md: a SIGKILL then loses at most the last 0.5 s of steps). ``--per-step N``
also times N steps in the per-step-commit mode. Prints write time, file size, load_run + every
series read time, diagnose time (when gradprobe.diagnose imports) and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from gradprobe.record import RunWriter, load_run

LOSSES = ["task", "cont", "proto"]
WEIGHTS = {"task": 1.0, "cont": 0.05, "proto": 0.1}


def remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def write(path: Path, steps: int, commit_seconds: float) -> float:
    remove(path)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    writer = RunWriter(path, commit_seconds=commit_seconds)
    writer.set_meta(run_name="long", gradprobe_version="bench", losses=LOSSES, task="task",
                    roles={"task": "task", "cont": "contrastive", "proto": "prototype"},
                    roles_guessed=[], every=1, shared_parameters=["trunk.weight"],
                    shared_numel=4160)
    keys = [(q, n) for q in ("loss", "weight", "grad_norm", "weighted_grad_norm") for n in LOSSES]
    chunk = 10_000
    for start in range(0, steps, chunk):
        n = min(chunk, steps - start)
        decay = np.exp(-np.arange(start, start + n) / (steps / 5))[:, None]
        table = np.empty((n, len(keys)))
        table[:, 0:3] = (0.1 + decay) * rng.lognormal(0, 0.3, (n, 3))
        table[:, 3:6] = [WEIGHTS[k] for k in LOSSES]
        table[:, 6:9] = (0.2 + decay) * rng.lognormal(0, 0.4, (n, 3))
        table[:, 9:12] = table[:, 3:6] * table[:, 6:9]
        for i, row in enumerate(table.tolist()):
            writer.write_step(start + i, dict(zip(keys, row)))
    writer.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--commit-seconds", type=float, default=0.5)
    parser.add_argument("--per-step", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gradprobe-long"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.per_step:
        seconds = write(args.out / "per_step.gprobe", args.per_step, 0.0)
        print(f"per-step commit: {args.per_step:,} steps in {seconds:.1f} s "
              f"({seconds / args.per_step * 1e6:.0f} us a step)")
    path = args.out / "long.gprobe"
    seconds = write(path, args.steps, args.commit_seconds)
    print(f"write: {args.steps:,} steps (12 scalars each, commit every "
          f"{args.commit_seconds} s) in {seconds:.1f} s; file {path.stat().st_size / 1e6:.0f} MB")
    t0 = time.perf_counter()
    run = load_run(path)
    points = 0
    for quantity in run.quantities():
        for name in run.names(quantity):
            points += len(run.series(quantity, name)[0])
    steps = run.probe_steps()
    print(f"read: load_run + every series ({points:,} points, {len(steps):,} steps) in "
          f"{time.perf_counter() - t0:.1f} s")
    try:
        from gradprobe.diagnose import diagnose
    except Exception as exc:  # noqa: BLE001 - the module is being finished elsewhere
        print(f"diagnose: skipped ({type(exc).__name__}: {exc})")
    else:
        t0 = time.perf_counter()
        findings = diagnose(run)
        print(f"diagnose: {len(findings)} findings in {time.perf_counter() - t0:.1f} s "
              "(target < 30 s)")
    run.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:.0f} MB (target < 1024 MB)")


if __name__ == "__main__":
    main()
