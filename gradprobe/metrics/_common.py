"""Shared input validation and spectral helpers for :mod:`gradprobe.metrics`.

Policy applied by every metric (see docs/metrics.md):

* inputs are detached, moved off MPS if needed, and upcast to float64
  (float16/bfloat16/int/bool included) before any arithmetic;
* a non-finite entry raises ``ValueError("<name> contains NaN/Inf ...")``;
* a wrong number of dimensions, an empty input or mismatched shapes raise
  ``ValueError`` naming the expected shape;
* no exception escapes from inside torch: linear-algebra failures are caught and
  retried with a fallback, and only then reported as ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__: list[str] = []  # private module

_EPS64 = float(np.finfo(np.float64).eps)
RANKME_EPS = 1e-7  # the epsilon of Garrido et al. (2023), also used by reptrix


def to_tensor(x: Any, name: str) -> Tensor:
    """Return ``x`` as a detached tensor (not yet upcast); reject complex input."""
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} cannot be converted to a tensor: {exc}") from None
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    if t.device.type == "mps":  # MPS has no float64
        t = t.cpu()
    return t


def check_finite(t: Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{name} contains NaN/Inf; gradprobe metrics require finite input "
            "(non-finite events are recorded separately by the probe)"
        )


def as_matrix(x: Any, name: str, shape: str = "(n, d)", check: bool = True) -> Tensor:
    """Validate a 2-D non-empty finite matrix and return it as float64.

    ``check=False`` skips the finiteness scan; the caller must then pass the result
    through :func:`gram_eigenvalues` (via ``source=``), which detects non-finite
    input from the Gram matrix at no extra cost.
    """
    t = to_tensor(x, name)
    if t.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape {shape}, got {t.ndim}-D shape {tuple(t.shape)}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty tensor of shape {shape}, got {tuple(t.shape)}")
    if check:
        check_finite(t, name)
    return t.to(torch.float64)


def as_array(x: Any, name: str) -> Tensor:
    """Validate a non-empty finite tensor of any shape and return it flattened, float64."""
    t = to_tensor(x, name)
    if t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor, got shape {tuple(t.shape)}")
    check_finite(t, name)
    return t.reshape(-1).to(torch.float64)


def as_labels(x: Any, name: str, n: int | None = None) -> Tensor:
    """Validate a 1-D tensor of integer group ids (integral floats are accepted)."""
    t = to_tensor(x, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of integer ids of shape (n,), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the features, got {tuple(t.shape)}")
    if t.is_floating_point():
        check_finite(t, name)
        if not bool((t == torch.round(t)).all()):
            raise ValueError(f"{name} must hold integer ids, got non-integral values")
    return t.to(torch.int64).cpu()


def check_positive_int(v: Any, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def check_positive_float(v: Any, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return f


# From this many entries up, numpy's BLAS ``syrk`` (it recognises ``a.T @ a``: half the
# flops of a general matmul) wins; below it, torch does, because inside a training process
# numpy's BLAS thread pool competes with torch's for the same cores (measured on 2 cores:
# 2.8 ms instead of 0.3 ms for a 256 x 128 latent right after an MLP step).
_NUMPY_GRAM_ENTRIES = 1 << 20


def _large_on_cpu(x: Tensor | None) -> bool:
    return x is not None and x.device.type == "cpu" and x.numel() >= _NUMPY_GRAM_ENTRIES


def small_gram(x: Tensor) -> Tensor:
    """The smaller of ``x x^T`` (n x n) and ``x^T x`` (d x d) of a float64 matrix.

    Overflow gives Inf, reported by the caller.
    """
    n, d = x.shape
    if _large_on_cpu(x):
        a = x.numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            g = a.T @ a if n >= d else a @ a.T
        return torch.from_numpy(np.ascontiguousarray(g))
    return x.T @ x if n >= d else x @ x.T


def clean_eigenvalues(ev: Tensor) -> Tensor:
    """Eigenvalues of PSD Gram matrices (last dimension), descending, negatives -> 0.

    Round-off eigenvalues below ``lambda_max * size * 4 eps64`` are set to 0 so that a
    collapsed (rank-deficient) matrix gives exact zeros instead of noise. Branch-free: works
    on a batch and on any device without reading a value on the host.
    """
    ev = torch.flip(torch.sort(ev, dim=-1).values, dims=[-1]).clamp_min(0.0)
    floor = ev[..., :1] * (ev.shape[-1] * 4 * _EPS64)
    return torch.where(ev <= floor, torch.zeros_like(ev), ev)


def psd_eigenvalues(g: Tensor) -> Tensor:
    """Eigenvalues (unsorted) of symmetric PSD matrices ``[..., m, m]``: ``eigvalsh`` of the
    symmetrised matrices, ``svdvals`` (equal for PSD matrices) if it fails to converge.

    Raises what the fallback raises. On a CUDA device either waits for the device (LAPACK's
    error code is read on the host).
    """
    try:
        return torch.linalg.eigvalsh(0.5 * (g + g.mT))
    except Exception:  # LinAlgError
        return torch.linalg.svdvals(g)


def gram_eigenvalues(g: Tensor, name: str = "input", source: Tensor | None = None) -> Tensor:
    """Eigenvalues of a symmetric PSD float64 Gram matrix, as :func:`clean_eigenvalues`;
    ``ValueError`` for a non-finite Gram matrix or a failed decomposition."""
    if not bool(torch.isfinite(torch.diagonal(g)).all()) or not bool(torch.isfinite(g).all()):
        # A non-finite input entry always makes its row/column's diagonal entry non-finite.
        if source is not None:
            check_finite(source, name)
        raise ValueError(f"{name} overflows float64 (its Gram matrix contains Inf)")
    try:
        if _large_on_cpu(source):  # the same library as small_gram: one BLAS thread pool
            try:
                ev = torch.from_numpy(np.linalg.eigvalsh(g.numpy()).copy())  # lower triangle
            except np.linalg.LinAlgError:
                ev = torch.linalg.svdvals(g)
        else:
            ev = psd_eigenvalues(g)
    except Exception as exc:  # the fallback failed too
        raise ValueError(f"eigen-decomposition of the Gram matrix of {name} failed: {exc}") from None
    return clean_eigenvalues(ev)


def squared_singular_values(x: Tensor, name: str = "input", method: str = "gram") -> Tensor:
    """Squared singular values (length min(n, d), descending) of a float64 matrix.

    ``method="gram"`` (default): eigenvalues of the smaller Gram matrix.
    ``method="svd"``: ``torch.linalg.svdvals``; if it fails to converge (it can when
    rows collapse onto each other) it falls back to the Gram eigenvalues.
    """
    if method == "svd":
        try:
            check_finite(x, name)
            s = torch.linalg.svdvals(x)
            return torch.sort(s * s, descending=True).values
        except Exception:
            pass
    elif method != "gram":
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    return gram_eigenvalues(small_gram(x), name, source=x)


def entropy_rank_of(values: Tensor, eps: float = RANKME_EPS) -> Tensor:
    """``exp(-sum p_k log p_k)`` with ``p_k = v_k / sum(v) + eps`` along the last dimension;
    0 where ``sum(v) == 0``. A tensor on the input's device (no host read)."""
    total = values.sum(dim=-1, keepdim=True)
    positive = total > 0
    p = values / torch.where(positive, total, torch.ones_like(total)) + eps
    rank = torch.exp(-(p * torch.log(p)).sum(dim=-1))
    return torch.where(positive.squeeze(-1), rank, torch.zeros_like(rank))


def entropy_rank(values: Tensor, eps: float = RANKME_EPS) -> float:
    """:func:`entropy_rank_of` as a Python float."""
    return float(entropy_rank_of(values, eps))


def centre(x: Tensor) -> Tensor:
    """``x`` minus its column means (each column centred over the rows)."""
    return x - x.mean(dim=0, keepdim=True)


def l2_normalize_rows(x: Tensor) -> Tensor:
    """Rows divided by their l2 norm; all-zero rows stay zero (as ``F.normalize``)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))
