"""Median wall time of the latent metrics on a 4096 x 512 float32 latent.

Run: python benchmarks/metrics_speed.py [--n 4096 --d 512 --repeats 11]
Target: effective_rank well under 50 ms on a 2-core CPU. Other processes on the
machine inflate the numbers; the load average is printed alongside.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import gradprobe.metrics as M


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (also fills lru caches where a metric has one)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    n, d = args.n, args.d
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g)
    z2 = z + 0.5 * torch.randn(n, d, generator=g)
    y = torch.randn(n, d // 2, generator=g)
    groups = torch.randint(0, 8, (n,), generator=g)
    protos = torch.randn(8, d, generator=g)
    logits = 5 * torch.randn(n, generator=g)
    cases = {
        "effective_rank": lambda: M.effective_rank(z),
        "effective_rank(method='svd')": lambda: M.effective_rank(z, method="svd"),
        "effective_rank_centred": lambda: M.effective_rank_centred(z),
        "participation_ratio": lambda: M.participation_ratio(z),
        "normalized_std": lambda: M.normalized_std(z),
        "singular_spectrum(k=32)": lambda: M.singular_spectrum(z),
        "latent_norm": lambda: M.latent_norm(z),
        "alignment": lambda: M.alignment(z, z2),
        "uniformity": lambda: M.uniformity(z),
        "contrastive_signal": lambda: M.contrastive_signal(z, z2, groups=groups),
        "linear_cka(debiased)": lambda: M.linear_cka(z, y),
        "max_abs_correlation": lambda: M.max_abs_correlation(z, y),
        "prototype_usage": lambda: M.prototype_usage(z, protos),
        "prototype_lag": lambda: M.prototype_lag(protos, z, groups),
        "saturation_histogram": lambda: M.saturation_histogram(logits),
        "isotropic_effective_rank (cached)": lambda: M.isotropic_effective_rank(n, d),
        "max_abs_correlation_null (cached)": lambda: M.max_abs_correlation_null(n, d, d // 2),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"latent {n} x {d} float32, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load avg {load:.2f}")
    first = time.perf_counter()
    M.isotropic_effective_rank(n, d, seed=12345)
    print(f"{'isotropic_effective_rank (first call)':40s} {1e3 * (time.perf_counter() - first):9.1f} ms")
    for name, fn in cases.items():
        reps = args.repeats if "svd" not in name else max(3, args.repeats // 3)
        print(f"{name:40s} {median_ms(fn, reps):9.1f} ms")


if __name__ == "__main__":
    main()
