"""The validation corpus's shared harness: what a family declares, how its runs are trained,
diagnosed and scored.

A *family* re-implements one public training loop; each *variant* is healthy or broken by
construction and declares the findings (id + subject) that must appear at warning or error,
and the ones that may (true but incidental). Every other warning or error on that run is a
false alarm. Precision and recall are counted per finding id over (run, subject) pairs:

- an *alarm* is a finding at severity warning or error (info findings are not alarms); a
  ``static-loss-weights`` finding names one subject per weight it lists;
- true positive: an alarm the variant expects; false positive: an alarm it neither expects
  nor allows; false negative: an expected (id, subject) without an alarm.

Split: seeds are fixed per family; even seeds are the *calibration* half, odd seeds the
*held-out* half (every family and every variant is in both halves).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

import gradprobe
from gradprobe.diagnose import Finding, Thresholds, diagnose

ALARM_SEVERITIES = ("warning", "error")


@dataclass(frozen=True)
class Expect:
    """A finding id and the loss, latent, watch or loss pair ``a|b`` it must name."""

    id: str
    subject: str


@dataclass(frozen=True)
class Variant:
    name: str
    healthy: bool
    truth: str  # why the variant is healthy or broken, by construction
    expected: tuple[Expect, ...] = ()
    allowed: tuple[Expect, ...] = ()  # true but incidental: neither hit nor false alarm
    must_not: tuple[str, ...] = ()  # the confusable ids this variant must not show


@dataclass(frozen=True)
class Family:
    name: str
    source: str
    # train(variant, seed, log) writes the probe's run file to ``log`` and returns what the
    # model really did (accuracies, ranks...), measured without gradprobe.
    train: Callable[[str, int, Path], dict]
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0, 1)
    quick: tuple[tuple[str, int], ...] = ()  # (variant, seed) runs of ``--quick``

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def split_of(seed: int) -> str:
    return "calibration" if seed % 2 == 0 else "held-out"


@dataclass
class RunRecord:
    family: str
    variant: str
    seed: int
    path: Path
    outcome: dict
    seconds: float  # wall time of the training run
    cpu_seconds: float  # its CPU time (the machine may be shared)
    findings: list[Finding] = field(default_factory=list)

    @property
    def split(self) -> str:
        return split_of(self.seed)

    @property
    def label(self) -> str:
        return f"{self.family}/{self.variant}/s{self.seed}"


# ----------------------------------------------------------------------------- training

def _train_one(module: str, variant: str, seed: int, path: str, threads: int = 1
               ) -> tuple[dict, float, float]:
    """One run, in a worker process, at a fixed number of torch threads (default one: the models
    are tiny and threads only contend) and with torch's deterministic algorithms where it has
    them (warn_only: an operation without one still runs), so that a rerun of a seed repeats
    its numbers as far as the thread count allows."""
    import importlib

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    family = importlib.import_module(module).FAMILY
    Path(path).unlink(missing_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradprobe.GradprobeWarning)
        outcome = family.train(variant, seed, Path(path))
    return outcome, time.perf_counter() - start, time.process_time() - cpu


def train_runs(jobs: list[tuple[str, Family, str, int]], out_dir: Path, workers: int,
               threads: int = 1, progress: Callable[[str], None] = print) -> list[RunRecord]:
    """Train every (module, family, variant, seed) job, each at ``threads`` torch threads; a
    run file per job under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records: dict[int, RunRecord] = {}
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {}
        for index, (module, family, variant, seed) in enumerate(jobs):
            path = out_dir / f"{family.name}-{variant}-s{seed}.gprobe"
            futures[pool.submit(_train_one, module, variant, seed, str(path), threads)] = \
                (index, family, variant, seed, path)
        for done, fut in enumerate(as_completed(futures), start=1):
            index, family, variant, seed, path = futures[fut]
            outcome, seconds, cpu = fut.result()
            records[index] = RunRecord(family.name, variant, seed, path, outcome, seconds, cpu)
            progress(f"[{done}/{len(jobs)} {time.perf_counter() - started:5.0f}s] "
                     f"{family.name}/{variant}/s{seed} trained in {seconds:.1f}s ({cpu:.1f}s CPU) "
                     + " ".join(f"{k}={_fmt(v)}" for k, v in outcome.items()))
    return [records[i] for i in sorted(records)]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# ---------------------------------------------------------------------------- diagnosis

class Runs:
    """Loaded runs kept open, so that calibration can re-diagnose without re-reading."""

    def __init__(self, records: Iterable[RunRecord]):
        self.records = list(records)
        self._runs = {id(r): gradprobe.load_run(r.path) for r in self.records}

    def run_of(self, record: RunRecord) -> gradprobe.Run:
        return self._runs[id(record)]

    def diagnose(self, thresholds: Thresholds | None = None,
                 records: Iterable[RunRecord] | None = None) -> dict[int, list[Finding]]:
        out = {}
        for r in (self.records if records is None else records):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[id(r)] = diagnose(self._runs[id(r)], thresholds)
        return out

    def attach(self, thresholds: Thresholds | None = None) -> None:
        """Diagnose every run and store its findings on its record."""
        found = self.diagnose(thresholds)
        for r in self.records:
            r.findings = found[id(r)]

    def close(self) -> None:
        for run in self._runs.values():
            run.close()


def subject_units(finding: Finding) -> list[str]:
    """The subjects a finding names: one per weight for static-loss-weights, an order-free
    pair for pair subjects, else its subject."""
    if finding.id == "static-loss-weights":
        return [s for s in finding.subject.split(",") if s]
    return [normalise_subject(finding.subject)]


def normalise_subject(subject: str) -> str:
    return "|".join(sorted(subject.split("|"))) if "|" in subject else subject


def alarms(findings: Iterable[Finding]) -> set[tuple[str, str]]:
    return {(f.id, unit) for f in findings if f.severity in ALARM_SEVERITIES
            for unit in subject_units(f)}


@dataclass
class Judgement:
    """One run's alarms sorted against its variant's declaration."""

    hits: set[tuple[str, str]]
    misses: set[tuple[str, str]]
    false_alarms: set[tuple[str, str]]
    incidental: set[tuple[str, str]]


def judge(variant: Variant, findings: Iterable[Finding]) -> Judgement:
    raised = alarms(findings)
    expected = {(e.id, normalise_subject(e.subject)) for e in variant.expected}
    allowed = {(e.id, normalise_subject(e.subject)) for e in variant.allowed}
    return Judgement(hits=raised & expected, misses=expected - raised,
                     false_alarms=raised - expected - allowed, incidental=raised & allowed)


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan


def score(judgements: Iterable[Judgement]) -> dict[str, Score]:
    """Per finding id: true positives, false positives, false negatives over (run, subject)."""
    table: dict[str, Score] = {}
    for j in judgements:
        for kind, pairs in (("tp", j.hits), ("fp", j.false_alarms), ("fn", j.misses)):
            for fid, _ in pairs:
                s = table.setdefault(fid, Score())
                setattr(s, kind, getattr(s, kind) + 1)
    return dict(sorted(table.items()))


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))
