"""Adaptive loss weights from gradient norms (record-22, insight 1 / next step 1).

Finding ids addressed: ``gradient-swamping``, ``constraint-neglect``, ``static-loss-weights``.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["GradNormBalancer", "grad_norms"]


def grad_norms(losses: Mapping[str, torch.Tensor], params: Iterable[torch.Tensor],
               retain_graph: bool = True) -> dict[str, float]:
    """Gradient norm of each (unweighted) loss on ``params``, via ``torch.autograd.grad``.

    Losses that do not reach any of the parameters get norm ``0.0``. The graph is retained by
    default so that the caller can still run its own backward afterwards. ``.grad`` fields are
    not touched.
    """
    params = [p for p in params if p.requires_grad]
    out: dict[str, float] = {}
    for name, loss in losses.items():
        if not (torch.is_tensor(loss) and loss.requires_grad):
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        sq = sum(float(g.detach().pow(2).sum()) for g in grads if g is not None)
        out[name] = math.sqrt(sq)
    return out


class GradNormBalancer:
    """Loss weights that keep every auxiliary loss's gradient a fixed fraction of the task's.

    What: for each auxiliary loss ``k`` with unweighted gradient norm ``g_k`` on the shared
    parameters and task gradient norm ``g_task``, the target weight is
    ``w*_k = target_k * g_task / g_k`` -- the weight for which the weighted auxiliary gradient
    norm ``w_k * g_k`` equals ``target_k`` times the task's. Weights are smoothed with an
    exponential moving average (``w <- ema * w + (1 - ema) * w*``; the first update jumps
    straight to ``w*`` unless an ``init`` weight was given) and clamped to ``[min_w, max_w]``. The task weight stays 1.

    Why: with small fixed weights (alpha, beta ~ 0.05-0.1) the task gradient dominates the
    shared parameters and the geometric constraints are swamped (record-22, root cause 1,
    "gradient swamping of geometric constraints" as the root mechanism). Matching gradient
    norms keeps each constraint audible whatever the raw scale of its loss.

    Reference: this is a simple norm-matching rule in the spirit of GradNorm (Chen et al.,
    "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks", ICML 2018). It is *not* GradNorm: there is no learnt weight with its own loss
    and no training-rate term ``r_i^alpha``; weights are closed-form ratios of measured norms.

    Use either with norms you already have (``update(norms)``, e.g. from
    ``probe.last_grad_norms``) or let it measure them (``step(losses, shared_params)``, which
    calls ``torch.autograd.grad`` once per loss with ``retain_graph=True``).
    """

    def __init__(self, task: str = "task", targets: float | Mapping[str, float] = 1.0,
                 ema: float = 0.9, min_w: float = 1e-4, max_w: float = 1e4,
                 init: Mapping[str, float] | None = None, eps: float = 1e-12) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError("ema must be in [0, 1)")
        if not 0.0 < min_w <= max_w:
            raise ValueError("need 0 < min_w <= max_w")
        self.task = task
        self.targets = targets
        self.ema = float(ema)
        self.min_w = float(min_w)
        self.max_w = float(max_w)
        self.eps = float(eps)
        self._weights: dict[str, float] = {k: float(v) for k, v in (init or {}).items()}
        self.last_norms: dict[str, float] = {}
        self.updates = 0

    def target(self, name: str) -> float:
        """The target ratio ||w_k grad L_k|| / ||grad L_task|| for loss ``name``."""
        if isinstance(self.targets, Mapping):
            return float(self.targets.get(name, 1.0))
        return float(self.targets)

    @property
    def weights(self) -> dict[str, float]:
        """Current weights of the auxiliary losses, as plain floats (a copy)."""
        return dict(self._weights)

    def weight(self, name: str, default: float = 1.0) -> float:
        """Current weight of ``name`` (``1.0`` for the task, ``default`` if never seen)."""
        if name == self.task:
            return 1.0
        return self._weights.get(name, default)

    def update(self, norms: Mapping[str, float]) -> dict[str, float]:
        """Update the weights from unweighted gradient norms ``{name: ||grad L_name||}``.

        ``norms`` must contain the task. Losses whose norm is zero or non-finite keep their
        previous weight (nothing to match). Returns the new weights ``{name: weight}``.
        """
        if self.task not in norms:
            raise KeyError(f"norms has no entry for the task loss {self.task!r}")
        g_task = float(norms[self.task])
        self.last_norms = {k: float(v) for k, v in norms.items()}
        if not math.isfinite(g_task) or g_task <= self.eps:
            return self.weights
        for name, g in norms.items():
            if name == self.task:
                continue
            g = float(g)
            if not math.isfinite(g) or g <= self.eps:
                continue
            raw = self.target(name) * g_task / g
            if name in self._weights:  # EMA from the previous (or the ``init``) weight
                new = self.ema * self._weights[name] + (1.0 - self.ema) * raw
            else:
                new = raw
            self._weights[name] = min(self.max_w, max(self.min_w, new))
        self.updates += 1
        return self.weights

    def step(self, losses: Mapping[str, torch.Tensor], shared: Iterable[torch.Tensor] | Sequence[torch.Tensor]
             ) -> dict[str, float]:
        """Measure each loss's gradient norm on ``shared`` with autograd and update the weights."""
        return self.update(grad_norms(losses, list(shared), retain_graph=True))

    def state_dict(self) -> dict:
        return {"weights": dict(self._weights), "updates": self.updates,
                "last_norms": dict(self.last_norms)}

    def load_state_dict(self, state: Mapping) -> None:
        self._weights = {k: float(v) for k, v in state["weights"].items()}
        self.updates = int(state.get("updates", 0))
        self.last_norms = dict(state.get("last_norms", {}))

    def __repr__(self) -> str:
        ws = ", ".join(f"{k}={v:.3g}" for k, v in self._weights.items())
        return f"GradNormBalancer(task={self.task!r}, weights={{{ws}}})"
