"""Choosing thresholds on the calibration half of the corpus.

Procedure (one coordinate at a time, in the order ``Thresholds`` declares its keys):

1. For a numeric threshold, a grid of candidate values: its default times sqrt(2)^k for
   k = -6..6, and its current value (values a ``Thresholds`` refuses, such as a share above 1, are
   skipped; integer keys 1..8).
2. Each candidate is scored on the calibration runs only: the number of false alarms plus
   misses (harness.judge) with that one value changed. Which rules read which key is
   recorded, not assumed (a recording proxy); the first rule that reads the key and every
   rule after it are re-run (later rules may read earlier findings).
3. If the current value already has the fewest errors, it stays (the corpus confirms its
   published or derived source). Otherwise the new value is the geometric midpoint of the
   widest run of consecutive grid values with the fewest errors: the point farthest from
   the nearest failing value (margin-maximising); a run of a single grid value (no margin)
   moves nothing. A key already moved is re-centred in its run when other keys' moves have
   shifted it.
4. Rule-specific keys first, then the keys every rule reads (persistence and phase); passes
   repeat until one moves nothing (at most three). A last scan is the report: for every key,
   the errors at its default and at the chosen value (every other key as chosen) and the run
   of fewest-error grid values around the chosen value.
5. Margins, on both halves: the same last scan of each key's grid, on the calibration runs and
   on the held-out runs, gives the run of fewest-error grid values that holds the default and
   the default's margin to each end of it, in grid steps (one step is a factor sqrt(2)). A
   default at an end of its run (no margin on that side, where the grid goes on) is flagged
   unless ``EDGE_REASONS`` states why.

The held-out half never moves a threshold: it is only scanned for the margins.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, fields

from gradprobe.diagnose import RULES, Finding, Thresholds

from .harness import Family, RunRecord, Runs, alarms, judge

GRID_STEPS = 6
INT_GRID = tuple(range(1, 9))


class _Recording:
    """Stands in for a Thresholds and records which keys a rule reads."""

    def __init__(self, thresholds: Thresholds, seen: set[str]):
        self._th, self._seen = thresholds, seen

    def __getattr__(self, name):
        self._seen.add(name)
        return getattr(self._th, name)


@dataclass
class HalfRange:
    """One key's errors over its grid on one half, every other key as chosen, seen from the
    default: the run of consecutive fewest-error grid values that holds it and its margin, in
    grid steps, to each end of that run."""

    errors_default: int
    fewest: int
    fewest_range: tuple[float, float] | None  # None: the default has more than the fewest errors
    steps_below: int | None  # grid steps from the default down to the run's lower end
    steps_above: int | None
    open_below: bool  # the run reaches the grid's lowest value: no failing value found below
    open_above: bool
    constrained: bool  # whether this half's errors depend on the key on the grid

    @property
    def at_edge(self) -> bool:
        """No margin on a side where a value with more errors lies next to the default (or the
        default itself has more than the fewest errors)."""
        if not self.constrained:
            return False
        if self.fewest_range is None:
            return True
        return (self.steps_below == 0 and not self.open_below) or \
            (self.steps_above == 0 and not self.open_above)


def half_range(scored: dict[float, int], default: float) -> HalfRange:
    """``scored``: errors per grid value of one key on one half."""
    values = sorted(scored)
    best = min(scored.values())
    ok = [scored[v] == best for v in values]
    run = _run_at(values, ok, default)
    i = values.index(default)
    lo, hi = (values.index(run[0]), values.index(run[1])) if run else (None, None)
    return HalfRange(errors_default=scored[default], fewest=best, fewest_range=run,
                     steps_below=None if run is None else i - lo,
                     steps_above=None if run is None else hi - i,
                     open_below=run is not None and lo == 0,
                     open_above=run is not None and hi == len(values) - 1,
                     constrained=len(set(scored.values())) > 1)


# Why a default may sit at an end of its fewest-error run on a half. A default flagged at an
# edge without an entry here is a finding of the calibration, shown as such on
# docs/validity.md; an entry states the evidence that keeps the default where it is.
EDGE_REASONS: dict[str, str] = {
    "adversary_chance_fraction":
        "its grid ends one step above (1.34 is no fraction); below, the record-22 decoupler's "
        "failing seed 1 ends its adversarial loss at 0.944 of its start (its discriminator "
        "recovers 5.6% of the line entropy) and keeps the swamping warning its construction "
        "expects only while the default stays above 0.944; above, ASP-MTL raw-diff s3's "
        "discriminator at chance ends at 0.969 and would read as swamped again: 0.95 says "
        "at most 5% of the label entropy recovered",
    "neglect_settled_fraction":
        "design: a constraint that fell to at most half the level it rose to is being "
        "satisfied. One grid step below (0.35), the healthy center_loss pk-sampler runs (P x "
        "K batches, 4 classes a batch; with the paper's learning-rate schedule since session "
        "12) end at 0.27-0.50 of their settled level, s0 at 0.498, and s0-s2 would read as "
        "neglected; above, nothing changes up to 1.0 on the grid. The margin to s0 is thin",
    "neglect_constraint_fraction":
        "one grid step below (0.57), DSN no-difference's difference loss (weight 0, so never "
        "trained) ends at 0.59-0.68 of its start on all four seeds while the task falls to "
        "0.02 of its own, and would read as a neglected constraint, which that variant does not "
        "declare (ASP-MTL's weight-0 variant allows it); above, 1.0 only counts constraints "
        "that did not fall at all",
    "conflict_stall_fraction":
        "one grid step below (0.64), healthy Barlow Twins' invariance/redundancy pair, both "
        "ending at 0.53-0.72 of their start, would read as a stalled conflict; above, 1.0 only "
        "counts losses that did not fall at all",
    "conflict_undone_fraction":
        "the corpus's healthy and broken pairs are closer than two grid steps here: healthy "
        "VICReg (25-25-1, s0 and s1) has 0.33-0.34 of its variance term's descent undone by the "
        "invariance term, so one step below (0.27) it reads as a plateau conflict; the lesser "
        "loss of each broken shared-head MTL pair (both variants, s0-s3) has 0.41-0.50 undone, "
        "so one step above (0.54) all eight are missed",
    "collapse_peak_fraction":
        "the corpus's healthy and collapsed runs are closer than two grid steps here: SimSiam "
        "without stop-gradient (s1) ends at 0.37 of its peak scaled std, so one step below "
        "(0.35) its complete collapse is missed (SwAV without Sinkhorn, s0, at 0.38); SimCLR's "
        "one-class-batch variants (s0, s2, s3, declared or not), broken by batch composition "
        "and declaring no collapse (end rank 42-43 of 59), end at 0.61-0.66 and "
        "class-sorted-declared s3 at 0.68, so one step above (0.71) each reads as a collapse",
    "collapse_rank_fraction":
        "the corpus's healthy and collapsed runs are closer than two grid steps here: healthy "
        "Barlow Twins ends at 0.19-0.21 of the isotropic rank, its lambda = 0 variant at 0.10",
    "contrastive_loss_ratio":
        "one grid step below (0.57), healthy SimCLR with shuffled batches (all four seeds, "
        "declared or not) ends with its InfoNCE loss at 0.61-0.63 of log(K+1) and would read as "
        "a weak signal; above, no declared alarm depends on it (at 1.13 only the allowed "
        "finding of class-sorted-declared, end ratio 0.86-0.88, goes), and a ratio above 1 "
        "asks for a loss worse than chance",
    "vanishing_norm_fraction":
        "the corpus's healthy and broken runs are closer than two grid steps here: healthy "
        "ASP-MTL raw-diff s0's shared features end at 0.124 of their peak norm, so one step "
        "above (0.14) they read as vanishing; the private codes of DSN unnormalised s3 and "
        "unnormalised-no-recon s3 end at 0.087 and 0.079, so one step below (0.071) both are "
        "missed",
    "unnormalised_correlation":
        "a correlation is at most 1, so every grid value above 1 switches this test off; no "
        "corpus run needs it (every expected orthogonality-vanishing is found by the norm "
        "test) and on the held-out half it raises the one false alarm ASP-MTL no-diff s1 "
        "(difference loss at weight 0, log correlation 0.92); one step below (0.64), no-diff "
        "s0, s2, s3 (0.67-0.89) and raw-diff s1, s3 (0.66-0.70) would add five more",
    "swamping_ratio":
        "the corpus's healthy and broken runs are closer than two grid steps here: one step "
        "below (0.071), the broken PINN equal-weights s0, s1, s3 (boundary ratio 0.049-0.069 "
        "median over the judged steps, end-window quartiles 0.038-0.082) and decoupler failing "
        "s0 (cont 0.075, 0.033-0.094) straddle it or are held on under half the judged steps, "
        "so they are missed; one step above (0.14), healthy DANN s0, s1, s3's domain losses "
        "(0.062-0.080 median over the held steps, held on 0.59-0.65 of the judged steps) and "
        "ASP-MTL's undeclared task_b (raw-diff s1, s2) and adv (no-diff s0) at 0.076-0.105 "
        "read as swamped, and PINN equal-weights s2 (end-window quartiles 0.125-0.155) is missed",
    "min_share":
        "a persistence share: 0.5 means held on most of the judged steps. One grid step below "
        "(0.35), healthy DANN s0 and s1's domain losses, under 0.1 of the label loss on "
        "0.40-0.44 of the judged steps (early; end-window ratio 0.21-0.32), read as swamped; "
        "one step above (0.71), the broken PINN equal-weights s1-s3 (boundary held on "
        "0.59-0.67) and decoupler failing s0, s1 (cont held on 0.63-0.65) are missed",
    "window_share":
        "the start and end windows every rule reads: moving them changes what start and end "
        "mean for all rules at once. One grid step below (0.14), nine runs change on the two "
        "halves (healthy DANN s0's domain losses and ASP-MTL raw-diff s2's task_b read as "
        "swamped, the broken PINN equal-weights s1, decoupler failing s0 and MTL "
        "shared-head-mirror s1, s2 are missed, DSN unnormalised s0 gets a false collapse; only "
        "ASP-MTL raw-diff s1's false adv alarm goes); one step above (0.28), healthy ASP-MTL "
        "raw-diff s2's task_b reads as swamped and DSN unnormalised s1 gets a false "
        "task/difference conflict",
    "smooth_points":
        "3 is the narrowest rolling median that removes a one-step spike; one step above (4), "
        "healthy ASP-MTL raw-diff s2's task_b ratio, whose end-window quartiles straddle 0.1 at "
        "width 3 (0.090-0.106, info), smooths to 0.082-0.098 and reads as swamped; at 2 no run "
        "changes",
    "conflict_median_cosine":
        "a design edge: -0.2 is where the rule starts to call a pair's gradients opposed; one "
        "grid step above (-0.14), on the held-out half, the broken-by-construction decoupler "
        "fixed s1 (which declares no conflict) gains a task/proto conflict at cos -0.169; "
        "below (-0.28, -0.4) no corpus run changes, so no measured pair sits between -0.4 and "
        "-0.2 and the default stays at the weakest opposition the rule is meant to judge",
    "conflict_plateau_fraction":
        "a design edge: a compromise plateau means both losses kept most of their level; one "
        "grid step above (0.82), the broken MTL shared-head-mirror s0-s3 (settled at 0.65-0.73 "
        "of their level), shared-head s0-s2 (0.78-0.79) and two-task-conflict mirror s1 "
        "(0.82) are missed; below, down to 0.07, no corpus run changes, because no healthy "
        "pair undoes over conflict_undone_fraction of its descent: moving to the middle of that "
        "unbounded range (0.2) would call a pair that fell to a fifth of its level a plateau",
    "collapse_shrink_fraction":
        "a design edge: a complete collapse by shrinking is a total variance down two orders "
        "of magnitude from its peak (issue 21: 'falls by orders of magnitude'); two grid steps "
        "above (0.02), DSN unnormalised-no-recon s2's private code, which shrinks to 0.0189 of "
        "its peak variance under the unnormalised difference loss (that run's "
        "orthogonality-vanishing) while its gradient fades with it (elasticity 0.61), reads "
        "as a collapse (one step above, s0's codes at 0.0104-0.0125 keep their gradient, "
        "elasticity 0.35-0.45); below, down to 0.0013, no corpus run changes",
    "overfit_val_rise":
        "a design edge: overfitting is a validation loss 10% above its minimum; one grid step "
        "above (0.14), on the held-out half, MTL train-64-pairs s3 (+12.4%) and sigmoid-mse "
        "train-27-images s3 (+13.6%), memorising by construction, are missed; below, down to "
        "0.035, no corpus run changes (no healthy run's validation loss rises more than "
        "3.5%), so the default keeps the documented definition rather than the range's middle",
    "conflict_share":
        "one grid step below (0.42), on the calibration half, misa raw-diff s0 gains a "
        "diff/cmd conflict (cos -0.24) that the variant does not declare: its two constraint "
        "terms oppose each other on 42-60% of the steps; above (0.85), no corpus run changes, "
        "and 0.6 is the design's 'most of the run' (above min_share) for a persistent sign",
    "dependence_corr_excess":
        "one grid step below (0.18), misa published s0 and s1 gain a shared/private "
        "latent-dependence (CKA 0.18-0.22) that the run does not have by its own measure (CKA "
        "0.024-0.035 on the test images: the shared code is a constant point there, so "
        "dependence is undefined); above, to 2, no corpus run changes: 0.25 is a max |corr| "
        "a quarter above its shuffled null, the design's 'clearly dependent'",
    "usage_held_fraction":
        "one grid step below (0.57), switch-moe alpha-1e-5's router, which its own measure "
        "shows skewed (usage entropy 0.65-0.72 of log 8 on the test digits), pools at "
        "0.61-0.69 and its swamped balancing loss would read as doing its job (missed); one "
        "step above is over 1, the largest usage entropy there is, so every swamped loss "
        "would keep its alarm and the healthy alpha 1e-2 (0.889-0.958) would be flagged",
    "memorised_fraction":
        "one grid step above (0.071), healthy DANN s0's label loss counts as memorised at step "
        "192 instead of 256, and its domain losses, judged only before that, read as swamped "
        "(held on 0.54-0.58 of the judged steps); the broken PINN equal-weights s2's swamping is "
        "missed, and healthy PINN annealing s3 gets a residual/boundary conflict; one step "
        "below (0.035) no run changes",
}


@dataclass
class KeyResult:
    """One key as the last pass (which moved nothing) scored it, every other key as chosen."""

    key: str
    default: float
    chosen: float
    errors_default: int  # calibration errors with this key at its default
    errors_chosen: int
    best_range: tuple[float, float] | None  # the run of fewest-error grid values at the chosen value
    constrained: bool  # whether the calibration errors depend on this key on the grid
    rules: tuple[str, ...]
    calibration_half: HalfRange | None = None  # the default's margins on the calibration runs
    heldout_half: HalfRange | None = None  # ... and on the held-out runs (None: none given)

    @property
    def edge_reason(self) -> str | None:
        return EDGE_REASONS.get(self.key)

    @property
    def at_edge(self) -> bool:
        return any(h is not None and h.at_edge for h in (self.calibration_half, self.heldout_half))

    @property
    def flagged(self) -> bool:
        """At an edge on either half, with no stated reason."""
        return self.at_edge and self.edge_reason is None


# Keys every rule reads (persistence and phase): tried last, so that a rule-specific key is
# moved before a change that would shift every rule at once.
GLOBAL_KEYS = ("min_points", "min_share", "window_share", "smooth_points", "memorised_fraction")


def numeric_keys() -> list[str]:
    keys = [f.name for f in fields(Thresholds) if f.metadata.get("kind") in ("float", "int")]
    return [k for k in keys if k not in GLOBAL_KEYS] + [k for k in keys if k in GLOBAL_KEYS]


def grid(key: str, value: float) -> list[float]:
    """Candidate values. A share or a fraction stays within [0, 1]; values a Thresholds
    refuses are skipped by the caller."""
    if key in ("min_points", "smooth_points"):
        return list(INT_GRID)
    if value == 0:
        return [0.0] + [s * 10.0 ** e for e in range(-3, 1) for s in (-1, 1)]
    values = {value * math.sqrt(2) ** k for k in range(-GRID_STEPS, GRID_STEPS + 1)}
    if key.endswith(("_fraction", "_share")):
        values = {v for v in values if v <= 1.0} | {1.0}
    return sorted(values)


def neighbours(key: str, value: float) -> list[float]:
    """The grid values one step below and above ``value``, a key's default (those that exist)."""
    values = grid(key, value)
    i = values.index(value)
    return [values[j] for j in (i - 1, i + 1) if 0 <= j < len(values)]


def _call(rule, run, th, earlier):
    """A rule of either signature: (run, th) or (run, th, earlier findings)."""
    if len(inspect.signature(rule).parameters) >= 3:
        return rule(run, th, tuple(earlier))
    return rule(run, th)


@dataclass
class Flip:
    """One run whose alarms change when one key moves from its value in the base thresholds:
    what the reason for an edge names."""

    record: RunRecord
    appeared: list[Finding]  # alarms at the new value that the base thresholds do not raise
    vanished: list[Finding]  # alarms at the base thresholds that the new value does not raise
    errors_base: int  # false alarms plus misses on this run at the base thresholds
    errors_value: int

    def describe(self) -> str:
        def listed(sign, found):
            return [f"{sign}{f.id}[{f.subject}] {f.key_number}" for f in found]
        return (f"{self.record.label} errors {self.errors_base}->{self.errors_value}: "
                + "; ".join(listed("+", self.appeared) + listed("-", self.vanished)))


class Calibrator:
    """Re-diagnoses calibration runs with one threshold changed at a time. Rules run in
    ``RULES`` order and may read the findings of the rules before them, so a change re-runs
    the first rule that reads the key and every rule after it. The held-out runs, when given,
    are only scanned at the end for each default's margins."""

    def __init__(self, runs: Runs, records: list[RunRecord], families: dict[str, Family],
                 heldout: list[RunRecord] | None = None):
        self.records, self.families = records, families
        self.heldout = list(heldout or [])
        self.loaded = {id(r): runs.run_of(r) for r in self.records + self.heldout}
        self.order = list(RULES)
        self.rules_reading: dict[str, set[str]] = {}

    def _diagnose(self, th: Thresholds, cache: dict | None = None, first: int = 0,
                  records: list[RunRecord] | None = None) -> dict:
        """Per run, per rule findings, re-running rules ``first..`` (earlier ones from cache)."""
        out = {}
        for r in self.records if records is None else records:
            per_rule = list(cache[id(r)][:first]) if cache else []
            for rid in self.order[first:]:
                seen: set[str] = set()
                earlier = [f for found in per_rule for f in found]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        found = _call(RULES[rid], self.loaded[id(r)], _Recording(th, seen), earlier)
                    except Exception:  # a rule diagnose() would skip with a warning
                        found = []
                per_rule.append(list(found))
                for key in seen:
                    self.rules_reading.setdefault(key, set()).add(rid)
            out[id(r)] = per_rule
        return out

    def errors(self, cache: dict, records: list[RunRecord] | None = None) -> int:
        return sum(self._run_errors(r, cache[id(r)]) for r in (self.records if records is None else records))

    def _run_errors(self, r: RunRecord, per_rule: list) -> int:
        j = judge(self.families[r.family].variant(r.variant), [f for found in per_rule for f in found])
        return len(j.false_alarms) + len(j.misses)

    def flips(self, key: str, value: float, th: Thresholds | None = None,
              records: list[RunRecord] | None = None, cache: dict | None = None) -> list[Flip]:
        """The runs of ``records`` (default: the calibration runs) whose alarms change when
        ``key`` goes from its value in ``th`` (default: the defaults) to ``value``. ``cache``:
        this class's per-rule findings of ``records`` at ``th``, when already diagnosed."""
        th = th or Thresholds()
        if cache is None or key not in self.rules_reading:
            cache = self._diagnose(th, records=records)
        if key not in self.rules_reading:
            return []  # no rule reads it on these runs
        first = self.order.index(min(self.rules_reading[key], key=self.order.index))
        moved = self._diagnose(th.replace(**{key: value}), cache, first, records)
        out = []
        for r in self.records if records is None else records:
            before = [f for found in cache[id(r)] for f in found]
            after = [f for found in moved[id(r)] for f in found]
            raised_before, raised_after = alarms(before), alarms(after)
            if raised_before != raised_after:
                out.append(Flip(r, [f for f in after if alarms([f]) - raised_before],
                                [f for f in before if alarms([f]) - raised_after],
                                self._run_errors(r, cache[id(r)]), self._run_errors(r, moved[id(r)])))
        return out

    def edge_flips(self, results: list[KeyResult], th: Thresholds
                   ) -> list[tuple[str, str, float, list[Flip]]]:
        """For each key at an edge (``results`` as ``calibrate`` returned them, every other key
        as in ``th``): per half and per grid neighbour of the key's default, the runs that
        change verdict there, which an edge reason names. Tuples of (key, half, neighbour
        value, flips)."""
        halves = {"calibration": self.records} | ({"held-out": self.heldout} if self.heldout else {})
        caches = {half: self._diagnose(th, records=records) for half, records in halves.items()}
        out = []
        for k in (k for k in results if k.at_edge):
            base = th.replace(**{k.key: k.default})
            for half, records in halves.items():
                cache = caches[half] if base == th else self._diagnose(base, records=records)
                for value in neighbours(k.key, k.default):
                    try:
                        base.replace(**{k.key: value})
                    except ValueError:
                        continue  # a value Thresholds refuses
                    out.append((k.key, half, value, self.flips(k.key, value, base, records, cache)))
        return out

    def _scan(self, key: str, th: Thresholds, default: Thresholds, cache: dict,
              records: list[RunRecord] | None = None) -> dict[float, int]:
        """Errors on ``records`` (default: the calibration runs) for each candidate value of
        ``key``, every other key as in ``th``."""
        first = self.order.index(min(self.rules_reading[key], key=self.order.index))
        scored = {}
        for value in sorted(set(grid(key, getattr(default, key))) | {getattr(th, key)}):
            try:
                trial = th.replace(**{key: value})
            except ValueError:
                continue
            scored[value] = self.errors(self._diagnose(trial, cache, first, records), records)
        return scored

    def calibrate(self, start: Thresholds | None = None, max_passes: int = 3
                  ) -> tuple[Thresholds, list[KeyResult]]:
        default = start or Thresholds()
        th = default
        cache = self._diagnose(th)
        keys = [k for k in numeric_keys() if k in self.rules_reading]
        for _ in range(max_passes):
            moved = False
            for key in keys:
                current, base = getattr(th, key), getattr(default, key)
                scored = self._scan(key, th, default, cache)
                values = sorted(scored)
                best = min(scored.values())
                ok = [scored[v] == best for v in values]
                # A default with the fewest errors stays; otherwise the key goes to the middle
                # of the widest fewest-error run (a moved key is re-centred in its own run, which
                # other keys' moves may have shifted), only when that run spans two grid values.
                target = _widest_run(values, ok) if scored[current] > best else \
                    (_run_at(values, ok, current) if current != base else None)
                chosen = _middle(key, target) if target and target[0] != target[1] else current
                if not math.isclose(chosen, current, rel_tol=0.05):
                    th = th.replace(**{key: chosen})
                    first = self.order.index(min(self.rules_reading[key], key=self.order.index))
                    cache = self._diagnose(th, cache, first)
                    moved = True
            if not moved:
                break
        heldout_cache = self._diagnose(th, records=self.heldout) if self.heldout else None
        results = []
        for key in keys:  # the report: each key scored with every other key as chosen
            scored = self._scan(key, th, default, cache)
            values = sorted(scored)
            best = min(scored.values())
            ok = [scored[v] == best for v in values]
            current, base = getattr(th, key), getattr(default, key)
            results.append(KeyResult(
                key=key, default=base, chosen=current,
                errors_default=scored[base], errors_chosen=scored[current],
                best_range=_run_at(values, ok, current), constrained=len(set(scored.values())) > 1,
                rules=tuple(sorted(self.rules_reading[key], key=self.order.index)),
                calibration_half=half_range(scored, base),
                heldout_half=None if heldout_cache is None else half_range(
                    self._scan(key, th, default, heldout_cache, self.heldout), base)))
        return th, results


def _middle(key: str, run: tuple[float, float]) -> float:
    lo, hi = run
    middle = math.sqrt(lo * hi) if lo > 0 and hi > 0 else (lo + hi) / 2
    return int(round(middle)) if key in ("min_points", "smooth_points") else middle


def _run_at(values: list[float], ok: list[bool], value: float) -> tuple[float, float] | None:
    """The run of consecutive fewest-error values that holds ``value`` (None if it is not one)."""
    i = values.index(value)
    if not ok[i]:
        return None
    lo = hi = i
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(values) - 1 and ok[hi + 1]:
        hi += 1
    return values[lo], values[hi]


def _widest_run(values: list[float], ok: list[bool]) -> tuple[float, float] | None:
    best, start = None, None
    for i, flag in enumerate(ok + [False]):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return None if best is None else (values[best[0]], values[best[1] - 1])
