"""Rule change 36 (docs/findings.md): a swamped term on another loss's forward pass through a
head of its own is judged by its own descent; two prototypes that merged in a table whose
pooled usage holds are a redundancy (``info``). Real training runs; the numbers the rules
read are checked against numpy and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from torch import nn

import gradprobe
from gradprobe.diagnose import Thresholds, diagnose

STEPS = 240


def _auxiliary_run(tmp_path, *, learnable: bool, roles=None):
    """A regression on a trunk's features and, at weight 1e-4, a decoder of its own reading
    the same features (CapsNet's wiring): the inputs under fresh noise (a floor of 0.49), which the decoder can
    learn (``learnable``), or a fresh noise target each step, which nothing can."""
    torch.manual_seed(0)
    trunk, head, decoder = nn.Sequential(nn.Linear(6, 32), nn.Tanh()), nn.Linear(32, 1), \
        nn.Linear(32, 6)
    model = nn.ModuleList([trunk, head, decoder])
    x = torch.randn(256, 6)
    y = x[:, :1] * 2 + x[:, 1:2].sin()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    path = tmp_path / f"aux-{learnable}-{bool(roles)}.gprobe"
    probe = gradprobe.Probe(model, run_file=path, every=2, roles=roles)
    for _ in range(STEPS):
        opt.zero_grad()
        features = trunk(x)
        target = x + 0.7 * torch.randn_like(x) if learnable else torch.randn_like(x)
        losses = {"fit": (head(features) - y).pow(2).mean(),
                  "decode": (decoder(features) - target).pow(2).mean()}
        probe.backward(losses, weights={"fit": 1.0, "decode": 1e-4})
        opt.step()
    probe.close()
    return gradprobe.load_run(path), model


def _finding(findings, rule, subject):
    return next(f for f in findings if f.id == rule and f.subject == subject)


def test_a_swamped_head_on_the_task_s_pass_that_descends_is_info(tmp_path):
    run, model = _auxiliary_run(tmp_path, learnable=True)
    record = next(r for r in run.meta["role_records"] if r["name"] == "decode")
    # The decoder's weight and bias are the loss's own: autograd reaches them from it alone.
    assert record["own_pass"] is False and record["counts"]["own"] == 2
    finding = _finding(diagnose(run), "gradient-swamping", "decode")
    assert finding.evidence["median_ratio"] < 0.01
    steps, values = run.series("loss", "decode")
    # Its descent, read independently: the last tenth of the run against where it began.
    began = values[:Thresholds().min_points].max()
    descent = np.median(values[-(len(values) // 10):]) / began
    assert descent < 0.6
    assert finding.evidence["own_head_end_fraction"] == pytest.approx(descent, rel=0.1)
    assert finding.severity == "info"
    assert 'roles={"decode": "task"}' in finding.remedy


@pytest.mark.parametrize("learnable,roles", [(False, None), (True, {"decode": "task"})])
def test_a_head_that_cannot_descend_or_is_declared_stays_an_alarm(tmp_path, learnable, roles):
    run, _ = _auxiliary_run(tmp_path, learnable=learnable, roles=roles)
    finding = _finding(diagnose(run), "gradient-swamping", "decode")
    assert finding.evidence["median_ratio"] < 0.01
    assert finding.evidence["own_head_end_fraction"] is None
    assert finding.severity in ("warning", "error")


def _table_run(tmp_path, *, spread: bool):
    """A table of 8 prototypes whose rows 0 and 1 a term pulls together, watched against a
    latent drawn around every row (``spread``) or around row 2 alone."""
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(8, 4) * 3)
    model = nn.ParameterList([table])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    centres = table.detach().clone()
    path = tmp_path / f"table-{spread}.gprobe"
    probe = gradprobe.Probe(model, run_file=path, every=2)
    probe.watch_latent("points")
    probe.watch_prototypes("table", lambda: table, latent="points")
    counts = []
    for _ in range(STEPS):
        rows = torch.randint(0, 8, (64,)) if spread else torch.full((64,), 2)
        points = centres[rows] + 0.1 * torch.randn(64, 4)
        probe.observe(points=points)
        nearest = np.argmin(np.linalg.norm(points.numpy()[:, None] - table.detach().numpy()[None],
                                           axis=2), axis=1)
        counts.append(np.bincount(nearest, minlength=8))
        opt.zero_grad()
        losses = {"fit": (table[2:] - centres[2:]).pow(2).sum(),
                  "merge": (table[0] - table[1]).pow(2).sum()}
        probe.backward(losses)
        opt.step()
    probe.close()
    return gradprobe.load_run(path), table.detach().numpy(), counts


@pytest.mark.parametrize("spread", [True, False])
def test_a_merged_pair_is_a_collapse_only_when_usage_goes(tmp_path, spread):
    run, table, counts = _table_run(tmp_path, spread=spread)
    distances = np.linalg.norm(table[:, None] - table[None], axis=2)[np.triu_indices(8, 1)]
    assert distances.min() / distances.mean() < 1e-3  # rows 0 and 1 merged
    finding = _finding(diagnose(run), "prototype-collapse", "table")
    pooled = finding.evidence["pooled_usage"]
    steps, recorded = run.arrays("prototype_assignments", "table")
    window = [int(s) for s in steps if pooled["steps"][0] <= s <= pooled["steps"][1]]
    mine = np.sum([counts[s] for s in window], axis=0)
    theirs = np.sum(recorded[-len(window):], axis=0)
    # Rows 0 and 1 are a near tie that float rounding may break either way: compared as one.
    assert np.array_equal(theirs[2:], mine[2:]) and theirs[:2].sum() == mine[:2].sum()
    assert pooled["usage"] == pytest.approx(entropy(theirs) / np.log(8))
    assert finding.evidence["merged_pair_only"] == spread
    assert (finding.severity == "info") == spread
