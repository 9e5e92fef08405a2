"""``inert-loss`` on a gradient that is rounding residue (docs/findings.md): a distillation
whose teacher is the live model itself (Learning without Forgetting with the old network
aliased to the new one) has a gradient of ``p - p``, zero up to float rounding, not exactly
zero. Real training runs; the gradient shares the rule reads are recomputed with autograd."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds, diagnose

STEPS = 60


def _data():
    x = torch.randn(256, 8)
    return x, (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + 2 * (x[:, 3] > 0).long()


def _distill(student_logits, teacher_logits):
    return F.kl_div(F.log_softmax(student_logits / 2, 1), F.softmax(teacher_logits / 2, 1),
                    reduction="batchmean") * 4


def _teacher_logits(model, teacher, x, logits):
    if teacher == "aliased":
        # The live model's own output, detached, as a second forward through another kernel
        # path returns it: equal up to the last bits of float32.
        return logits.detach() * (1 + 2 ** -22 * torch.randn_like(logits))
    with torch.no_grad():
        return teacher(x)


def _run(tmp_path, teacher: str, weight: float = 1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    frozen = copy.deepcopy(model) if teacher == "frozen" else teacher
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / f"{teacher}-{weight}.gprobe"
    with gradprobe.Probe(model, run_file=path, every=2) as probe:
        for _ in range(STEPS):
            opt.zero_grad()
            logits = model(x)
            losses = {"fit": F.cross_entropy(logits, y),
                      "distillation": _distill(logits, _teacher_logits(model, frozen, x, logits))}
            probe.backward(losses, weights={"fit": 1.0, "distillation": weight})
            opt.step()
    return gradprobe.load_run(path), model, frozen


def _gradient_norms(model, frozen, *, weight: float = 1.0) -> tuple[float, float]:
    x, y = _data()
    logits = model(x)
    params = list(model.parameters())
    fit = torch.autograd.grad(F.cross_entropy(logits, y), params, retain_graph=True)
    distill = torch.autograd.grad(
        weight * _distill(logits, _teacher_logits(model, frozen, x, logits)), params)
    norm = lambda grads: float(torch.cat([g.flatten() for g in grads]).norm())  # noqa: E731
    return norm(fit), norm(distill)


def test_a_teacher_aliased_to_the_live_model_is_inert(tmp_path):
    run, model, frozen = _run(tmp_path, "aliased")
    fit_norm, distill_norm = _gradient_norms(model, frozen)
    assert 0 < distill_norm < Thresholds().inert_rounding_fraction * fit_norm
    findings = diagnose(run)
    finding = next(f for f in findings if f.id == "inert-loss")
    assert (finding.subject, finding.severity) == ("distillation", "warning")
    assert "copy.deepcopy(model)" in finding.remedy
    # Inert, so not also judged for its share of the gradient.
    assert not [f for f in findings if f.id == "gradient-swamping" and f.subject == "distillation"]
    assert run.series("grad_norm", "distillation")[1].max() > 0  # not the exact-zero case
    # On the whole shared set: each loss's squared norms summed over the recorded layers.
    energy = sum(np.array([np.diag(np.asarray(b)) for b in run.arrays("grad_gram_layer", layer)[1]])
                 for layer in run.array_names("grad_gram_layer"))
    fit, distill = np.sqrt(energy[:, 0]), np.sqrt(energy[:, 1])
    assert finding.evidence["max_share_of_largest"] == pytest.approx((distill / fit).max())
    assert finding.evidence["max_share_of_largest"] <= Thresholds().inert_rounding_fraction


@pytest.mark.parametrize("weight", [1.0, 1e-6])
def test_a_real_teacher_is_not_inert_however_small_its_weight(tmp_path, weight):
    run, model, frozen = _run(tmp_path, "frozen", weight)
    fit_norm, distill_norm = _gradient_norms(model, frozen, weight=weight)
    # At 1e-6 the weighted gradient is far below the residue threshold, its own is not.
    assert (distill_norm / fit_norm < Thresholds().inert_rounding_fraction) == (weight < 1)
    assert not [f for f in diagnose(run) if f.id == "inert-loss"]
