"""What writing a probe step costs the training thread: committing it there (``RunWriter``)
or handing it to the writer thread (``BackgroundRunWriter``).

A stand-in training step (a few float32 matmuls, ``--step-ms`` long) alternates with writing one
probe step of ``--scalars`` scalars and a 4 x 4 Gram matrix, as ``Probe(every=1)`` does. Printed:
the training thread's time inside the write call (median and 90th percentile over every call of
the interleaved rounds), and the loop's time per step as a multiple of the loop without writing
(median over rounds; it includes what the writer thread takes from the training thread: the GIL,
and the cores on a small machine).

Usage: python benchmarks/writer_handover.py [--rounds 7] [--steps 200] [--scalars 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradprobe.record import BackgroundRunWriter, RunWriter


def training_step(a: torch.Tensor, repeats: int) -> None:
    for _ in range(repeats):
        a @ a


def calibrate(a: torch.Tensor, step_ms: float) -> int:
    training_step(a, 50)  # warm-up
    start = time.perf_counter()
    training_step(a, 200)
    per_matmul = (time.perf_counter() - start) / 200
    return max(1, round(step_ms / 1e3 / per_matmul))


def run_loop(writer, a, repeats, steps, scalars, first_step, calls):
    rng = np.random.default_rng(first_step)
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
        training_step(a, repeats)
        numbers = {("q", str(i)): float(v) for i, v in enumerate(rng.random(scalars))}
        t0 = time.perf_counter()
        if writer is not None:
            writer.write_step(step, numbers, {("grad_gram", "shared"): rng.random((4, 4))})
        calls.append(time.perf_counter() - t0)
    if writer is not None:
        writer.flush()  # counted: the loop's steps are all committed when it ends
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--scalars", type=int, default=30)
    parser.add_argument("--step-ms", type=float, default=2.0)
    args = parser.parse_args()
    a = torch.randn(256, 256)
    repeats = calibrate(a, args.step_ms)
    with tempfile.TemporaryDirectory() as tmp:
        writers = {"no writing": None,
                   "RunWriter (commit on the training thread)": RunWriter(Path(tmp) / "sync.gprobe"),
                   "BackgroundRunWriter (hand over)": BackgroundRunWriter(Path(tmp) / "bg.gprobe")}
        loops = {name: [] for name in writers}
        calls = {name: [] for name in writers}
        for round_ in range(args.rounds):
            for name, writer in writers.items():
                loops[name].append(run_loop(writer, a, repeats, args.steps, args.scalars,
                                            round_ * args.steps, calls[name]))
        for writer in writers.values():
            if writer is not None:
                writer.close()
    base = statistics.median(loops["no writing"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} rounds of "
          f"{args.steps} steps, {args.scalars} scalars a step, training step "
          f"{base * 1e3:.2f} ms")
    print(f"{'':44s} {'write call, us: median':>22s} {'p90':>6s} {'loop x plain':>12s}")
    for name in writers:
        ordered = sorted(calls[name])
        print(f"{name:44s} {statistics.median(ordered) * 1e6:22.1f} "
              f"{ordered[int(0.9 * len(ordered))] * 1e6:6.1f} "
              f"{statistics.median(loops[name]) / base:12.3f}")


if __name__ == "__main__":
    main()
