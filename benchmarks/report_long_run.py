"""Render the PDF report of a synthetic 1,000,000-step run; print how long it takes and its size.

    python benchmarks/report_long_run.py [--steps 1000000] [--out /tmp/gradprobe-long]

Every step carries a few scalars (loss, weight, grad_norm, weighted_grad_norm for 3 losses and
the 3 pair cosines: 15 scalars a step). They are written with :class:`gradprobe.record.RunWriter`
in chunks: ``add_scalars`` for each step and one ``write_step`` (one transaction) every
``--chunk`` steps, since one transaction per step would spend most of the time in commits. Not
a timed test: the targets are < 30 s to render and < 5 MB of PDF.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gradprobe.record import RunWriter, load_run
from gradprobe.report.pdf import write_pdf

LOSSES = ["task", "cont", "proto"]
WEIGHTS = {"task": 1.0, "cont": 0.05, "proto": 0.1}


def synthetic_run(path: Path, steps: int, chunk: int = 10_000, seed: int = 0) -> float:
    """Write the run; returns the seconds it took."""
    rng = np.random.default_rng(seed)
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    writer = RunWriter(path, flush_seconds=1e9)
    writer.set_meta(run_name=f"synthetic-{steps}", gradprobe_version="bench", losses=LOSSES,
                    task="task", roles={"task": "task", "cont": "contrastive",
                                        "proto": "prototype"},
                    every=1, shared_parameters=["trunk.weight", "trunk.bias"], shared_numel=4160,
                    expect_groups_per_batch=None)
    t = np.arange(steps, dtype=np.float64)
    decay = np.exp(-t / (steps / 5))
    series = {}
    for k, name in enumerate(LOSSES):
        noise = rng.lognormal(0.0, 0.3, steps)
        series[("loss", name)] = (1.0 + k) * (0.1 + decay) * noise
        series[("weight", name)] = np.full(steps, WEIGHTS[name])
        series[("grad_norm", name)] = (2.0 - k * 0.5) * (0.2 + decay) * rng.lognormal(0, 0.4, steps)
        series[("weighted_grad_norm", name)] = WEIGHTS[name] * series[("grad_norm", name)]
    for i, a in enumerate(LOSSES):
        for b in LOSSES[i + 1:]:
            series[("grad_cosine", f"{a}|{b}")] = np.clip(
                0.3 * np.sin(t / 50_000 + i) + rng.normal(0, 0.2, steps), -1, 1)
    keys = list(series)
    table = np.column_stack([series[k] for k in keys])
    for start in range(0, steps, chunk):
        stop = min(start + chunk, steps)
        for step in range(start, stop - 1):
            writer.add_scalars(step, dict(zip(keys, table[step].tolist())))
        writer.write_step(stop - 1, dict(zip(keys, table[stop - 1].tolist())))
    writer.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gradprobe-long"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run_path = args.out / "long.gprobe"
    write_s = synthetic_run(run_path, args.steps, args.chunk)
    print(f"wrote {args.steps:,} steps (15 scalars each) in {write_s:.1f} s "
          f"({run_path.stat().st_size / 1e6:.1f} MB run file)")
    run = load_run(run_path)
    t0 = time.perf_counter()
    pdf = write_pdf(run, [], args.out / "long.pdf")
    render_s = time.perf_counter() - t0
    size = pdf.stat().st_size
    print(f"rendered {pdf} in {render_s:.1f} s, {size / 1e6:.2f} MB "
          f"(targets: < 30 s, < 5 MB): {'OK' if render_s < 30 and size < 5e6 else 'MISSED'}")
    run.close()


if __name__ == "__main__":
    main()
