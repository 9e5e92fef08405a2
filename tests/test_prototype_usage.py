"""Prototype usage pooled over a window of batches (issue 21, item 2): the recorded
nearest-prototype counts, their entropy, and ``prototype-collapse`` judged on the pool, so
that one prototype taking every row is found even when ``groups=`` are the assignments, while
batches drawn from one group by design are not read as collapse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from torch import nn

from gradprobe import Probe, load_run
from gradprobe.diagnose import diagnose
from gradprobe.probe import ProbeUsageError
from gradprobe.diagnose.thresholds import Thresholds
from gradprobe.metrics import prototype_assignments, prototype_usage, usage_entropy
from gradprobe.record import run_from_state
from gradprobe.record.quantities import PROTOTYPE_ASSIGNMENTS, PROTOTYPE_USAGE

GROUPS, DIM, STEPS = 4, 8, 60


def test_assignment_counts_are_the_nearest_rows_by_numpy():
    gen = torch.Generator().manual_seed(0)
    e, p = torch.randn(200, 5, generator=gen), torch.randn(7, 5, generator=gen)
    nearest = np.argmin(((e.numpy()[:, None, :] - p.numpy()[None]) ** 2).sum(-1), axis=1)
    counts = prototype_assignments(e, p)
    assert counts.tolist() == np.bincount(nearest, minlength=7).tolist()
    assert math.isclose(prototype_usage(e, p), entropy(np.bincount(nearest, minlength=7)) /
                        math.log(7), rel_tol=1e-12)


def test_usage_entropy_by_scipy_and_its_edges():
    c = np.array([5.0, 0.0, 3.0, 12.0])
    assert math.isclose(usage_entropy(c), entropy(c) / math.log(4), rel_tol=1e-12)
    assert usage_entropy([0, 9, 0]) == 0.0
    assert math.isclose(usage_entropy([2, 2, 2]), 1.0)
    assert usage_entropy([4]) == 0.0 and usage_entropy([0, 0]) == 0.0


def _run(collapsed: bool, seed: int = 0):
    """Fixed prototypes apart from each other; each batch is drawn from ONE group (a batch of
    one cell line, by design), group = step mod 4. Healthy: the encoder pulls each row to its
    group's prototype. Collapsed: every row is pulled to prototype 0, and the assignments
    themselves are passed as ``groups=`` (all 0), as a SwAV user would."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(GROUPS, 12, generator=gen)
    protos = 2.0 * torch.randn(GROUPS, DIM, generator=gen)
    enc = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, DIM))
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    probe = Probe(enc, shared=enc, every=1)
    probe.watch_latent("z")
    probe.watch_prototypes("protos", lambda: protos, latent="z")
    for step in range(STEPS):
        group = step % GROUPS
        x = centres[group] + torch.randn(32, 12, generator=gen)
        z = enc(x)
        target = torch.zeros(32, dtype=torch.long) if collapsed else \
            torch.full((32,), group, dtype=torch.long)
        probe.observe(z=z, groups=target)
        probe.backward({"pull": ((z - protos[target]) ** 2).sum(1).mean()})
        opt.step()
        opt.zero_grad()
    probe.close()
    return run_from_state(probe.state_dict(), f"usage_{collapsed}")


def _pooled_by_numpy(run, th: Thresholds) -> tuple[float, float]:
    """Entropy / log P and largest share of the counts summed over the end window: the probe
    steps within the last window_share of the span, at least min_points of them."""
    steps, counts = run.arrays(PROTOTYPE_ASSIGNMENTS, "protos")
    reach = th.window_share * (steps[-1] - steps[0])
    last = max(th.min_points, int((steps >= steps[-1] - reach).sum()))
    pooled = np.sum(np.stack(counts[-last:]), axis=0)
    return entropy(pooled) / math.log(len(pooled)), pooled.max() / pooled.sum()


def test_one_group_per_batch_by_design_is_not_collapse():
    run = _run(collapsed=False)
    th = Thresholds()
    # Each batch maps to one prototype: per-batch usage near 0, the pool near 1.
    _, usage = run.series(PROTOTYPE_USAGE, "protos")
    assert np.median(usage[len(usage) // 2:]) < 0.1
    pooled, largest = _pooled_by_numpy(run, th)
    assert pooled > 0.9 and largest < 0.35
    assert [f for f in diagnose(run) if f.id == "prototype-collapse"] == []


def test_one_prototype_taking_every_row_is_collapse_even_with_assignments_as_groups():
    run = _run(collapsed=True)
    th = Thresholds()
    pooled, largest = _pooled_by_numpy(run, th)
    assert pooled < th.proto_usage and largest > 0.9
    (f,) = [f for f in diagnose(run) if f.id == "prototype-collapse"]
    assert f.subject == "protos" and f.severity in ("warning", "error")
    assert math.isclose(f.evidence["pooled_usage"]["usage"], pooled, rel_tol=1e-9)
    assert math.isclose(f.evidence["pooled_usage"]["largest_share"], largest, rel_tol=1e-9)
    # The prototypes never moved apart or together: the usage alone raised it.
    assert "pooled" in f.key_number


def _numpy_lag(p: np.ndarray, e: np.ndarray, groups: np.ndarray) -> float:
    """metrics.prototype_lag's formula, with every group holding several distinct rows."""
    lags = [np.linalg.norm(p[g] - e[groups == g].mean(0))
            / np.sqrt(e[groups == g].var(0, ddof=1).mean()) for g in np.unique(groups)]
    return float(np.mean(lags))


def test_each_table_reads_its_own_assignments_where_a_model_has_several(tmp_path):
    """Residual codebooks: each stage's rows belong to its own table's codes, so one shared
    ``groups`` cannot serve both; ``watch_prototypes(groups=NAME)`` names each table's own."""
    gen = torch.Generator().manual_seed(0)
    trunk = nn.Linear(DIM, DIM)
    tables = [torch.randn(GROUPS, DIM, generator=gen) for _ in range(2)]
    probe = Probe(trunk, every=1, run_file=tmp_path / "rvq.gprobe")
    for stage in range(2):
        probe.watch_latent(f"residual_{stage}")
        probe.watch_prototypes(f"codebook_{stage}", tables[stage], latent=f"residual_{stage}",
                               groups=f"codes_{stage}")
    expected = {0: [], 1: []}
    for _ in range(3):
        x = torch.randn(64, DIM, generator=gen)
        z = trunk(x)
        residual, observed = z.detach(), {}
        for stage in range(2):
            codes = torch.randint(0, GROUPS, (64,), generator=gen)  # each code holds rows
            observed[f"residual_{stage}"], observed[f"codes_{stage}"] = residual, codes
            expected[stage].append(_numpy_lag(tables[stage].numpy(), residual.numpy(),
                                              codes.numpy()))
            residual = residual - tables[stage][codes]
        probe.observe(**observed)
        probe.backward({"task": z.pow(2).mean(), "commit": (z - 1).pow(2).mean()})
    probe.close()
    run = load_run(tmp_path / "rvq.gprobe")
    for stage in range(2):
        got = run.series("prototype_lag", f"codebook_{stage}")[1]
        assert np.allclose(got, expected[stage], rtol=1e-5), (stage, got, expected[stage])
    # the two stages' assignments differ, so one groups tensor would have given one of them
    # the other's lag
    assert not np.allclose(expected[0], expected[1], rtol=1e-2)


def test_a_table_s_groups_must_name_an_observed_tensor_not_a_watch(tmp_path):
    probe = Probe(nn.Linear(DIM, DIM), run_file=tmp_path / "x.gprobe")
    probe.watch_latent("z")
    with pytest.raises(ProbeUsageError, match="groups must name a tensor passed to observe"):
        probe.watch_prototypes("codebook", torch.randn(GROUPS, DIM), latent="z", groups="z")


def _even_usage_run(used: int, prototypes: int = 32, rows: int = 120, steps: int = 40):
    """Every batch spreads its rows evenly (cyclically) over the first ``used`` of
    ``prototypes`` fixed, well-separated rows, each latent row a small offset from its own:
    the pooled usage is exactly log(used) / log(prototypes)."""
    gen = torch.Generator().manual_seed(used)
    protos = 10.0 * torch.randn(prototypes, DIM, generator=gen)
    head = nn.Linear(DIM, DIM)
    with torch.no_grad():
        head.weight.copy_(torch.eye(DIM))
        head.bias.zero_()
    probe = Probe(head, shared=head, every=1)
    probe.watch_latent("z")
    probe.watch_prototypes("protos", lambda: protos, latent="z")
    for _ in range(steps):
        own = torch.arange(rows) % used
        z = head(protos[own] + 0.01 * torch.randn(rows, DIM, generator=gen))
        probe.observe(z=z)
        probe.backward({"pull": (z ** 2).mean()})  # no optimiser step: the table stays put
        head.zero_grad()
    probe.close()
    return run_from_state(probe.state_dict(), f"even_usage_{used}")


@pytest.mark.parametrize("used, reason", [(4, "entropy"), (5, "entropy"), (6, "dead"),
                                          (15, "dead"), (20, None)])
def test_collapse_is_a_pooled_perplexity_at_most_the_square_root_of_the_set_size(used, reason):
    """The usage threshold read as a perplexity: exp(H) of the pooled counts at most sqrt(P).
    5 of 32 evenly used (perplexity 5 < 5.66, entropy 0.464 of log 32, as a Gumbel dVAE
    codebook left on 5-6 codes: 0.37) is collapse by its entropy; 6 of 32 (0.517) is not by
    its entropy, but with 960 rows pooled (30 per prototype, at least proto_dead_rows) its 26
    unassigned rows are dead, and at most proto_used_fraction of the set in use is collapse
    too (15 of 32); 20 of 32 is not (each count divides the 120 rows of a batch)."""
    run = _even_usage_run(used)
    th = Thresholds()
    pooled, largest = _pooled_by_numpy(run, th)
    assert math.isclose(pooled, math.log(used) / math.log(32), rel_tol=1e-9)
    assert math.isclose(largest, 1 / used, rel_tol=1e-9)
    assert (math.exp(pooled * math.log(32)) <= math.sqrt(32)) is (reason == "entropy")
    found = [f for f in diagnose(run) if f.id == "prototype-collapse"]
    if reason is None:
        assert found == []
        return
    (f,) = found
    assert f.evidence["pooled_usage"]["used"] == used
    assert f.evidence["pooled_usage"]["rows"] >= th.proto_dead_rows * 32
    assert math.isclose(f.evidence["pooled_usage"]["usage"], pooled, rel_tol=1e-9)
    assert f.key_number == (f"pooled usage entropy {pooled:.3g}" if reason == "entropy"
                            else f"{used} of 32 used")
