"""Sigmoid saturation of an energy head ``p = sigmoid((U - R) / T)``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import as_array, check_positive_float, check_positive_int
from .saturation_grid import SATURATION_THRESHOLD, histogram_edges

__all__ = [
    "saturated_fraction",
    "saturated_wrong_fraction",
    "saturated_wrong_class_fraction",
    "saturated_wrong_shares",
    "mean_sigmoid_grad",
    "energy_scale_ratio",
    "saturation_histogram",
    "saturation_histogram_edges",
    "saturation_summary",
]


@torch.no_grad()
def saturated_fraction(x: Tensor, threshold: float = SATURATION_THRESHOLD) -> float:
    """Share of sigmoid inputs (logits, any shape) with ``|x| > threshold``.

    With the default 4.6 these are the logits where ``sigmoid'(x) < 0.01`` (1/25 of
    its maximum 0.25) - their gradient has all but vanished. Null (standard-normal
    logits): ``2 (1 - Phi(4.6))`` ~ 4e-6.
    """
    threshold = check_positive_float(threshold, "threshold")
    return float(_saturated_fraction(as_array(x, "x"), threshold))


def _saturated_fraction(v: Tensor, threshold: float) -> Tensor:
    return (v.abs() > threshold).to(torch.float64).mean()


@torch.no_grad()
def saturated_wrong_fraction(x: Tensor, target: Tensor,
                             threshold: float = SATURATION_THRESHOLD) -> float:
    """Share of sigmoid inputs that are saturated *and* on the wrong side of their target:
    ``mean(|x| > threshold and |sigmoid(x) - y| > 0.5)`` over all entries.

    ``target`` holds the value each output ``sigmoid(x)`` is trained towards (0/1 labels or
    probabilities in [0, 1], any shape with as many entries as ``x``). A saturated input on
    the right side of its target is where the sigmoid is meant to end up; on the wrong side
    its gradient ``sigmoid'(x) < 0.01`` (at the default threshold) is all a loss that reads
    the probability (MSE, L1) has to correct it with, so it stays wrong (LeCun et al.,
    "Efficient BackProp", 1998, on saturation and target values; cross-entropy keeps a
    gradient ``sigmoid(x) - y`` there instead). Null (standard-normal logits): ~4e-6 at most.
    """
    return saturated_wrong_shares(x, target, threshold)["saturated_wrong_fraction"]


@torch.no_grad()
def saturated_wrong_class_fraction(x: Tensor, target: Tensor,
                                   threshold: float = SATURATION_THRESHOLD) -> float:
    """The share saturated on the wrong side (as :func:`saturated_wrong_fraction`) within the
    target class where it is largest: ``max_c mean(|x| > threshold and |sigmoid(x) - y| > 0.5
    | class c)``, the classes being the entries trained towards 1 (``y >= 0.5``) and towards 0.

    The share over all entries is bounded by the rarer class's frequency: a pairwise sigmoid
    loss over a batch of n (SigLIP) holds n positives among n^2 logits, so with every positive
    saturated on the wrong side that share is 1/n, under 1% from n = 100. Taken per class, as a
    per-class error rate is (Brodersen et al., "The balanced accuracy and its posterior
    distribution", ICPR 2010), a rare class that is all wrong reads 1. A class absent from the
    batch is not counted; 0.0 when neither class is wrong. Null (standard-normal logits):
    ~4e-6 at most, as the pooled share.
    """
    return saturated_wrong_shares(x, target, threshold)["saturated_wrong_class_fraction"]


@torch.no_grad()
def saturated_wrong_shares(x: Tensor, target: Tensor,
                           threshold: float = SATURATION_THRESHOLD) -> dict[str, float]:
    """:func:`saturated_wrong_fraction` and :func:`saturated_wrong_class_fraction` from one
    pass over the entries, keyed by those names (the probe records both under them)."""
    threshold = check_positive_float(threshold, "threshold")
    v = as_array(x, "x").reshape(-1)
    y = as_array(target, "target").to(v.device).reshape(-1)
    if y.numel() != v.numel():
        raise ValueError(f"target must have as many entries as x ({v.numel()}), got {y.numel()}")
    wrong = (v.abs() > threshold) & ((torch.sigmoid(v) - y).abs() > 0.5)
    towards_one = y >= 0.5
    by_class = [wrong[members].double().mean() for members in (towards_one, ~towards_one)
                if bool(members.any())]
    return {"saturated_wrong_fraction": float(wrong.double().mean()),
            "saturated_wrong_class_fraction": float(max(by_class)) if by_class else 0.0}


@torch.no_grad()
def mean_sigmoid_grad(x: Tensor) -> float:
    """``mean sigmoid(x) (1 - sigmoid(x))`` over all entries: 0.25 at x = 0 (healthy,
    maximal gradient), -> 0 when saturated. Null (standard-normal x): ~0.2067."""
    return float(_mean_sigmoid_grad(as_array(x, "x")))


def _mean_sigmoid_grad(v: Tensor) -> Tensor:
    s = torch.sigmoid(v)
    return (s * (1.0 - s)).mean()


@torch.no_grad()
def energy_scale_ratio(u: Tensor, r: Tensor, symmetric: bool = True) -> float:
    """Scale mismatch of the two energy terms ``U`` and ``R`` (any shape each).

    ``symmetric=True`` (default): ``max(std u, std r) / min(std u, std r) >= 1``
    (1 = matched scales). ``symmetric=False``: ``std(u) / std(r)``. Population std
    (ddof = 0), so single values are allowed (std 0). Both stds 0 -> 1.0; exactly
    one 0 -> ``math.inf`` (infinite mismatch; for ``symmetric=False`` with std(u) = 0
    and std(r) > 0 the plain ratio is 0.0).
    """
    return float(_energy_scale_ratio(as_array(u, "u"), as_array(r, "r"), symmetric))


def _energy_scale_ratio(u: Tensor, r: Tensor, symmetric: bool) -> Tensor:
    su, sr = u.std(unbiased=False), r.std(unbiased=False).to(u.device)
    # IEEE division gives the documented edge values: x / 0 = inf for x > 0, 0 / x = 0.
    ratio = torch.maximum(su, sr) / torch.minimum(su, sr) if symmetric else su / sr
    return torch.where((su == 0) & (sr == 0), torch.ones_like(ratio), ratio)


def saturation_histogram_edges(bins: int = 41, limit: float = 20.0) -> Tensor:
    """The fixed ``bins + 1`` equal-width edges on [-limit, limit] (float64) used by
    :func:`saturation_histogram`."""
    bins = check_positive_int(bins, "bins")
    limit = check_positive_float(limit, "limit")
    return torch.from_numpy(histogram_edges(bins, limit))


@torch.no_grad()
def saturation_histogram(x: Tensor, bins: int = 41, limit: float = 20.0) -> Tensor:
    """Counts (int64 CPU Tensor[bins]) of ``clamp(x, -limit, limit)`` over the fixed
    equal-width bins of :func:`saturation_histogram_edges` (bin i = [e_i, e_{i+1}),
    the last bin closed), so histograms of different steps are comparable; values
    beyond +-limit land in the outer bins. Counts sum to ``x.numel()``.
    """
    bins = check_positive_int(bins, "bins")
    limit = check_positive_float(limit, "limit")
    return _histogram(as_array(x, "x"), bins, limit).cpu()


def _histogram(v: Tensor, bins: int, limit: float) -> Tensor:
    # A scatter-add, not bincount: bincount's output size depends on the data, so on a GPU it
    # reads the largest index on the host first.
    idx = torch.floor((v.clamp(-limit, limit) + limit) * (bins / (2.0 * limit)))
    idx = idx.to(torch.int64).clamp(0, bins - 1)
    return torch.zeros(bins, dtype=torch.int64, device=v.device).index_add_(
        0, idx, torch.ones_like(idx))


@torch.no_grad()
def saturation_summary(x: Tensor, threshold: float = SATURATION_THRESHOLD, bins: int = 41,
                       limit: float = 20.0, terms: tuple[Tensor, Tensor] | None = None
                       ) -> dict[str, Tensor]:
    """What the probe records of sigmoid inputs ``x`` (any shape), as tensors on ``x``'s
    device, computed without reading a value on the host: ``saturated_fraction``,
    ``mean_sigmoid_grad``, ``histogram`` (int64 [bins]) as the functions of those names,
    ``finite`` (bool: every entry of ``x`` is finite; the others are meaningless where it is
    False) and, with ``terms=(u, r)``, ``energy_scale_ratio`` (symmetric).
    ``ValueError`` for an empty ``x`` or invalid parameters (never for values).
    """
    threshold = check_positive_float(threshold, "threshold")
    bins = check_positive_int(bins, "bins")
    limit = check_positive_float(limit, "limit")
    if not isinstance(x, Tensor) or x.numel() == 0:
        raise ValueError("x must be a non-empty tensor")
    v = x.detach().reshape(-1).to(torch.float64)
    summary = {
        "saturated_fraction": _saturated_fraction(v, threshold),
        "mean_sigmoid_grad": _mean_sigmoid_grad(v),
        "histogram": _histogram(v, bins, limit),
        "finite": torch.isfinite(v).all(),
    }
    if terms is not None:
        u, r = (t.detach().reshape(-1).to(v.device, torch.float64) for t in terms)
        summary["energy_scale_ratio"] = _energy_scale_ratio(u, r, symmetric=True)
    return summary
