"""Where the probe's one eigen-decomposition per latent should run: measured.

For latents of n = 1024 rows (the probe's ``max_rows``) and d columns, the probe needs the
eigenvalues of the stacked uncentred and centred Gram matrices ([2, m, m], m = min(n, d)),
from which every spectral metric follows (``gradprobe.metrics.latent_spectrum``). Printed:

1. the cost of that decomposition in float64 and float32 with LAPACK on the host (torch);
2. what float32 does to the metrics: effective rank, centred rank and spectrum of a healthy
   and of a collapsed latent, float32 eigenvalues against float64 ones;
3. with ``--device cuda``: the same decomposition on the device in float64 and float32, the
   host synchronisations it makes (``gradprobe.opcount``) and the cost of copying the Gram
   pair to pinned host memory instead.

Usage: python benchmarks/eigen_placement.py [--device cuda] [--repeats 21]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradprobe import metrics
from gradprobe.opcount import count_ops

SIZES = (32, 64, 128, 256, 512, 1024)


def median_ms(fn, repeats, synchronize=lambda: None):
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gram_pair(m, dtype, device):
    z = torch.randn(1024, m, dtype=torch.float64) * torch.linspace(0.01, 2.0, m, dtype=torch.float64)
    return metrics.latent_summary(z.to(device))["grams"].to(dtype)


def host_costs(repeats):
    print("1. eigvalsh of the [2, m, m] Gram pair on the host (LAPACK via torch), ms")
    print(f"{'m':>6s} {'float64':>9s} {'float32':>9s}")
    for m in SIZES:
        grams = gram_pair(m, torch.float64, "cpu")
        f64 = median_ms(lambda: torch.linalg.eigvalsh(grams), repeats)
        f32 = median_ms(lambda: torch.linalg.eigvalsh(grams.float()), repeats)
        print(f"{m:6d} {f64:9.2f} {f32:9.2f}")


def float32_errors():
    print("\n2. float32 eigenvalues against float64 (n = 1024, d = 128): relative error")
    gen = torch.Generator().manual_seed(0)
    healthy = torch.randn(1024, 128, generator=gen, dtype=torch.float64)
    collapsed = torch.randn(1024, 5, generator=gen, dtype=torch.float64) @ \
        torch.randn(5, 128, generator=gen, dtype=torch.float64) + \
        1e-4 * torch.randn(1024, 128, generator=gen, dtype=torch.float64)
    offset = healthy * 0.01 + 3.0  # a latent far from the origin: centring cancels digits
    print(f"{'latent':>10s} {'rank':>9s} {'centred':>9s} {'spectrum':>9s}")
    for name, z in (("healthy", healthy), ("collapsed", collapsed), ("offset", offset)):
        exact = metrics.latent_statistics(z)
        single = metrics.latent_spectrum(metrics.latent_summary(z.float())["grams"].float())
        errors = [abs(float(single[key]) / float(exact[key]) - 1)
                  for key in ("effective_rank", "effective_rank_centred")]
        spectrum = float((single["singular_spectrum"] - exact["singular_spectrum"]).abs().max()
                         / exact["singular_spectrum"].abs().max())
        print(f"{name:>10s} {errors[0]:9.1e} {errors[1]:9.1e} {spectrum:9.1e}")


def device_costs(device, repeats):
    synchronize = lambda: torch.cuda.synchronize(device)  # noqa: E731
    print(f"\n3. on {torch.cuda.get_device_name(device)}: eigvalsh on the device vs copying "
          "the pair to pinned host memory, ms (syncs per call)")
    print(f"{'m':>6s} {'float64':>9s} {'float32':>9s} {'syncs':>6s} {'copy':>9s}")
    for m in SIZES:
        grams = gram_pair(m, torch.float64, device)
        single = grams.float()
        pinned = torch.empty(grams.shape, dtype=grams.dtype, pin_memory=True)
        f64 = median_ms(lambda: torch.linalg.eigvalsh(grams), repeats, synchronize)
        f32 = median_ms(lambda: torch.linalg.eigvalsh(single), repeats, synchronize)
        copy = median_ms(lambda: pinned.copy_(grams, non_blocking=True), repeats, synchronize)
        with count_ops(cpu_as_device=False) as counts:
            torch.linalg.eigvalsh(single)
        print(f"{m:6d} {f64:9.2f} {f32:9.2f} {counts.syncs:6d} {copy:9.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    host_costs(args.repeats)
    float32_errors()
    if args.device != "cpu":
        device_costs(torch.device(args.device), args.repeats)


if __name__ == "__main__":
    main()
