"""``prototype-collapse``'s merge test against chance (rule change 32): the closest of P rows
spread over rank r is close by chance alone, at about ``(2 / (P (P - 1)))^(1 / r)`` of their
typical distance, so a memory bank of many rows is not read as two merged prototypes, while
two rows of a small table that coincide still are."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from torch import nn

from gradprobe import Probe
from gradprobe.diagnose import diagnose
from gradprobe.diagnose.thresholds import Thresholds
from gradprobe.metrics import closest_pair_by_chance
from gradprobe.record import run_from_state
from gradprobe.record.quantities import (PROTOTYPE_COUNT, PROTOTYPE_MEAN_DISTANCE,
                                         PROTOTYPE_MIN_DISTANCE, PROTOTYPE_RANK)


@pytest.mark.parametrize("count, rank", [(8, 7.0), (1347, 7.35), (64, 4.45), (3, 1.0)])
def test_closest_pair_by_chance_is_one_pair_expected_that_close(count, rank):
    pairs = count * (count - 1) / 2
    level = closest_pair_by_chance(count, rank)
    # P(P-1)/2 pairs, each within a fraction x of the typical distance with chance x^r:
    # one pair expected at the level.
    assert math.isclose(pairs * level ** rank, 1.0, rel_tol=1e-12)


def test_closest_pair_by_chance_has_no_level_without_two_pairs_or_spread():
    assert closest_pair_by_chance(1, 5.0) == closest_pair_by_chance(2, 5.0) == 1.0
    assert closest_pair_by_chance(100, 0.0) == 1.0


def test_closest_pair_by_chance_scales_as_a_simulated_closest_pair():
    """Uniform points in a cube of 3 dimensions: the simulated closest pair over the mean
    distance shrinks from 30 to 300 points by the factor the formula gives (within 20%; the
    formula's constant cancels in the ratio)."""
    rng = np.random.default_rng(0)

    def simulated(count: int) -> float:
        ratios = []
        for _ in range(60):
            d = pdist(rng.uniform(size=(count, 3)))
            ratios.append(d.min() / d.mean())
        return float(np.median(ratios))

    shrink = simulated(30) / simulated(300)
    expected = closest_pair_by_chance(30, 3.0) / closest_pair_by_chance(300, 3.0)
    assert expected == pytest.approx(10 ** (2 / 3), rel=0.05)  # P^(-2/r), up to (P-1)/P
    assert shrink == pytest.approx(expected, rel=0.2)


def _run(table: torch.Tensor, seed: int = 0):
    """A fixed table watched with its latent (rows drawn near random table rows, through an
    identity layer that is never stepped), 40 probe steps of a pull loss: nothing moves and
    every row is in use, so only the merge test can speak."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    enc = nn.Linear(table.shape[1], table.shape[1])
    with torch.no_grad():
        enc.weight.copy_(torch.eye(table.shape[1]))
        enc.bias.zero_()
    probe = Probe(enc, shared=enc, every=1)
    probe.watch_latent("z")
    probe.watch_prototypes("table", lambda: table, latent="z")
    for _ in range(40):
        rows = torch.randint(len(table), (64,), generator=gen)
        z = enc(table[rows] + 0.01 * torch.randn(64, table.shape[1], generator=gen))
        probe.observe(z=z, groups=rows)
        probe.backward({"pull": ((z - table[rows]) ** 2).sum(1).mean()})
        enc.zero_grad()
    probe.close()
    return run_from_state(probe.state_dict(), "merge")


def test_a_large_table_holds_close_rows_by_chance_and_is_not_merged():
    """1,000 rows spread over 3 of 16 dimensions: the closest pair sits below 5% of the mean
    distance (the former absolute test called it a merge), within the level chance gives."""
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(1000, 3, generator=gen) @ torch.randn(3, 16, generator=gen)
    run = _run(table)
    d = pdist(table.numpy().astype(np.float64))
    assert d.min() / d.mean() < 0.05
    (count,) = set(run.series(PROTOTYPE_COUNT, "table")[1].tolist())
    assert count == 1000
    rank = float(np.median(run.series(PROTOTYPE_RANK, "table")[1]))
    assert d.min() / d.mean() > Thresholds().proto_merge_fraction * \
        closest_pair_by_chance(1000, rank)
    assert [f for f in diagnose(run) if f.id == "prototype-collapse"] == []


def test_two_rows_of_a_small_table_that_coincide_are_merged():
    gen = torch.Generator().manual_seed(2)
    table = 2.0 * torch.randn(8, 8, generator=gen)
    table[7] = table[6] + 1e-3 * torch.randn(8, generator=gen)
    run = _run(table)
    (f,) = [f for f in diagnose(run) if f.id == "prototype-collapse"]
    d = pdist(table.numpy().astype(np.float64))
    _, min_d = run.series(PROTOTYPE_MIN_DISTANCE, "table")
    _, mean_d = run.series(PROTOTYPE_MEAN_DISTANCE, "table")
    assert np.allclose(min_d / mean_d, d.min() / d.mean(), rtol=1e-4)
    assert f.evidence["table_rows"] == 8
    assert math.isclose(f.evidence["closest_pair_by_chance"],
                        closest_pair_by_chance(8, f.evidence["rank_end"]), rel_tol=1e-12)
    assert "merged" in f.title and "chance" in f.key_number
