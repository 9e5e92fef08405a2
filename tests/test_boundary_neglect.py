"""A loss that runs the shared network on inputs of its own (read from its graph) is an
objective to meet, as a geometric constraint is: swamped, and pushed off its lowest start
level while the task falls to a tenth, it is ``constraint-neglect`` whatever its name
(docs/findings.md). A real physics-informed run: u'' = -pi^2 sin(pi x) on [0, 1] with
u(0) = u(1) = 0, whose residual alone leaves u + a x + b free; the boundary error is measured
on the trained network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.diagnose._series import role_record

TH = Thresholds()


def _pinn(tmp_path, weight: float, sliced: bool):
    """``sliced``: the boundary values read from the residual's own forward pass (the two end
    points of its grid) instead of a forward pass of the boundary's own."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x = torch.linspace(0, 1, 64).unsqueeze(1)
    ends = torch.tensor([[0.0], [1.0]])
    source = -(math.pi ** 2) * torch.sin(math.pi * x)
    path = tmp_path / f"pinn-{weight}-{sliced}.gprobe"
    with gradprobe.Probe(net, run_file=path) as probe:
        for _ in range(600):
            opt.zero_grad()
            xr = x.clone().requires_grad_(True)
            u = net(xr)
            du = torch.autograd.grad(u.sum(), xr, create_graph=True)[0]
            d2u = torch.autograd.grad(du.sum(), xr, create_graph=True)[0]
            at_ends = u[[0, -1]] if sliced else net(ends)
            probe.backward({"residual": ((d2u - source) ** 2).mean(),
                            "boundary": (at_ends ** 2).mean()}, weights={"boundary": weight})
            opt.step()
    with torch.no_grad():
        boundary_error = float(net(ends).abs().max())
    return gradprobe.load_run(path), boundary_error


def _neglect(run):
    return next((f for f in diagnose(run, TH) if f.id == "constraint-neglect"), None)


def test_a_swamped_boundary_of_its_own_inputs_is_neglected(tmp_path):
    run, error = _pinn(tmp_path, 1e-6, sliced=False)
    _, error_weighted = _pinn(tmp_path, 1.0, sliced=False)
    assert error > 50 * error_weighted  # the boundary is not met at 1e-6
    assert role_record(run, "boundary")["role"] == "other"  # no hint in the name
    assert role_record(run, "boundary")["own_pass"] is True
    finding = _neglect(run)
    assert finding is not None and finding.subject == "boundary" and finding.severity == "error"
    evidence = finding.evidence
    assert evidence["own_inputs"] is True
    steps, values = run.series("loss", "boundary")
    in_end_window = steps >= steps[-1] - TH.window_share * (steps[-1] - steps[0])
    assert in_end_window.sum() >= TH.min_points
    end = np.median(values[in_end_window])
    assert evidence["constraint_end"] == pytest.approx(end)
    assert evidence["constraint_ratio"] == pytest.approx(end / evidence["constraint_start_low"])
    assert evidence["constraint_ratio"] >= 1 / TH.neglect_constraint_fraction
    assert "inputs of its own" in finding.title
    assert "Raise the weight of 'boundary'" in finding.remedy


def test_a_met_boundary_and_one_read_from_the_task_s_own_pass_are_not_judged_so(tmp_path):
    run, _ = _pinn(tmp_path, 1.0, sliced=False)
    assert _neglect(run) is None
    run, _ = _pinn(tmp_path, 1e-6, sliced=True)
    # The same neglect, read off the residual's forward pass: the graph does not show an
    # objective of its own, and a term with no constraint role is not judged by this rule.
    assert role_record(run, "boundary")["own_pass"] is False
    assert _neglect(run) is None
    assert any(f.id == "gradient-swamping" and f.subject == "boundary"
               for f in diagnose(run, TH))
