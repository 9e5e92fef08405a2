"""A run that goes NaN or Inf after its last probe step (docs/findings.md, ``non-finite``): the
probe checks the model's parameters once when it closes and records a ``non_finite_at_close`` event
for ``parameters``; the diagnosis reports it, unless a loss or gradient went non-finite first
on a probe step. Real training runs; the parameters' finiteness is read independently."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.diagnose import diagnose

STEPS, EVERY = 25, 10  # probe steps 0, 10, 20: the last four steps are not probed


def _run(tmp_path, *, blow_up_at: int | None, nan_loss_at: int | None = None):
    """A regression with a small second term; from ``blow_up_at`` on the learning rate is 1e30,
    so that the next update overflows; at ``nan_loss_at`` (a probe step) the loss is NaN."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(64, 4)
    y = x[:, :1]
    path = tmp_path / f"run-{blow_up_at}-{nan_loss_at}.gprobe"
    told = contextlib.nullcontext() if blow_up_at is None and nan_loss_at is None else \
        pytest.warns(gradprobe.GradprobeWarning)  # the event is also told (checked below)
    with told, gradprobe.Probe(net, run_file=path, every=EVERY) as probe:
        for step in range(STEPS):
            if step == blow_up_at:
                opt.param_groups[0]["lr"] = 1e30
            out = net(x)
            fit = (out - y).pow(2).mean() * (float("nan") if step == nan_loss_at else 1.0)
            probe.backward({"fit": fit, "small": out.pow(2).mean()}, weights={"small": 0.1})
            opt.step()
            opt.zero_grad()
    return gradprobe.load_run(path), net


def test_parameters_that_went_non_finite_after_the_last_probe_step_are_reported(tmp_path):
    run, net = _run(tmp_path, blow_up_at=22)
    bad = [name for name, p in net.named_parameters() if not torch.isfinite(p).all()]
    assert bad  # the overflow reached the parameters, read from the model itself
    events = run.events("non_finite_at_close")
    assert len(events) == 1 and events[0]["step"] == STEPS - 1
    assert events[0]["name"] == "parameters" and run.events("non_finite") == []
    assert all(repr(name) in events[0]["message"] for name in bad[:3])
    findings = [f for f in diagnose(run) if f.id == "non-finite"]
    assert [(f.subject, f.severity) for f in findings] == [("parameters", "error")]
    assert "after the last probe step" in findings[0].title
    assert findings[0].evidence["first_step"] == STEPS - 1


def test_a_finite_run_records_no_parameter_event(tmp_path):
    run, net = _run(tmp_path, blow_up_at=None)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert run.events("non_finite") == [] and run.events("non_finite_at_close") == []
    assert not any(f.id == "non-finite" for f in diagnose(run))


def test_a_loss_that_went_non_finite_first_is_the_finding(tmp_path):
    run, net = _run(tmp_path, blow_up_at=None, nan_loss_at=EVERY)
    assert not all(torch.isfinite(p).all() for p in net.parameters())
    assert len(run.events("non_finite_at_close")) == 1
    findings = {f.subject: f for f in diagnose(run) if f.id == "non-finite"}
    assert "parameters" not in findings  # the loss that went first tells it
    assert findings["fit"].evidence["first_step"] == EVERY
