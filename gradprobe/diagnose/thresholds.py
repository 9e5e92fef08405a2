"""Every number a diagnosis rule compares against, with its documented default.

Override from Python (``Thresholds(swamping_ratio=0.05)``, ``Thresholds.from_mapping({...})``)
or from a TOML file of flat ``key = value`` lines (:func:`load_thresholds`). docs/findings.md
says where each default comes from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from gradprobe.record import ROLES

# A loss weight is fixed when its range (max - min) is at most this share of its largest |value|.
FIXED_WEIGHT_TOLERANCE = 1e-9


class ConfigError(ValueError):
    """A thresholds mapping or file that cannot be used; the message is one line."""


def _f(default: float, doc: str):
    return field(default=default, metadata={"doc": doc, "kind": "float"})


def _i(default: int, doc: str):
    return field(default=default, metadata={"doc": doc, "kind": "int"})


def _roles(default: tuple[str, ...], doc: str):
    return field(default=default, metadata={"doc": doc, "kind": "roles"})


@dataclass(frozen=True)
class Thresholds:
    """Thresholds of the diagnosis rules (see docs/findings.md for each number's source)."""

    # -- persistence and phase (all rules) -------------------------------------------------
    min_points: int = _i(3, "fewest probe steps a condition must hold on (and fewest to judge)")
    min_share: float = _f(0.5, "share of the judged training steps a persistent condition must "
                               "hold on")
    window_share: float = _f(0.2, "start/end windows: this share of the training steps "
                                   "(at least min_points probe steps)")
    smooth_points: int = _i(3, "rolling-median width used for peaks and phase detection")
    memorised_fraction: float = _f(0.05, "the task has memorised its data once its smoothed loss "
                                          "is below this fraction of its start")
    # -- gradient-swamping -------------------------------------------------------------------
    # -- inert-loss ---------------------------------------------------------------------------
    inert_rounding_fraction: float = _f(1e-4, "a loss whose gradient and weighted gradient are "
                                              "both at most this fraction of the largest other "
                                              "loss's at every probe step moves nothing: its "
                                              "gradient is rounding residue (inert-loss)")
    swamping_ratio: float = _f(0.1, "weighted gradient norm / largest loss's below this: swamped")
    swamping_error_ratio: float = _f(0.01, "median ratio below this: severity error")
    learned_fraction: float = _f(0.05, "a loss below this fraction of its start has nothing "
                                        "left to learn (not judged for swamping)")
    swamping_floor_fraction: float = _f(0.025, "a loss whose end window is at most this "
                                               "fraction of its initial level (its first "
                                               "min_points values) ended at its floor: "
                                               "satisfied, neither swamped nor stalled "
                                               "by a conflict")
    adversary_chance_fraction: float = _f(0.95, "an adversarial loss whose end window is at "
                                                 "least this fraction of its start window: its "
                                                 "discriminator is at chance (recovers at most "
                                                 "1 - this of the label entropy), a swamping "
                                                 "finding on it is info")
    adversary_rise_ratio: float = _f(2.0, "an adversarial loss recorded from the side that "
                                          "fools the discriminator (a generator's -log D) "
                                          "whose end window is above this multiple of its "
                                          "start window: the discriminator wins (its belief "
                                          "in what it should be fooled by halved from 1/2 "
                                          "to 1/4), not at chance")
    swamping_carried_cosine: float = _f(0.2, "a swamped loss whose gradient has at least this "
                                             "median cosine with the dominant loss's (over "
                                             "the steps it is swamped, on the layers both "
                                             "reach) is carried by the dominant's descent: "
                                             "info, not an alarm")
    swamping_stall_fraction: float = _f(0.6, "a swamped loss whose end window is at least "
                                             "this fraction of its start window while the "
                                             "dominant's ends below it never recovered its "
                                             "fit: a ratio straddling swamping_ratio no "
                                             "longer makes the finding info, and a loss in "
                                             "exempt_roles that held it back competes with it")
    exempt_roles: tuple[str, ...] = _roles(("regularization", "kl"),
                                           "roles never reported as swamped or conflicting, "
                                           "nor for missing the shared parameters")
    usage_held_fraction: float = _f(0.8, "a swamped loss that reaches watched prototypes whose "
                                         "pooled usage entropy / log P is at least this "
                                         "does its job: info, not an alarm")
    # -- constraint-neglect ------------------------------------------------------------------
    neglect_task_fraction: float = _f(0.1, "task loss end/start at most this: driven towards 0")
    neglect_constraint_fraction: float = _f(0.8, "constraint loss end/start at least this: stays "
                                                  "high")
    constraint_roles: tuple[str, ...] = _roles(
        ("contrastive", "prototype", "orthogonality", "decorrelation", "reconstruction"),
        "roles counted as geometric constraints")
    neglect_settled_fraction: float = _f(0.5, "a constraint that rose to an equilibrium in its "
                                              "start window and ends below this fraction of "
                                              "that level is being satisfied")
    # -- gradient-conflict -------------------------------------------------------------------
    conflict_median_cosine: float = _f(-0.2, "median cosine of a pair at most this")
    conflict_share: float = _f(0.6, "share of probe steps with cosine < 0 at least this")
    conflict_tragic_share: float = _f(0.5, "share of steps with cos <= -magnitude similarity at "
                                            "least this: severity error (with harm)")
    conflict_stall_fraction: float = _f(0.9, "harm: a loss ends at least this fraction of its "
                                              "start (stalled or rose) while the other ends "
                                              "below it, of its start and of its level after "
                                              "its start window (still falls)")
    conflict_cancel_ratio: float = _f(0.2, "harm: median combined gradient norm / sum of the "
                                            "weighted norms at most this (they cancel)")
    conflict_rise_ratio: float = _f(3.0, "a loss whose level after its start window is at "
                                         "least this multiple of its start-window low rose "
                                         "from near its floor to an equilibrium: never "
                                         "stalled or stuck")
    conflict_undone_fraction: float = _f(0.38, "plateau harm: median share of each loss's "
                                              "first-order descent that the other's weighted "
                                              "gradient undoes at least this, for both; stall "
                                              "harm: for the stalled loss (held by the other)")
    conflict_plateau_fraction: float = _f(0.58, "plateau harm: each loss ends at least this "
                                               "fraction of its level after the start window "
                                               "(neither still falls)")
    conflict_metric_progress: float = _f(0.1, "metric harm: a per-task metric logged for a "
                                              "loss (probe.log, a name holding the loss's "
                                              "name) improved over the second half of the "
                                              "judged steps by at most this fraction of its "
                                              "first half's improvement, and fell back by no "
                                              "more: stopped improving")
    # -- representation-collapse -------------------------------------------------------------
    collapse_peak_fraction: float = _f(0.5, "end rank (or normalised std, total variance) at "
                                             "most this fraction of its own peak")
    collapse_rank_fraction: float = _f(0.15, "... and end rank at most this fraction of the "
                                             "isotropic (healthy) rank")
    collapse_std_fraction: float = _f(0.65, "... or end normalised std * sqrt(d) at most this "
                                            "(healthy ~1)")
    collapse_participation: float = _f(2.0, "... or end participation ratio (tr C)^2 / tr C^2 "
                                            "at most this and at most collapse_peak_fraction "
                                            "of its peak: the centred variance sits in about "
                                            "one direction (dimensional collapse) ...")
    collapse_participation_rank: float = _f(0.25, "... and end rank at most this fraction of "
                                                  "the isotropic rank (a latent read along one "
                                                  "direction keeps a wider spectrum)")
    collapse_participation_lost: float = _f(0.15, "... or end participation ratio at most "
                                                  "this fraction of its peak while the total "
                                                  "variance ends at most collapse_peak_fraction "
                                                  "of its own: the directions lost took their "
                                                  "variance with them (a sharpening spectrum "
                                                  "keeps it; dimensional collapse)")
    collapse_shrink_fraction: float = _f(0.01, "end total variance at most this fraction of "
                                               "its peak: a shrink to the origin (complete "
                                               "collapse even while the normalised std holds)")
    collapse_sphere_fraction: float = _f(0.03, "rows of one norm (see collapse_constant_norm): "
                                               "the normalised-std test of a collapse to a "
                                               "point also needs the end total variance at "
                                               "most this fraction of its peak, unless the "
                                               "participation test holds (else: "
                                               "mean-dominated)")
    collapse_constant_norm: float = _f(0.01, "the rows have one norm when the mean row norm "
                                             "ranges over at most this fraction of its "
                                             "largest value over the run")
    collapse_shrink_elasticity: float = _f(0.5, "... and the gradient the losses send to the "
                                                "latent (sum of w * |dL/dz|) fell with its "
                                                "scale: log(end/peak gradient) / log(end/peak "
                                                "std) at least this (a loss of degree p in the "
                                                "latent's scale gives p - 1: 1 quadratic, 0 a "
                                                "distance, -1 on normalised rows)")
    collapse_error_rank: float = _f(1.5, "end effective rank at most this: severity error")
    collapse_class_fraction: float = _f(0.5, "with class labels: ... and end rank at most this "
                                              "fraction of classes - 1 (neural collapse)")
    collapse_active_fraction: float = _f(0.1, "with a KL loss: end active units at most this "
                                               "fraction of the dim (posterior collapse)")
    # -- weak-contrastive-signal -------------------------------------------------------------
    contrastive_same_group_share: float = _f(0.9, "median share of same-group negatives at "
                                                   "least this")
    contrastive_loss_ratio: float = _f(0.8, "end InfoNCE loss / log(K+1) at least this ...")
    contrastive_gap: float = _f(0.0, "... and end positive-minus-hardest-negative gap at most this")
    # -- batch-composition-mismatch ----------------------------------------------------------
    composition_fewer_fraction: float = _f(0.5, "a batch holding at most this fraction of the "
                                                "declared groups mismatches")
    # -- prototype-stale ---------------------------------------------------------------------
    stale_drift: float = _f(1e-6, "relative prototype change at most this: did not move")
    stale_min_target_shift: float = _f(1e-3, "relative movement of the group feature means at "
                                              "least this: the latent moved")
    stale_lag_within: float = _f(4.0, "still prototypes whose end lag is at most this many "
                                      "group std sit within their groups: the latent came to "
                                      "them (a fixed table), not stale")
    # -- prototype-collapse ------------------------------------------------------------------
    proto_collapse_fraction: float = _f(0.2, "end mean pairwise distance at most this fraction of "
                                              "its peak (scale-free when the latent's norm is "
                                              "recorded)")
    proto_merge_fraction: float = _f(0.1, "end min / mean pairwise distance at most this "
                                           "fraction of what chance gives the table's rows over "
                                           "its rank (metrics.closest_pair_by_chance): two "
                                           "prototypes merged")
    proto_usage: float = _f(0.5, "usage entropy / log P of the assignments pooled over "
                                    "the end window at most this: at 0.5 the pooled perplexity "
                                    "exp(H) is at most sqrt(P) of the P prototypes")
    proto_used_fraction: float = _f(0.5, "at most this share of the prototypes assigned any row "
                                         "over the end window (the others dead) ...")
    proto_dead_rows: float = _f(20.0, "... with at least this many rows pooled per prototype: "
                                      "under uniform usage a prototype then goes unassigned "
                                      "with probability e^-20")
    # -- orthogonality-vanishing -------------------------------------------------------------
    vanishing_norm_fraction: float = _f(0.1, "end latent norm at most this fraction of its peak")
    unnormalised_correlation: float = _f(0.9, "correlation of log orthogonality loss with "
                                              "log(|z_a|^2 |z_b|^2) at least this ...")
    unnormalised_slope: float = _f(0.5, "... and the least-squares slope of log loss on log("
                                        "|z_a|^2 |z_b|^2) at least this (1 when the loss is "
                                        "proportional to it)")
    unnormalised_norm_range: float = _f(10.0, "... while |z_a|^2 |z_b|^2 varies by at least "
                                              "this factor")
    # -- latent-dependence -------------------------------------------------------------------
    dependence_cka: float = _f(0.3, "debiased linear CKA at least this: dependent")
    dependence_corr_excess: float = _f(0.25, "max |corr| minus its independence null at least "
                                              "this: dependent")
    # -- sigmoid-saturation ------------------------------------------------------------------
    saturation_fraction: float = _f(0.25, "saturated share of sigmoid inputs at least this")
    saturation_wrong_fraction: float = _f(0.01, "end share of sigmoid inputs saturated on the "
                                                "wrong side of their target at least this: "
                                                "harmful")
    saturation_wrong_class_fraction: float = _f(0.5, "end share of one target class's sigmoid "
                                                      "inputs saturated on the wrong side at "
                                                      "least this: harmful, however rare the "
                                                      "class")
    saturation_error_fraction: float = _f(0.5, "median saturated share at least this, when "
                                               "harmful: error")
    saturation_energy_ratio: float = _f(10.0, "energy-term scale ratio at least this is reported")
    # -- static-loss-weights -----------------------------------------------------------------
    static_weight_tolerance: float = _f(FIXED_WEIGHT_TOLERANCE, "relative range (max-min)/max |w| at most this: "
                                               "constant")
    # -- overfitting -------------------------------------------------------------------------
    overfit_val_rise: float = _f(0.1, "validation end / its minimum - 1 at least this")
    overfit_train_drop: float = _f(0.1, "training loss fell by at least this share after the "
                                         "validation minimum")
    overfit_error_rise: float = _f(0.5, "validation rise at least this: severity error")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _check(f, value))
        for name in ("min_share", "window_share", "conflict_share", "conflict_tragic_share",
                     "contrastive_same_group_share", "memorised_fraction", "learned_fraction",
                     "swamping_floor_fraction", "usage_held_fraction", "adversary_chance_fraction",
                     "saturation_wrong_fraction", "conflict_undone_fraction",
                     "saturation_wrong_class_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"threshold {name!r} must be within [0, 1], got {value}")
        if self.min_points < 1 or self.smooth_points < 1:
            raise ConfigError("thresholds 'min_points' and 'smooth_points' must be >= 1")

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """``(key, default, meaning)`` for every threshold, in declaration order."""
        return [(f.name, f.default, f.metadata["doc"]) for f in fields(cls)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str = "thresholds") -> "Thresholds":
        """Defaults overridden by ``mapping``; an unknown key raises :class:`ConfigError`."""
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{source}: expected a mapping of threshold names to values, "
                              f"got {type(mapping).__name__}")
        known = cls.known_keys()
        for key in mapping:
            if key not in known:
                raise ConfigError(f"{source}: unknown threshold {key!r}; known thresholds: "
                                  f"{', '.join(known)}")
        try:
            return cls(**dict(mapping))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def replace(self, **changes: Any) -> "Thresholds":
        return type(self).from_mapping({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}


def _check(f: dataclasses.Field, value: Any) -> Any:
    kind = f.metadata["kind"]
    if kind == "roles":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                not all(isinstance(v, str) for v in value):
            raise ConfigError(f"threshold {f.name!r} must be a list of role names, got {value!r}")
        unknown = [v for v in value if v not in ROLES]
        if unknown:
            raise ConfigError(f"threshold {f.name!r}: unknown role(s) {', '.join(unknown)}; "
                              f"roles are: {', '.join(ROLES)}")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"threshold {f.name!r} must be a number, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"threshold {f.name!r} must be an integer, got {value!r}")
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"threshold {f.name!r} must be finite, got {value!r}")
    return value


def load_thresholds(path: str | os.PathLike) -> Thresholds:
    """Thresholds from a TOML file of flat ``key = value`` lines (defaults for the rest)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("reading a TOML thresholds file needs Python >= 3.11 (tomllib) "
                              "or the tomli package") from None
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such thresholds file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a thresholds file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({str(exc).splitlines()[0]})") from None
    return Thresholds.from_mapping(data, source=str(path))
