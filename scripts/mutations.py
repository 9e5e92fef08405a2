"""Apply small, deliberate faults (mutations) to gradprobe one at a time and check that the
tests catch each one.

    python scripts/mutations.py [--only NAME ...] [--tests FILE ...] [--timeout SECONDS]

Each mutation replaces one exact piece of source text (it must occur exactly once) in a
scratch copy of ``gradprobe/``, ``tests/`` and ``benchmarks/``; the working tree is never
touched. The named test files then run there (``pytest -q``, with a deadline): a failing
run *kills* the mutant, a passing one lets it *survive*. The unmutated copy runs first and
must pass, otherwise no verdict means anything. Prints a table and exits 0 only when every
mutant is killed. ``--tests`` replaces every mutation's own test files (to try a mutation
against others).
"""

from __future__ import annotations

import argparse
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILL_TESTS = ("tests/test_mutation_kills.py",)


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    original: str
    mutant: str
    tests: tuple[str, ...] = KILL_TESTS


# The surviving mutations of issue 21 (item 5), plus the mirror images of two of them.
MUTATIONS = (
    Mutation("window_size-ceil-to-int", "gradprobe/diagnose/_series.py",
             "int(math.ceil(th.window_share * n))", "int(th.window_share * n)"),
    Mutation("window_counts-start-le-to-lt", "gradprobe/diagnose/_series.py",
             "(s <= s[0] + reach)", "(s < s[0] + reach)"),
    Mutation("window_counts-end-ge-to-gt", "gradprobe/diagnose/_series.py",
             "(s >= s[-1] - reach)", "(s > s[-1] - reach)"),
    Mutation("conflict_harm-stall-not-harm", "gradprobe/diagnose/rules/conflict_harm.py",
             "if plateau else sorted(set(stalled) | set(metric_stalled),",
             "if plateau else sorted(set(metric_stalled),"),
    Mutation("conflict_harm-without-other-falls", "gradprobe/diagnose/rules/conflict_harm.py",
             "ratios[name] >= th.conflict_stall_fraction and \\\n"
             "                ratios[other] < th.conflict_stall_fraction:",
             "ratios[name] >= th.conflict_stall_fraction:"),
    Mutation("conflict_harm-without-own-stall", "gradprobe/diagnose/rules/conflict_harm.py",
             "ratios[name] >= th.conflict_stall_fraction and \\\n"
             "                ratios[other] < th.conflict_stall_fraction:",
             "ratios[other] < th.conflict_stall_fraction:"),
    Mutation("prototype_collapse-without-spread_kept", "gradprobe/diagnose/rules/prototypes.py",
             "end <= th.proto_collapse_fraction * peak and not spread_kept",
             "end <= th.proto_collapse_fraction * peak"),
    Mutation("total_variance_of-divides-by-n", "gradprobe/metrics/representation.py",
             ".sum(dim=-1) / (n - 1)", ".sum(dim=-1) / n"),
    Mutation("assemble-overwrites-grad", "gradprobe/probe/per_loss.py",
             "param.grad = combined if param.grad is None else param.grad + combined",
             "param.grad = combined"),
)


def scratch_copy(into: Path) -> None:
    for part in ("gradprobe", "tests", "benchmarks"):
        shutil.copytree(ROOT / part, into / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    shutil.copy2(ROOT / "pyproject.toml", into / "pyproject.toml")


def apply(mutation: Mutation, root: Path) -> str | None:
    """Write the mutant into ``root``; a reason when it cannot be applied."""
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        return f"original text found {count} times in {mutation.path}"
    path.write_text(text.replace(mutation.original, mutation.mutant))
    try:
        py_compile.compile(str(path), doraise=True)
    except py_compile.PyCompileError as exc:
        return f"mutant does not compile: {exc.msg.splitlines()[-1]}"
    return None


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """('passed' | 'failed' | 'timeout' | 'error', the failing tests or the error, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "--no-header", "-p", "no:cacheprovider",
           *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    failed = re.findall(r"^FAILED \S+::(\S+)", done.stdout, flags=re.M)
    if done.returncode == 0:
        return "passed", "", seconds
    if done.returncode == 1 and failed:
        return "failed", ", ".join(failed), seconds
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
    return "error", f"pytest exit {done.returncode}: {tail[0]}", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--tests", nargs="+", metavar="FILE",
                        help="test files to run for every mutation (default: each one's own)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="deadline of one pytest run, in seconds (default 300)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"error: unknown mutation(s) {', '.join(sorted(unknown))}; known: "
              f"{', '.join(m.name for m in MUTATIONS)}", file=sys.stderr)
        return 2
    every_test = tuple(sorted({t for m in chosen for t in (args.tests or m.tests)}))
    with tempfile.TemporaryDirectory(prefix="gradprobe-mutations-") as tmp:
        base = Path(tmp) / "base"
        scratch_copy(base)
        outcome, detail, seconds = run_tests(base, every_test, args.timeout)
        if outcome != "passed":
            print(f"error: the unmutated code does not pass {' '.join(every_test)} "
                  f"({outcome}: {detail})", file=sys.stderr)
            return 2
        print(f"unmutated: {' '.join(every_test)} pass ({seconds:.0f} s)")
        rows = []
        for m in chosen:
            root = Path(tmp) / m.name
            scratch_copy(root)
            problem = apply(m, root)
            if problem:
                rows.append((m.name, "NOT APPLIED", problem))
            else:
                outcome, detail, seconds = run_tests(root, tuple(args.tests or m.tests),
                                                     args.timeout)
                verdict = {"failed": "killed", "passed": "SURVIVED", "timeout": "killed (timeout)",
                           "error": "ERROR"}[outcome]
                rows.append((m.name, verdict, f"{seconds:.0f} s; {detail}" if detail else
                             f"{seconds:.0f} s"))
            shutil.rmtree(root)
            print(f"{rows[-1][0]:<42} {rows[-1][1]:<16} {rows[-1][2]}", flush=True)
    killed = sum(r[1].startswith("killed") for r in rows)
    print(f"\n{killed} of {len(rows)} mutants killed")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
