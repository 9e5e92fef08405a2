"""Compare two output folders of ``run.py`` (``--out``), e.g. a rerun in a fresh venv at
another thread count against the first run: do the runs give the same verdicts, and do the
outcomes of each variant overlap over the seeds?

Usage:
    python benchmarks/validity/reproduce.py RUNS_A RUNS_B

Each folder holds, per run, ``<family>-<variant>-s<seed>.gprobe`` (the probe's run file) and
a ``.json`` beside it (the run's family, variant, seed and measured outcome), and
``training.json`` (workers, torch threads). Both folders' run files are diagnosed here at the
default thresholds. Printed:

- per run in both folders, its verdict: the alarms (finding id, subject, severity at warning
  or error); every run whose alarms differ, with what only one side raised;
- per variant and numeric outcome, the range over the seeds in each folder and whether the
  two ranges overlap, up to a relative tolerance (``--rtol``, default 1e-3: float rounding,
  which differs with the thread count, must not part two runs of one seed);
- the runs that only one folder holds.

Exit status 0 when every shared run has the same alarms and every range overlaps, 1 otherwise,
2 on a folder that is not a run.py output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks.validity`` importable
    sys.path.insert(0, str(ROOT))

import gradprobe  # noqa: E402
from benchmarks.validity.harness import ALARM_SEVERITIES  # noqa: E402
from benchmarks.validity.report import outcome_ranges, range_text  # noqa: E402
from gradprobe.diagnose import diagnose  # noqa: E402

RunKey = tuple[str, str, int]  # family, variant, seed
Alarm = tuple[str, str, str]  # finding id, subject, severity


RTOL = 1e-3


class NotARunFolder(Exception):
    pass


@dataclass
class Folder:
    path: Path
    threads: int | None
    outcomes: dict[RunKey, dict]
    run_files: dict[RunKey, Path]


def read_folder(path: Path) -> Folder:
    """A run.py output folder's runs: their outcomes and run files."""
    if not path.is_dir():
        raise NotARunFolder(f"{path}: no such folder")
    training = path / "training.json"
    if not training.is_file():
        raise NotARunFolder(f"{path}: no training.json, so not an output folder of run.py --out")
    outcomes, run_files = {}, {}
    for meta_file in sorted(path.glob("*.json")):
        if meta_file == training:
            continue
        try:
            meta = json.loads(meta_file.read_text())
            key = (meta["family"], meta["variant"], int(meta["seed"]))
            outcome = meta["outcome"]
        except (ValueError, KeyError, TypeError):
            raise NotARunFolder(f"{meta_file}: not a run's outcome as run.py writes it (family, "
                                "variant, seed, outcome); written by an older run.py?") from None
        outcomes[key] = outcome
        run_files[key] = meta_file.with_suffix(".gprobe")
    if not outcomes:
        raise NotARunFolder(f"{path}: holds no run")
    try:
        threads = json.loads(training.read_text()).get("threads")
    except ValueError:
        raise NotARunFolder(f"{training}: not JSON") from None
    return Folder(path, threads, outcomes, run_files)


def alarms_of(run_file: Path) -> frozenset[Alarm]:
    """The run's alarms at the default thresholds."""
    run = gradprobe.load_run(run_file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = diagnose(run)
    finally:
        run.close()
    return frozenset((f.id, f.subject, f.severity) for f in found if f.severity in ALARM_SEVERITIES)


@dataclass
class VerdictDifference:
    run: RunKey
    only_a: frozenset[Alarm]
    only_b: frozenset[Alarm]


def verdict_differences(a: dict[RunKey, frozenset[Alarm]], b: dict[RunKey, frozenset[Alarm]]
                        ) -> list[VerdictDifference]:
    """The runs both sides hold whose alarms differ."""
    return [VerdictDifference(run, a[run] - b[run], b[run] - a[run])
            for run in sorted(a.keys() & b.keys()) if a[run] != b[run]]


@dataclass
class RangeComparison:
    family: str
    variant: str
    outcome: str
    a: tuple[float, float, int] | None  # lowest, highest, seeds; None: this side lacks it
    b: tuple[float, float, int] | None
    rtol: float = RTOL

    @property
    def overlap(self) -> bool:
        """The ranges meet, once each is widened by ``rtol`` of the largest magnitude in either.
        An outcome that is NaN on both sides (a figure that had nothing to measure, such as a
        gradient ratio in a phase without the loss) agrees; NaN on one side only does not."""
        if self.a is None or self.b is None:
            return False
        unmeasured_a, unmeasured_b = (any(math.isnan(v) for v in side[:2])
                                      for side in (self.a, self.b))
        if unmeasured_a or unmeasured_b:
            return unmeasured_a and unmeasured_b
        slack = self.rtol * max(abs(v) for v in (*self.a[:2], *self.b[:2]))
        return self.a[0] <= self.b[1] + slack and self.b[0] <= self.a[1] + slack


def range_comparisons(a: dict[RunKey, dict], b: dict[RunKey, dict], rtol: float = RTOL
                      ) -> list[RangeComparison]:
    """Per variant either side holds, per numeric outcome: the seed range on each side."""
    ra, rb = outcome_ranges(a), outcome_ranges(b)
    rows = []
    for variant in sorted(ra.keys() | rb.keys()):
        keys_a, keys_b = ra.get(variant, {}), rb.get(variant, {})
        for key in list(keys_a) + [k for k in keys_b if k not in keys_a]:
            rows.append(RangeComparison(*variant, key, keys_a.get(key), keys_b.get(key), rtol))
    return rows


def _range_cell(r: tuple[float, float, int] | None) -> str:
    return "-" if r is None else f"{range_text(r[0], r[1])} ({r[2]} seed{'s' if r[2] != 1 else ''})"


def _label(run: RunKey) -> str:
    return f"{run[0]}/{run[1]}/s{run[2]}"


def _alarms_text(alarms: frozenset[Alarm]) -> str:
    return ", ".join(f"{sev} {fid} [{subject}]" for fid, subject, sev in sorted(alarms)) or "none"


def report(a: Folder, b: Folder, alarms_a: dict[RunKey, frozenset[Alarm]],
           alarms_b: dict[RunKey, frozenset[Alarm]], rtol: float = RTOL) -> tuple[list[str], bool]:
    """The printed comparison and whether the two folders agree."""
    lines = [f"A: {a.path} ({len(a.outcomes)} runs, {a.threads or '?'} torch threads a run)",
             f"B: {b.path} ({len(b.outcomes)} runs, {b.threads or '?'} torch threads a run)"]
    shared = sorted(a.outcomes.keys() & b.outcomes.keys())
    differences = verdict_differences(alarms_a, alarms_b)
    lines += ["", f"== verdicts: {len(shared) - len(differences)} of {len(shared)} shared runs "
                  "raise the same alarms"]
    for run in shared:
        if alarms_a[run] == alarms_b[run]:
            lines.append(f"   same {_label(run)}: {_alarms_text(alarms_a[run])}")
    for d in differences:
        lines.append(f"   DIFF {_label(d.run)}: only in A: {_alarms_text(d.only_a)}; "
                     f"only in B: {_alarms_text(d.only_b)}")
    rows = range_comparisons(a.outcomes, b.outcomes, rtol)
    both = [r for r in rows if r.a is not None and r.b is not None]
    apart = [r for r in both if not r.overlap]
    lines += ["", f"== outcomes: {len(both) - len(apart)} of {len(both)} seed ranges both folders "
                  f"hold overlap (relative tolerance {rtol:g})"
              + (f"; {len(rows) - len(both)} held by one folder only" if len(rows) > len(both)
                 else "")]
    for r in rows:
        state = ("overlap" if r.overlap else "APART  ") if r in both else "one    "
        lines.append(f"   {state} {r.family}/{r.variant} {r.outcome}: "
                     f"A {_range_cell(r.a)}, B {_range_cell(r.b)}")
    one_sided = sorted(a.outcomes.keys() ^ b.outcomes.keys())
    if one_sided:
        lines += ["", "== runs only one folder holds"]
        lines += [f"   {'A' if run in a.outcomes else 'B'} only: {_label(run)}" for run in one_sided]
    return lines, not differences and not apart and not one_sided


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_a", type=Path, help="an output folder of run.py (--out)")
    parser.add_argument("runs_b", type=Path, help="another one, e.g. a rerun at another thread count")
    parser.add_argument("--rtol", type=float, default=RTOL,
                        help=f"relative tolerance of the overlap of two ranges (default {RTOL:g})")
    args = parser.parse_args(argv)
    if not args.rtol >= 0:
        parser.error("--rtol takes a number of at least 0")
    try:
        a, b = read_folder(args.runs_a), read_folder(args.runs_b)
        shared = a.outcomes.keys() & b.outcomes.keys()
        alarms_a, alarms_b = ({run: alarms_of(f.run_files[run]) for run in shared} for f in (a, b))
    except NotARunFolder as exc:
        print(f"reproduce.py: {exc}", file=sys.stderr)
        return 2
    except (OSError, gradprobe.RunFileError) as exc:
        print(f"reproduce.py: a run file could not be read: {exc}", file=sys.stderr)
        return 2
    lines, agree = report(a, b, alarms_a, alarms_b, args.rtol)
    print("\n".join(lines))
    print("\n" + ("the two folders agree" if agree else "the two folders DISAGREE"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
