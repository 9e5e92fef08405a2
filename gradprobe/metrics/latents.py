"""The probe's path for latents: what it records of one latent and of a pair, as tensors on
the latent's device, computed without reading a value on the host. Each formula is the one of
the float metric of the same name (:mod:`.representation`, :mod:`.dependence`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (centre, check_positive_int, clean_eigenvalues, entropy_rank_of,
                      psd_eigenvalues)
from .dependence import linear_cka_of, max_abs_correlation_of
from .representation import (
    active_units_of,
    latent_norm_of,
    normalized_std_of,
    participation_ratio_of,
    rankme_of,
    spectrum_of,
    total_variance_of,
)

__all__ = [
    "latent_summary",
    "latent_spectrum",
    "latent_statistics",
    "latent_pair_summary",
]


def _rows(z: Tensor, name: str = "z") -> Tensor:
    """A float64 [n, d] view of a latent; only its shape is checked (nothing read on the host)."""
    if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{name} must be a non-empty 2-D tensor of shape (n, d), got {shape}")
    if z.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {z.dtype}")
    return z.detach().to(torch.float64)


@torch.no_grad()
def latent_summary(z: Tensor) -> dict[str, Tensor]:
    r"""Everything the probe records of a latent ``z`` (n x d) except its eigenvalues, as
    tensors on ``z``'s device, computed without reading a value on the host.

    * ``grams`` (float64 [2, m, m], m = min(n, d)): the smaller Gram matrix of ``z``
      (``z^T z`` if n >= d, else ``z z^T``) and of its column-centred copy, from one batched
      matmul; :func:`latent_spectrum` turns them into the spectral metrics;
    * ``finite`` (bool): ``z`` and its Gram matrix are finite (a non-finite entry always
      makes a diagonal entry of the Gram non-finite); the other entries are meaningless
      where it is False;
    * ``participation_ratio``, ``normalized_std``, ``latent_norm``: as the functions of the
      same names (participation ratio from the centred Gram: tr G^2 and ||G||_F^2);
    * ``total_variance``: as :func:`total_variance` (the trace of the centred Gram over n - 1);
    * ``active_units``: the number of columns whose unbiased variance over the rows exceeds
      0.01 (Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016: a
      VAE's latent unit u is active if Cov_x(E_q[u | x]) > 10^-2; pass the posterior means).

    Float64, like every metric. ``ValueError`` only for a shape that is not (n, d).
    """
    x = _rows(z)
    pair = torch.stack([x, centre(x)])
    grams = pair.mT @ pair if x.shape[0] >= x.shape[1] else pair @ pair.mT
    return {
        "grams": grams,
        "finite": torch.isfinite(torch.diagonal(grams[0])).all(),
        "participation_ratio": participation_ratio_of(grams[1]),
        "normalized_std": normalized_std_of(x),
        "latent_norm": latent_norm_of(x),
        "total_variance": total_variance_of(grams[1], x.shape[0]),
        "active_units": active_units_of(x),
    }


@torch.no_grad()
def latent_spectrum(grams: Tensor, k: int = 32) -> dict[str, Tensor]:
    r"""The spectral metrics of a latent from the ``grams`` of :func:`latent_summary`: one
    eigen-decomposition (``eigvalsh`` of the stacked pair, cleaned as in every metric) serves

    * ``effective_rank`` (RankMe of the uncentred Gram's eigenvalues, :func:`effective_rank`),
    * ``effective_rank_centred`` (:func:`effective_rank_centred`),
    * ``rankme_centred`` (RankMe of the centred Gram's eigenvalues, :func:`effective_rank` with
      ``centred=True``),
    * ``singular_spectrum`` (float64 [k], :func:`singular_spectrum` with ``centred=False``).

    Tensors on the device of ``grams``; NaN when the Gram matrices are not finite. Meant to
    run on the host, off the training thread: on a CUDA device ``eigvalsh`` waits for the
    device (PyTorch reads LAPACK's error code on the host), see docs/performance.md.
    """
    k = check_positive_int(k, "k")
    finite = torch.isfinite(grams).all()
    ev = clean_eigenvalues(psd_eigenvalues(torch.where(finite, grams, torch.zeros_like(grams))))
    nan = torch.full_like(ev[0, 0], float("nan"))
    return {
        "effective_rank": torch.where(finite, rankme_of(ev[0]), nan),
        "effective_rank_centred": torch.where(finite, entropy_rank_of(ev[1]), nan),
        "rankme_centred": torch.where(finite, rankme_of(ev[1]), nan),
        "singular_spectrum": torch.where(finite, spectrum_of(ev[0], k), nan),
    }


def latent_statistics(z: Tensor, k: int = 32) -> dict[str, Tensor]:
    """:func:`latent_summary` and :func:`latent_spectrum` of ``z`` in one dict, where ``z`` is
    (the eigen-decomposition included)."""
    summary = latent_summary(z)
    return {**summary, **latent_spectrum(summary["grams"], k)}


@torch.no_grad()
def latent_pair_summary(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    r"""Dependence between two latents of the same n rows, as 0-dim float64 tensors on the
    device of ``x``, computed without reading a value on the host: ``cka`` (debiased
    :func:`linear_cka`) and ``max_abs_correlation`` (:func:`max_abs_correlation`).

    ``ValueError`` for mismatched rows or n < 4 (shapes only).
    """
    a, b = _rows(x, "x"), _rows(y, "y").to(x.device)
    if a.shape[0] != b.shape[0] or a.shape[0] < 4:
        raise ValueError(f"x and y need the same number of rows, at least 4; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return {"cka": linear_cka_of(centre(a), centre(b), debiased=True),
            "max_abs_correlation": max_abs_correlation_of(a, b)}
