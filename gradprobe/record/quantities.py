"""The names that tie the stages together: every quantity a run file holds, and the loss roles.

A run is a set of series keyed by ``(quantity, name)``. The probe writes them, the diagnosis
and the report read them; this module is the one place their names, units and meanings are
defined, so that a stage refers to ``WEIGHTED_GRAD_NORM`` (a plain ``str``) instead of
spelling ``"weighted_grad_norm"``, and a reader can ask :data:`QUANTITIES` what a series is::

    from gradprobe.record import QUANTITIES, quantities as q
    run.series(q.WEIGHTED_GRAD_NORM, "cont")
    QUANTITIES[q.WEIGHTED_GRAD_NORM].label   # '‖w·g‖' (also .unit, .direction, .meaning)

Each constant is the quantity's name in capitals (``SATURATION_THRESHOLD_USED`` for
``"saturation_threshold"``, so as not to be read as the cut-off value
``gradprobe.metrics.SATURATION_THRESHOLD``).

docs/quantities.md holds one table row per entry (tests/test_quantities.py checks it), and a
test asserts that every quantity a real probe run writes is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What a loss is for (``Probe(..., roles={name: role})``); the diagnosis reads them.
ROLES: tuple[str, ...] = ("task", "contrastive", "prototype", "orthogonality", "decorrelation",
                          "adversarial", "alignment", "distillation", "reconstruction",
                          "regularization", "kl", "other")


def role_declaration(loss_name: str, role: str) -> str:
    """The one line that declares a loss's role (and overrides an inferred one)."""
    return f'Probe(..., roles={{"{loss_name}": "{role}"}})'

Direction = Literal["higher", "lower", "neither"]
DIRECTIONS: tuple[str, ...] = ("higher", "lower", "neither")

# The families, in the order docs/quantities.md lists them.
GROUPS: tuple[str, ...] = ("losses", "latents", "prototypes", "saturation", "contrastive",
                           "batches", "logged")

# Fixed series names: the whole shared set, the batch, mixed precision.
SHARED = "shared"
BATCH = "batch"
AMP = "amp"
PAIR_SEPARATOR = "|"


def pair_name(a: str, b: str) -> str:
    """The series name of a pair (two losses, two latents, a latent and a loss): ``"a|b"``."""
    return f"{a}{PAIR_SEPARATOR}{b}"


def pair_parts(name: str) -> tuple[str, str]:
    """``"a|b"`` -> ``("a", "b")``: the inverse of :func:`pair_name`."""
    a, _, b = name.partition(PAIR_SEPARATOR)
    return a, b


@dataclass(frozen=True)
class Quantity:
    """One recorded quantity: what it is called, measured in and means.

    ``subject``: what the series name stands for (a loss, a pair ``a|b``, a latent, a watch,
    or a fixed name). ``direction``: whether a higher value is healthier, a lower one, or
    neither (it depends on the model). ``healthy``: the healthy level in words, where one
    exists; ``reference``: the recorded quantity (same series name) that holds it, when the
    probe records one beside it. ``kind``: ``"scalar"`` (``run.series``) or ``"array"``
    (``run.arrays``).
    """

    name: str
    group: str
    subject: str
    unit: str
    label: str
    direction: Direction
    meaning: str
    healthy: str | None = None
    reference: str | None = None
    kind: Literal["scalar", "array"] = "scalar"

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"quantity {self.name!r}: unknown group {self.group!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"quantity {self.name!r}: unknown direction {self.direction!r}")


QUANTITIES: dict[str, Quantity] = {}


def _define(name: str, group: str, subject: str, unit: str, label: str, direction: Direction,
            meaning: str, **more: str) -> str:
    if name in QUANTITIES:
        raise ValueError(f"quantity {name!r} defined twice")
    QUANTITIES[name] = Quantity(name, group, subject, unit, label, direction, meaning, **more)
    return name


# -- losses and their gradients on the shared parameters ---------------------------------------
LOSS = _define("loss", "losses", "loss", "loss value", "loss", "lower", "the loss value")
WEIGHT = _define("weight", "losses", "loss", "factor", "loss weight w", "neither",
                 "the weight used at that step (1.0 when not given)")
GRAD_NORM = _define("grad_norm", "losses", "loss", "L2 norm", "‖g‖", "neither",
                    "‖g_k‖, gradient of the loss on the shared parameters")
WEIGHTED_GRAD_NORM = _define("weighted_grad_norm", "losses", "loss", "L2 norm", "‖w·g‖",
                             "neither", "‖w_k g_k‖")
GRAD_CONTRIBUTION = _define(
    "grad_contribution", "losses", "loss", "share", "share of ‖Σ w·g‖²", "neither",
    "w_k (G w)_k / (wᵀ G w): the loss's share of the squared norm of the combined gradient "
    "(sums to 1; negative when it works against the others)")
GRAD_DOT = _define("grad_dot", "losses", "pair a|b", "squared L2 norm", "g_a·g_b", "neither",
                   "g_a · g_b: an off-diagonal entry of the Gram matrix G = J Jᵀ")
GRAD_COSINE = _define("grad_cosine", "losses", "pair a|b", "-1 to 1", "cos(g_a, g_b)", "higher",
                      "g_a · g_b / (‖g_a‖ ‖g_b‖); 0 when a norm is 0",
                      healthy="≥ 0 (below 0 the two losses pull the shared parameters apart)")
MAGNITUDE_SIMILARITY = _define("magnitude_similarity", "losses", "pair a|b", "0 to 1",
                               "magnitude similarity", "neither",
                               "2‖g_a‖‖g_b‖ / (‖g_a‖² + ‖g_b‖²) (PCGrad)")
COMBINED_GRAD_NORM = _define("combined_grad_norm", "losses", SHARED, "L2 norm", "‖Σ w·g‖",
                             "neither", "‖Σ_k w_k g_k‖ = sqrt(wᵀ G w)")
LATENT_GRAD_NORM = _define("latent_grad_norm", "losses", "pair latent|loss", "L2 norm", "‖∂L/∂z‖",
                           "neither", "‖∂L_k/∂z‖ with respect to a watched latent (0: the loss "
                           "does not use it)")
GRAD_SCALE = _define("grad_scale", "losses", AMP, "factor", "GradScaler scale", "neither",
                     "the GradScaler's scale at that step (mixed precision; the recorded norms "
                     "are unscaled)")
GRAD_GRAM = _define("grad_gram", "losses", SHARED, "squared L2 norm", "Gram matrix G", "neither",
                    "the whole K x K Gram matrix of the per-loss gradients, losses in "
                    "`run.losses` order", kind="array")
GRAD_GRAM_LAYER = _define(
    "grad_gram_layer", "losses", "shared module", "squared L2 norm", "layer Gram matrix G_l",
    "neither", "the K x K Gram matrix G_l = J_l J_lᵀ of the per-loss gradients on one module's "
    "parameters, for every module of the whole shared set (by default every parameter the "
    "task and another loss reach; at most 32 blocks: beyond, modules merge into their "
    "parents); the blocks of the shared set's modules sum to `grad_gram`. Not recorded under "
    "FSDP2", kind="array")

# -- latents ---------------------------------------------------------------------------------
EFFECTIVE_RANK_ISOTROPIC = _define(
    "effective_rank_isotropic", "latents", "latent", "dimensions", "isotropic RankMe", "neither",
    "RankMe of an isotropic Gaussian sample of the same n x d: the healthy reference")
EFFECTIVE_RANK = _define("effective_rank", "latents", "latent", "dimensions", "RankMe", "higher",
                         "RankMe (uncentred), on at most `max_rows` rows of the batch",
                         healthy="near the isotropic rank", reference=EFFECTIVE_RANK_ISOTROPIC)
EFFECTIVE_RANK_CENTRED = _define("effective_rank_centred", "latents", "latent", "dimensions",
                                 "entropy rank of the covariance", "higher",
                                 "entropy rank of the covariance eigenvalues")
RANKME_CENTRED = _define(
    "rankme_centred", "latents", "latent", "dimensions", "RankMe (centred)", "higher",
    "RankMe of the column-centred latent (a common offset is not a direction); compared with "
    "`effective_rank_isotropic`", healthy="near the isotropic rank",
    reference=EFFECTIVE_RANK_ISOTROPIC)
PARTICIPATION_RATIO = _define("participation_ratio", "latents", "latent", "dimensions",
                              "participation ratio", "higher", "(tr C)² / tr(C²)")
NORMALIZED_STD = _define("normalized_std", "latents", "latent", "per dimension",
                         "std of the normalised rows", "higher",
                         "SimSiam collapse indicator; ≈ 1/sqrt(d) healthy, ≈ 0 collapsed",
                         healthy="1/sqrt(d)")
TOTAL_VARIANCE = _define("total_variance", "latents", "latent", "squared latent units", "tr C",
                         "neither", "tr C, the summed variance of the dimensions over the rows "
                         "(keeps the scale, ignores the mean)")
ACTIVE_UNITS = _define("active_units", "latents", "latent", "count", "active units", "higher",
                       "dimensions whose variance over the rows exceeds 0.01 (Burda et al. 2016; "
                       "meaningful for a posterior mean under a unit prior)")
LATENT_CLASSES = _define("latent_classes", "latents", "latent", "count", "classes", "neither",
                         "distinct class labels among the rows used, with "
                         "`watch_latent(..., labels=...)`")
LATENT_NORM = _define("latent_norm", "latents", "latent", "L2 norm", "mean ‖z‖", "neither",
                      "mean row L2 norm")
LATENT_DIM = _define("latent_dim", "latents", "latent", "count", "d", "neither",
                     "d, the latent's dimension")
LATENT_ROWS = _define("latent_rows", "latents", "latent", "count", "rows", "neither",
                      "the number of rows used")
CKA = _define("cka", "latents", "pair z1|z2", "0 to 1", "CKA", "neither",
              "debiased linear CKA between two latents of the same batch")
MAX_ABS_CORRELATION_NULL = _define(
    "max_abs_correlation_null", "latents", "pair z1|z2", "0 to 1", "max |corr| of independent data",
    "neither", "what independent Gaussian data of the same shape gives")
MAX_ABS_CORRELATION = _define(
    "max_abs_correlation", "latents", "pair z1|z2", "0 to 1", "max |corr|", "neither",
    "largest |Pearson r| between a dimension of one and one of the other",
    reference=MAX_ABS_CORRELATION_NULL)
SINGULAR_SPECTRUM = _define("singular_spectrum", "latents", "latent", "share", "σᵢ / Σσ",
                            "neither", "the top 32 singular values, normalised to sum 1",
                            kind="array")

# -- prototypes ------------------------------------------------------------------------------
PROTOTYPE_DRIFT = _define("prototype_drift", "prototypes", "prototype watch", "ratio",
                          "relative prototype change", "neither",
                          "‖P_now − P_prev‖_F / ‖P_prev‖_F since the previous probe step")
PROTOTYPE_MOVED_SHARE = _define("prototype_moved_share", "prototypes", "prototype watch", "share",
                                "share of rows moved", "neither",
                                "share of prototype rows that moved since the previous probe step")
PROTOTYPE_STEPS_SINCE_MOVED = _define("prototype_steps_since_moved", "prototypes",
                                      "prototype watch", "steps", "steps since moved", "lower",
                                      "steps since the stalest row last moved")
PROTOTYPE_MIN_DISTANCE = _define("prototype_min_distance", "prototypes", "prototype watch",
                                 "latent units", "closest pair distance", "higher",
                                 "the smallest pairwise Euclidean distance between rows")
PROTOTYPE_MEAN_DISTANCE = _define("prototype_mean_distance", "prototypes", "prototype watch",
                                  "latent units", "mean pairwise distance", "higher",
                                  "the mean pairwise Euclidean distance between rows")
PROTOTYPE_COUNT = _define("prototype_count", "prototypes", "prototype watch", "count",
                          "prototypes", "neither", "the number of rows of the table")
PROTOTYPE_RANK = _define("prototype_rank", "prototypes", "prototype watch", "dimensions",
                         "prototype RankMe", "higher", "RankMe of the prototype matrix")
PROTOTYPE_USAGE = _define("prototype_usage", "prototypes", "prototype watch", "0 to 1",
                          "usage entropy", "higher",
                          "entropy of nearest-prototype assignments of the latent, normalised to "
                          "[0, 1]")
PROTOTYPE_ASSIGNMENTS = _define("prototype_assignments", "prototypes", "prototype watch", "count",
                               "rows per prototype", "neither",
                               "how many rows of the latent have each prototype as their nearest, "
                               "one count per prototype (summed over steps: the set's usage)",
                               kind="array")
PROTOTYPE_LAG = _define("prototype_lag", "prototypes", "prototype watch", "group std",
                        "prototype lag", "lower",
                        "distance from each prototype to its group's current feature mean, in "
                        "group std units")
PROTOTYPE_TARGET_SHIFT = _define("prototype_target_shift", "prototypes", "prototype watch",
                                 "ratio", "group mean shift", "neither",
                                 "relative movement of the groups' feature means between "
                                 "observations")

# -- sigmoid saturation ----------------------------------------------------------------------
SATURATED_FRACTION = _define("saturated_fraction", "saturation", "saturation watch", "share",
                             "saturated share", "lower",
                             "share of inputs with |x| > threshold (default 4.6, where "
                             "sigmoid'(x) < 0.01)")
SATURATED_WRONG_FRACTION = _define(
    "saturated_wrong_fraction", "saturation", "saturation watch", "share",
    "saturated on the wrong side", "lower",
    "share of inputs saturated and on the wrong side of their target (|sigmoid(x) − y| > 0.5), "
    "with `watch_saturation(..., target=...)`", healthy="0")
SATURATED_WRONG_CLASS_FRACTION = _define(
    "saturated_wrong_class_fraction", "saturation", "saturation watch", "share",
    "saturated on the wrong side, worst class", "lower",
    "the same share within the target class (trained towards 1, or towards 0) where it is "
    "largest, so that a rare class all wrong reads 1", healthy="0")
MEAN_SIGMOID_GRAD = _define("mean_sigmoid_grad", "saturation", "saturation watch", "0 to 0.25",
                            "mean sigmoid'", "neither", "mean of sigmoid'(x) = s(1 − s)")
SATURATION_THRESHOLD_USED = _define("saturation_threshold", "saturation", "saturation watch",
                               "logit", "threshold", "neither", "the threshold used")
TEMPERATURE = _define("temperature", "saturation", "saturation watch", "factor", "temperature",
                      "neither", "the temperature, when given to the watch")
ENERGY_SCALE_RATIO = _define("energy_scale_ratio", "saturation", "saturation watch", "ratio",
                             "energy scale ratio", "lower",
                             "max/min ratio of the standard deviations of the two energy terms, "
                             "when given", healthy="≈ 1")
SATURATION_HISTOGRAM = _define("saturation_histogram", "saturation", "saturation watch", "count",
                               "inputs per bin", "neither",
                               "counts over 41 fixed bins on [−20, 20] (inputs clamped)",
                               kind="array")

# -- contrastive batches ---------------------------------------------------------------------
CONTRASTIVE_LOSS_RATIO = _define("contrastive_loss_ratio", "contrastive", "contrastive watch",
                                 "share of chance", "InfoNCE / log(K+1)", "lower",
                                 "InfoNCE loss / log(K+1); ≈ 1 means the negatives carry no "
                                 "information", healthy="well below 1")
CONTRASTIVE_GAP = _define("contrastive_gap", "contrastive", "contrastive watch", "logit",
                          "positive − hardest negative", "higher",
                          "positive logit minus the hardest negative logit, mean over anchors",
                          healthy="> 0")
CONTRASTIVE_EFFECTIVE_NEGATIVES = _define(
    "contrastive_effective_negatives", "contrastive", "contrastive watch", "count",
    "effective negatives", "higher", "1 / Σ r² of the softmax weights over the negatives")
CONTRASTIVE_NEGATIVES = _define(
    "contrastive_negatives", "contrastive", "contrastive watch", "count", "negatives", "neither",
    "K, the mean number of negatives per anchor (in-batch plus extra negatives, after masking)")
CONTRASTIVE_SAME_GROUP_SHARE = _define(
    "contrastive_same_group_share", "contrastive", "contrastive watch", "share",
    "same-group negatives", "lower",
    "share of negatives from the anchor's own group (when groups are observed)")

# -- batches (from ``observe(groups=...)``) --------------------------------------------------
GROUPS_PER_BATCH = _define("groups_per_batch", "batches", BATCH, "count", "groups per batch",
                           "neither", "distinct groups in the batch")
GROUP_ENTROPY = _define("group_entropy", "batches", BATCH, "nats", "group entropy", "neither",
                        "entropy of the batch's group shares")
SAME_GROUP_PAIR_SHARE = _define("same_group_pair_share", "batches", BATCH, "share",
                                "same-group pairs", "neither",
                                "share of ordered pairs of rows from the same group")
BATCH_SIZE = _define("batch_size", "batches", BATCH, "count", "batch size", "neither",
                     "the number of rows with a group label")

# -- your own scalars ------------------------------------------------------------------------
LOGGED = _define("logged", "logged", "your name", "yours", "logged value", "neither",
                 "`probe.log(name=value)`, recorded at the last completed step; names starting "
                 "with `val` are read as validation losses")
