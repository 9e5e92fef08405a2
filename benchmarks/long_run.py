"""Write, read and analyse a synthetic run of 1,000,000 probe steps at every=1.

    python benchmarks/long_run.py [--steps 1000000] [--scalars 12] [--commit-seconds 0.5]
                                  [--per-step 20000] [--profile] [--out /tmp/gradprobe-long]

Each step carries ``--scalars`` scalars (12: loss, weight, grad_norm, weighted_grad_norm of 3
losses; 30 adds the pairwise cosine / dot / magnitude similarity, the combined norm, latent
gradient norms and latent statistics) and its ``steps`` row, written with
``RunWriter.write_step``. ``--commit-seconds 0`` commits every step (the default of a Probe, the
crash-safe mode); the default here, 0.5, is group commit (docs/run-file.md: a SIGKILL then loses
at most the last 0.5 s of steps). ``--per-step N`` first times N steps in the per-step-commit
mode, with 12 and with 30 scalars. Prints: per-step commit cost, write time, file size,
load_run time, every-series read time, diagnose time (with ``--profile``: its cProfile top 10)
and peak RSS. ``--steps 20000`` is a quick check.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import signal
import time
from pathlib import Path

import numpy as np

from gradprobe.record import RunWriter, load_run

LOSSES = ["task", "cont", "proto"]
WEIGHTS = {"task": 1.0, "cont": 0.05, "proto": 0.1}
PAIRS = ["task|cont", "task|proto", "cont|proto"]


class OutOfTime(BaseException):
    """Raised by a timer inside diagnose (a BaseException: diagnose catches a rule's Exception)."""


def _out_of_time(*_) -> None:
    raise OutOfTime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def scalar_keys(count: int) -> list[tuple[str, str]]:
    keys = [(q, n) for q in ("loss", "weight", "grad_norm", "weighted_grad_norm") for n in LOSSES]
    if count > 12:
        keys += [(q, p) for q in ("grad_cosine", "grad_dot", "magnitude_similarity")
                 for p in PAIRS]
        keys += [("combined_grad_norm", "shared")]
        keys += [("latent_grad_norm", f"z|{n}") for n in LOSSES]
        keys += [(q, "z") for q in ("latent_norm", "effective_rank", "normalized_std",
                                    "latent_dim")]
        keys += [("groups_per_batch", "batch")]
    if len(keys) < count:
        keys += [("extra", f"x{i}") for i in range(count - len(keys))]
    return keys[:count]


def table(rng: np.random.Generator, start: int, n: int, steps: int, count: int) -> np.ndarray:
    """``n`` steps of plausible values (decaying losses and norms), one column a scalar."""
    decay = np.exp(-np.arange(start, start + n) / (steps / 5))[:, None]
    out = np.empty((n, max(count, 12)))
    out[:, 0:3] = (0.1 + decay) * rng.lognormal(0, 0.3, (n, 3))
    out[:, 3:6] = [WEIGHTS[k] for k in LOSSES]
    out[:, 6:9] = (0.2 + decay) * rng.lognormal(0, 0.4, (n, 3))
    out[:, 9:12] = out[:, 3:6] * out[:, 6:9]
    if count > 12:
        out[:, 12:] = rng.uniform(-1, 1, (n, count - 12))
        out[:, 12 + 9 + 1 + 3 + 3] = 16.0              # latent_dim
        out[:, 12 + 9 + 1 + 3 + 4] = 8.0               # groups_per_batch
    return out[:, :count]


def write(path: Path, steps: int, commit_seconds: float, count: int = 12) -> float:
    remove(path)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    writer = RunWriter(path, commit_seconds=commit_seconds)
    writer.set_meta(run_name="long", gradprobe_version="bench", losses=LOSSES, task="task",
                    roles={"task": "task", "cont": "contrastive", "proto": "prototype"},
                    roles_guessed=[], every=1, shared_parameters=["trunk.weight"],
                    shared_numel=4160, latents=["z"] if count > 12 else [])
    keys = scalar_keys(count)
    chunk = 10_000
    for start in range(0, steps, chunk):
        n = min(chunk, steps - start)
        for i, row in enumerate(table(rng, start, n, steps, count).tolist()):
            writer.write_step(start + i, dict(zip(keys, row)))
    writer.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--scalars", type=int, default=12, help="scalars a step (at least 12)")
    parser.add_argument("--commit-seconds", type=float, default=0.5)
    parser.add_argument("--per-step", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true", help="cProfile diagnose (top 10)")
    parser.add_argument("--diagnose-limit", type=float, default=600.0,
                        help="stop diagnose after this many seconds (0: no limit)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gradprobe-long"))
    args = parser.parse_args()
    args.scalars = max(args.scalars, 12)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.per_step:
        for count in (12, 30):
            path = args.out / f"per_step_{count}.gprobe"
            seconds = write(path, args.per_step, 0.0, count)
            print(f"per-step commit, {count} scalars: {args.per_step:,} steps in {seconds:.1f} s "
                  f"({seconds / args.per_step * 1e6:.0f} us a step); file "
                  f"{path.stat().st_size / 1e6:.1f} MB")
            remove(path)
    path = args.out / "long.gprobe"
    seconds = write(path, args.steps, args.commit_seconds, args.scalars)
    size = path.stat().st_size
    print(f"write: {args.steps:,} steps ({args.scalars} scalars each, commit every "
          f"{args.commit_seconds} s) in {seconds:.1f} s ({seconds / args.steps * 1e6:.0f} us a "
          f"step); file {size / 1e6:.0f} MB ({size / args.steps / args.scalars:.1f} bytes a "
          f"scalar); peak RSS so far {peak_rss_mb():.0f} MB")
    t0 = time.perf_counter()
    run = load_run(path)
    loaded = time.perf_counter() - t0
    t1 = time.perf_counter()
    points = 0
    for quantity in run.quantities():
        for name in run.names(quantity):
            points += len(run.series(quantity, name)[0])
    steps = run.probe_steps()
    read = time.perf_counter() - t1
    print(f"read: load_run {loaded:.2f} s + every series ({points:,} points, {len(steps):,} "
          f"steps) {read:.2f} s = {loaded + read:.1f} s; peak RSS so far {peak_rss_mb():.0f} MB")
    try:
        from gradprobe.diagnose import diagnose
    except Exception as exc:  # noqa: BLE001 - the module is being finished elsewhere
        print(f"diagnose: skipped ({type(exc).__name__}: {exc})")
    else:
        profile = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if profile is not None:
            profile.enable()
        if args.diagnose_limit > 0:
            signal.signal(signal.SIGALRM, _out_of_time)
            signal.setitimer(signal.ITIMER_REAL, args.diagnose_limit)
        try:
            findings = diagnose(run)
        except OutOfTime:
            findings = None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if profile is not None:
                profile.disable()
        seconds = time.perf_counter() - t0
        if findings is None:
            print(f"diagnose: NOT FINISHED, stopped after {seconds:.0f} s (--diagnose-limit)")
        else:
            print(f"diagnose: {len(findings)} findings in {seconds:.1f} s; load_run + read + "
                  f"diagnose {loaded + read + seconds:.1f} s (target < 30 s)")
        if profile is not None:
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(10)
            print(text.getvalue())
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(10)
            print(text.getvalue())
    run.close()
    print(f"peak RSS: {peak_rss_mb():.0f} MB (target < 1024 MB)")


if __name__ == "__main__":
    main()
