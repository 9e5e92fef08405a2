"""Energy head remedies: interaction term and learnable temperature (record-22, insights 5-6).

Finding ids addressed: ``sigmoid-saturation`` (LearnableTemperature), ``overfitting``
(interaction_energy: the linear energy forces per-cell-line compensation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LearnableTemperature", "interaction_energy"]


def _inverse_softplus(y: float) -> float:
    if y <= 0:
        raise ValueError("softplus values are positive")
    # log(exp(y) - 1), stable for large y
    return y + math.log(-math.expm1(-y))


class LearnableTemperature(nn.Module):
    """A positive temperature ``T = softplus(t) + min_value`` with a learnt raw parameter ``t``.

    What: ``t`` is initialised so that ``T == init`` at the start; ``forward()`` returns the
    0-dim tensor ``T`` (differentiable), ``float(module)`` its current value.

    Why: a fixed ``T = 1.0`` ignores the scale of the energy; when ``U_I - R_E`` is large the
    sigmoid saturates and gradients vanish, when it is tiny the predictions are uncalibrated
    (record-22, algorithmic cause 4; insight 6, next step 5). The softplus keeps ``T``
    positive without clamping, so the gradient never dies at a boundary.

    Reference: temperature scaling (Guo et al., "On Calibration of Modern Neural Networks",
    ICML 2017); learnt contrastive temperature as in CLIP (Radford et al., 2021).
    """

    def __init__(self, init: float = 1.0, min_value: float = 0.0) -> None:
        super().__init__()
        if init <= min_value:
            raise ValueError("init must exceed min_value")
        self.min_value = float(min_value)
        self.raw = nn.Parameter(torch.tensor(_inverse_softplus(float(init) - self.min_value)))

    def forward(self) -> torch.Tensor:
        return F.softplus(self.raw) + self.min_value

    def __float__(self) -> float:
        return float(self.forward().detach())

    def extra_repr(self) -> str:
        return f"T={float(self):.4g}, min_value={self.min_value}"


def interaction_energy(u: torch.Tensor, r: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Energy with an interaction term: ``U - R + lam * U * R`` (elementwise, broadcasting).

    Why: the linear energy ``U_I - R_E`` cannot express interactions between sequence and
    environment (cooperative activation, competitive inhibition): the cell line can only shift
    the logit, never change how much the sequence matters, so the model compensates with
    per-cell-line biases and overfits (record-22, biological cause 3; insight 5, next step 4).
    With the product term the environment rescales the sequence effect:
    ``U (1 + lam R) - R``. ``lam`` may be a learnable tensor; ``lam = 0`` recovers the
    linear energy.
    """
    return u - r + lam * u * r
