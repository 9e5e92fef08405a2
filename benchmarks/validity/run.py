"""Run the validation corpus: train every family's variants, diagnose them at the default
thresholds, print each run's findings and per-finding-id precision/recall (held-out and
calibration halves), calibrate thresholds on the calibration half, and write
docs/validity.md.

Usage:
    python benchmarks/validity/run.py            # the whole corpus; writes docs/validity.md
    python benchmarks/validity/run.py --quick    # held-out runs of a representative subset
    python benchmarks/validity/run.py --reuse    # re-diagnose the run files of a previous run
    python benchmarks/validity/run.py --heldout  # only the families held out by source, apart
                                                 # (issue 21: run once, at the end of the rule work)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks.validity`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.validity.calibrate import Calibrator  # noqa: E402
from benchmarks.validity.harness import (Family, RunRecord, Runs, default_workers,  # noqa: E402
                                         train_runs)
from benchmarks.validity.heldout import HELDOUT_MODULES  # noqa: E402
from benchmarks.validity.report import (acceptance, finding_lines, heldout_markdown,  # noqa: E402
                                        markdown, scores, score_text)

MODULES = ("mtl", "simsiam", "byol", "barlow", "simclr", "dann", "vae", "pinn",
           "sigmoid_mse", "center_loss", "dsn", "decoupler")
# issue 21's table, ported for the rule work
MODULES += ("two_task_conflict", "vqvae", "uncertainty_weights", "helmholtz_pinn",
            "barlow_split", "swav", "vicreg", "switch_moe")
# Families of issue 21's table whose declared verdicts the current rules do not give yet on
# their quick runs: the rule work's targets. They train and are scored like every family
# (docs/validity.md shows their failures); the quick acceptance test judges them apart until
# the rules meet them.
RULE_WORK_TARGETS = ("vqvae", "uncertainty-weights", "switch-moe")


def load_families(names: list[str] | None = None, heldout: bool = False) -> dict[str, tuple[str, Family]]:
    """The corpus's families, or with ``heldout`` only those held out by source."""
    out = {}
    package, modules = ("benchmarks.validity.heldout", HELDOUT_MODULES) if heldout else \
        ("benchmarks.validity", MODULES)
    for module in modules:
        qualified = f"{package}.{module}"
        family = importlib.import_module(qualified).FAMILY
        if names is None or family.name in names:
            out[family.name] = (qualified, family)
    return out


def jobs_for(families: dict[str, tuple[str, Family]], quick: bool) -> list[tuple[str, Family, str, int]]:
    jobs = []
    for module, family in families.values():
        runs = family.quick if quick else [(v.name, s) for v in family.variants for s in family.seeds]
        jobs += [(module, family, variant, seed) for variant, seed in runs]
    return jobs


def collect(jobs, out_dir: Path, workers: int, reuse: bool) -> tuple[list[RunRecord], dict]:
    """Train the jobs (or, with reuse, read back a previous run's files and outcomes); also
    how the training went (wall time, workers)."""
    timing_file = out_dir / "training.json"
    if reuse:
        records = []
        for _, family, variant, seed in jobs:
            path = out_dir / f"{family.name}-{variant}-s{seed}.gprobe"
            meta = json.loads(path.with_suffix(".json").read_text())
            records.append(RunRecord(family.name, variant, seed, path, meta["outcome"], meta["seconds"],
                                     meta["cpu_seconds"]))
        return records, json.loads(timing_file.read_text())
    started = time.perf_counter()
    records = train_runs(jobs, out_dir, workers)
    for r in records:
        r.path.with_suffix(".json").write_text(json.dumps({"outcome": r.outcome, "seconds": r.seconds,
                                                             "cpu_seconds": r.cpu_seconds}))
    timing = {"wall_seconds": time.perf_counter() - started, "workers": workers}
    timing_file.write_text(json.dumps(timing))
    return records, timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="held-out runs of a representative subset")
    parser.add_argument("--families", nargs="*", help="only these families (by name)")
    parser.add_argument("--heldout", action="store_true",
                        help="only the families held out by source (every variant and seed), "
                             "reported apart, never calibrated; writes a page only with --doc "
                             "(docs/validity-heldout.md)")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--out", type=Path, default=None,
                        help="where run files are written (default: benchmarks/validity/runs, "
                             "runs-heldout with --heldout)")
    parser.add_argument("--reuse", action="store_true", help="re-diagnose the run files in --out")
    parser.add_argument("--doc", type=Path, default=None,
                        help="page to write (default: docs/validity.md for a full run, none for "
                             "--quick or --heldout)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "benchmarks" / "validity" / ("runs-heldout" if args.heldout else "runs")
    if args.heldout:
        return heldout_main(args)

    started = time.perf_counter()
    families = load_families(args.families)
    by_name = {name: fam for name, (_, fam) in families.items()}
    jobs = jobs_for(families, args.quick)
    print(f"validity corpus: {len(jobs)} runs of {len(families)} families, {args.workers} workers",
          flush=True)
    records, training = collect(jobs, args.out, args.workers, args.reuse)
    runs = Runs(records)
    runs.attach()

    print("\n== findings per run (default thresholds)")
    for r in records:
        print(f"-- {r.label} [{r.split}] " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in r.outcome.items()))
        for line in finding_lines(r, by_name[r.family]):
            print("   " + line)
    for split in ("held-out", "calibration"):
        if any(r.split == split for r in records):
            print(f"\n== precision / recall per finding id, {split} half, default thresholds")
            print("\n".join(score_text(scores(records, by_name, split))))
    checks = acceptance(records, by_name)
    print(f"\n== acceptance, held-out half: {sum(c.passed for c in checks)} of {len(checks)} checks hold")
    for c in checks:
        print(f"   {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}")

    key_results = after = None
    calibration = [r for r in records if r.split == "calibration"]
    if calibration:
        print("\n== calibration on the calibration half", flush=True)
        chosen, key_results = Calibrator(runs, calibration, by_name).calibrate()
        for k in key_results:
            if k.constrained:
                rng = f"{k.best_range[0]:.3g}..{k.best_range[1]:.3g}" if k.best_range else "-"
                moved = "MOVED" if k.chosen != k.default else "kept "
                print(f"   {moved} {k.key:30s} {k.default:<10.4g} -> {k.chosen:<10.4g} errors "
                      f"{k.errors_default} -> {k.errors_chosen}; fewest-error range {rng}")
        after = [dataclasses.replace(r) for r in records]
        found = runs.diagnose(chosen)
        for a, r in zip(after, records):
            a.findings = found[id(r)]
        print("\n== precision / recall per finding id, held-out half, chosen thresholds")
        print("\n".join(score_text(scores(after, by_name, "held-out"))))
    runs.close()

    elapsed = time.perf_counter() - started
    doc = args.doc if args.doc is not None else (None if args.quick else ROOT / "docs" / "validity.md")
    if doc is not None:
        command = "python benchmarks/validity/run.py" + (" --quick" if args.quick else "") + \
            (" --reuse" if args.reuse else "")
        doc.write_text(markdown(records, by_name, key_results, after, training, command))
        print(f"\nwrote {doc}")
    print(f"done in {elapsed / 60:.1f} min")
    return 0 if all(c.passed for c in checks) else 1


def heldout_main(args: argparse.Namespace) -> int:
    """The held-out families alone: trained, diagnosed at the defaults, scored over every run
    (all their seeds), with no calibration; their table is printed apart from the corpus's."""
    started = time.perf_counter()
    families = load_families(args.families, heldout=True)
    by_name = {name: fam for name, (_, fam) in families.items()}
    jobs = jobs_for(families, args.quick)
    print(f"held-out families: {len(jobs)} runs of {len(families)} families, {args.workers} workers",
          flush=True)
    records, training = collect(jobs, args.out, args.workers, args.reuse)
    runs = Runs(records)
    runs.attach()
    runs.close()
    print("\n== held-out families: findings per run (default thresholds)")
    for r in records:
        print(f"-- {r.label} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in r.outcome.items()))
        for line in finding_lines(r, by_name[r.family]):
            print("   " + line)
    print("\n== held-out families: precision / recall per finding id, every run, default thresholds")
    print("\n".join(score_text(scores(records, by_name, None))))
    checks = acceptance(records, by_name, None)
    print(f"\n== held-out families: acceptance, {sum(c.passed for c in checks)} of {len(checks)} checks hold")
    for c in checks:
        print(f"   {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    if args.doc is not None:
        command = "python benchmarks/validity/run.py --heldout" + (" --quick" if args.quick else "") + \
            (" --reuse" if args.reuse else "")
        args.doc.write_text(heldout_markdown(records, by_name, training, command))
        print(f"\nwrote {args.doc}")
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
