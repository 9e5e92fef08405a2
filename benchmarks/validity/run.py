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
    python benchmarks/validity/run.py --heldout second  # the second held-out set, likewise
    python benchmarks/validity/run.py --heldout third  # the third held-out set, likewise
    python benchmarks/validity/run.py --heldout fourth  # the fourth held-out set, likewise
    python benchmarks/validity/run.py --heldout fifth   # the fifth, likewise
    python benchmarks/validity/run.py --heldout sixth   # the sixth, likewise
    python benchmarks/validity/run.py --heldout seventh # the seventh, likewise
    python benchmarks/validity/run.py --threads 2 --out /tmp/runs-t2  # 2 torch threads a run
    python benchmarks/validity/reproduce.py benchmarks/validity/runs /tmp/runs-t2
                                                 # same verdicts, overlapping seed ranges?
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
from benchmarks.validity.report import (Check, acceptance, finding_lines, flip_lines,  # noqa: E402
                                        heldout_markdown, margin_lines, markdown, scores,
                                        score_text)

MODULES = ("mtl", "simsiam", "byol", "barlow", "simclr", "dann", "vae", "pinn",
           "sigmoid_mse", "center_loss", "dsn", "decoupler")
# issue 21's table, ported for the rule work
MODULES += ("two_task_conflict", "vqvae", "uncertainty_weights", "helmholtz_pinn",
            "barlow_split", "swav", "vicreg", "switch_moe", "asp_mtl")
MODULES += ("misa",)  # a second public source with a true orthogonality-vanishing


# The sets of families held out by source, in the order they were written: the first in
# heldout/, the n-th in heldout<n>/, each listing its modules as HELDOUT<n>_MODULES.
HELDOUT_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                    "ninth", "tenth", "eleventh", "twelfth", "thirteenth",
                    "fourteenth", "fifteenth",
                    "sixteenth")


def _heldout_sets() -> dict[str, tuple[str, tuple[str, ...], str, str]]:
    """Per set: its package, modules, default output folder and page."""
    sets = {}
    for number, ordinal in enumerate(HELDOUT_ORDINALS, start=1):
        suffix = "" if number == 1 else str(number)
        package = f"benchmarks.validity.heldout{suffix}"
        modules = getattr(importlib.import_module(package), f"HELDOUT{suffix}_MODULES")
        sets[ordinal] = (package, modules, f"runs-heldout{suffix}", f"validity-heldout{suffix}.md")
    return sets


HELDOUT_SETS = _heldout_sets()


def load_families(names: list[str] | None = None, heldout: str | None = None
                  ) -> dict[str, tuple[str, Family]]:
    """The corpus's families, or with ``heldout`` (a key of :data:`HELDOUT_SETS`) only that
    set of families held out by source."""
    out = {}
    package, modules = HELDOUT_SETS[heldout][:2] if heldout else ("benchmarks.validity", MODULES)
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


def collect(jobs, out_dir: Path, workers: int, reuse: bool, threads: int = 1
            ) -> tuple[list[RunRecord], dict]:
    """Train the jobs (or, with reuse, read back a previous run's files and outcomes); also
    how the training went (wall time, workers, torch threads a run)."""
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
    records = train_runs(jobs, out_dir, workers, threads)
    for r in records:
        r.path.with_suffix(".json").write_text(json.dumps({
            "family": r.family, "variant": r.variant, "seed": r.seed, "threads": threads,
            "outcome": r.outcome, "seconds": r.seconds, "cpu_seconds": r.cpu_seconds}))
    timing = {"wall_seconds": time.perf_counter() - started, "workers": workers, "threads": threads,
              "deterministic": True}  # harness._train_one asks torch for deterministic algorithms
    timing_file.write_text(json.dumps(timing))
    return records, timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="held-out runs of a representative subset")
    parser.add_argument("--families", nargs="*", help="only these families (by name)")
    parser.add_argument("--heldout", nargs="?", const="first", choices=tuple(HELDOUT_SETS),
                        help="only a set of families held out by source (every variant and "
                             "seed): 'first' (the default; benchmarks/validity/heldout/) or "
                             "'second' to 'sixteenth' (heldout2/ to heldout16/); reported "
                             "apart, never calibrated; writes a page only with --doc "
                             "(docs/validity-heldout.md, -heldout2.md ... -heldout16.md)")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per training run (default 1); recorded in --out's "
                             "training.json and on the page")
    parser.add_argument("--out", type=Path, default=None,
                        help="where run files are written (default: benchmarks/validity/runs, "
                             "runs-heldout, runs-heldout2 ... runs-heldout16 with --heldout)")
    parser.add_argument("--reuse", action="store_true", help="re-diagnose the run files in --out")
    parser.add_argument("--doc", type=Path, default=None,
                        help="page to write (default: docs/validity.md for a full run, none for "
                             "--quick or --heldout)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.workers < 1:
        parser.error("--threads and --workers take a whole number of at least 1")
    if args.out is None:
        args.out = ROOT / "benchmarks" / "validity" / (
            HELDOUT_SETS[args.heldout][2] if args.heldout else "runs")
    if args.heldout:
        return heldout_main(args)

    started = time.perf_counter()
    records, training, runs, by_name = train_and_diagnose(args, "validity corpus", heldout=None)
    for split in ("held-out", "calibration"):
        if any(r.split == split for r in records):
            print(f"\n== precision / recall per finding id, {split} half, default thresholds")
            print("\n".join(score_text(scores(records, by_name, split))))
    checks = print_acceptance(acceptance(records, by_name), "acceptance, held-out half")

    key_results = after = None
    calibration = [r for r in records if r.split == "calibration"]
    if calibration:
        print("\n== calibration on the calibration half", flush=True)
        heldout_half = [r for r in records if r.split == "held-out"]
        calibrator = Calibrator(runs, calibration, by_name, heldout_half)
        chosen, key_results = calibrator.calibrate()
        for line in margin_lines(key_results):
            print("   " + line)
        print("\n== runs that change verdict one grid step from each default at an edge")
        for line in flip_lines(calibrator.edge_flips(key_results, chosen)):
            print("   " + line)
        after = [dataclasses.replace(r) for r in records]
        found = runs.diagnose(chosen)
        for a, r in zip(after, records):
            a.findings = found[id(r)]
        print("\n== precision / recall per finding id, held-out half, chosen thresholds")
        print("\n".join(score_text(scores(after, by_name, "held-out"))))
    runs.close()

    doc = args.doc if args.doc is not None else (None if args.quick else ROOT / "docs" / "validity.md")
    if doc is not None:
        doc.write_text(markdown(records, by_name, key_results, after, training, command_line(args)))
        print(f"\nwrote {doc}")
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    return 0 if all(c.passed for c in checks) else 1


def heldout_main(args: argparse.Namespace) -> int:
    """The held-out families alone: trained, diagnosed at the defaults, scored over every run
    (all their seeds), with no calibration; their table is printed apart from the corpus's."""
    started = time.perf_counter()
    records, training, runs, by_name = train_and_diagnose(
        args, f"held-out families ({args.heldout} set)", heldout=args.heldout)
    runs.close()
    print("\n== held-out families: precision / recall per finding id, every run, default thresholds")
    print("\n".join(score_text(scores(records, by_name, None))))
    checks = print_acceptance(acceptance(records, by_name, None), "held-out families: acceptance")
    if args.doc is not None:
        args.doc.write_text(heldout_markdown(records, by_name, training, command_line(args),
                                             HELDOUT_SETS[args.heldout][0]))
        print(f"\nwrote {args.doc}")
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    return 0 if all(c.passed for c in checks) else 1


def train_and_diagnose(args: argparse.Namespace, title: str, heldout: str | None
                       ) -> tuple[list[RunRecord], dict, Runs, dict[str, Family]]:
    """Train (or reuse) the chosen families' runs, diagnose them at the default thresholds and
    print each run's findings. The runs stay loaded for calibration: the caller closes them."""
    families = load_families(args.families, heldout=heldout)
    by_name = {name: fam for name, (_, fam) in families.items()}
    jobs = jobs_for(families, args.quick)
    print(f"{title}: {len(jobs)} runs of {len(families)} families, {args.workers} workers, "
          f"{args.threads} torch thread(s) a run", flush=True)
    records, training = collect(jobs, args.out, args.workers, args.reuse, args.threads)
    runs = Runs(records)
    runs.attach()
    print(f"\n== {title}: findings per run (default thresholds)")
    for r in records:
        split = "" if heldout else f" [{r.split}]"
        print(f"-- {r.label}{split} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in r.outcome.items()))
        for line in finding_lines(r, by_name[r.family]):
            print("   " + line)
    return records, training, runs, by_name


def print_acceptance(checks: list[Check], title: str) -> list[Check]:
    print(f"\n== {title}: {sum(c.passed for c in checks)} of {len(checks)} checks hold")
    for c in checks:
        print(f"   {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    return checks


def command_line(args: argparse.Namespace) -> str:
    """The command that wrote a page, as the page states it."""
    return "python benchmarks/validity/run.py" + "".join(
        option for option, given in ((f" --heldout {args.heldout}", args.heldout),
                                     (" --quick", args.quick),
                                     (" --reuse", args.reuse),
                                     (f" --threads {args.threads}", args.threads != 1)) if given)


if __name__ == "__main__":
    sys.exit(main())
