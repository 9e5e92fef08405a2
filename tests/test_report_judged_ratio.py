"""The swamping panel of the report draws the ratio the rule judged (the median of the loss's
per-layer ratios, its evidence ``ratio``), which differs from the ratio of the recorded norms
on the whole shared set; a finding without that series keeps the ratio of the norms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.diagnose import diagnose
from gradprobe.report.plots import report_figures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two regression tasks on a two-layer trunk, 'b' weighted 0.01: swamped by 'a', by a
    different share on each layer."""
    path = tmp_path_factory.mktemp("judged") / "swamped.gprobe"
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y_a = torch.sin(x @ torch.randn(8, generator=gen))
    y_b = torch.cos(x @ torch.randn(8, generator=gen))
    trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
    model = nn.ModuleDict(dict(trunk=trunk, a=nn.Linear(32, 1), b=nn.Linear(32, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = gradprobe.Probe(model, shared=trunk, every=2, run_file=path, roles={"b": "task"})
    for _ in range(100):
        h = trunk(x)
        probe.backward({"a": F.mse_loss(model["a"](h).squeeze(1), y_a),
                        "b": F.mse_loss(model["b"](h).squeeze(1), y_b)}, weights={"b": 0.01})
        opt.step()
        opt.zero_grad()
    probe.close()
    return gradprobe.load_run(path)


def _ratio_axes(run, findings):
    (page,) = [fig for name, fig in report_figures(run, findings) if name == "gradients"]
    (ax,) = [ax for ax in page.axes if ax.get_title("left").startswith("Each loss's weighted gradient "
                                                                 "norm relative to a")]
    return ax


def _recorded_ratio(run):
    steps, b = run.series("weighted_grad_norm", "b")
    steps_a, a = run.series("weighted_grad_norm", "a")
    assert np.array_equal(steps, steps_a)
    return steps, b / a


def test_the_swamping_panel_draws_the_ratio_the_rule_judged(run):
    findings = diagnose(run)
    (swamping,) = [f for f in findings if f.id == "gradient-swamping"]
    evidence = swamping.evidence
    assert (swamping.subject, evidence["dominant"]) == ("b", "a")
    assert len(evidence["layer_ratios"]) == 2  # judged on each of the trunk's two layers
    ax = _ratio_axes(run, findings)
    (line,) = [ln for ln in ax.get_lines()
               if ln.get_label() == "b: judged ratio (median over shared layers)"]
    judged = np.array([np.nan if v is None else v for v in evidence["ratio"]["values"]])
    np.testing.assert_array_equal(line.get_xdata(), evidence["ratio"]["steps"])
    np.testing.assert_array_equal(line.get_ydata(), judged)
    # ...and it is not the ratio of the recorded norms (what the panel drew before).
    steps, recorded = _recorded_ratio(run)
    at = np.searchsorted(steps, evidence["ratio"]["steps"])
    assert np.nanmax(np.abs(judged / recorded[at] - 1)) > 0.05
    # The finding's threshold is the dashed line on the same axes.
    levels = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"
              and len(set(ln.get_ydata())) == 1]
    assert evidence["threshold"] in levels
    assert "the ratio judged (median over shared layers)" in " ".join(
        ax.get_title(loc) for loc in ("left", "right"))


def test_without_the_judged_series_the_panel_keeps_the_ratio_of_the_norms(run):
    findings = [dataclasses.replace(f, evidence={k: v for k, v in f.evidence.items()
                                                  if k != "ratio"})
                if f.id == "gradient-swamping" else f for f in diagnose(run)]
    ax = _ratio_axes(run, findings)
    assert not [ln for ln in ax.get_lines() if "judged" in ln.get_label()]
    steps, recorded = _recorded_ratio(run)
    drawn = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(steps)]
    assert len(drawn) == 1
    np.testing.assert_array_equal(drawn[0].get_xdata(), steps)
    np.testing.assert_allclose(drawn[0].get_ydata(), recorded, rtol=1e-12)
