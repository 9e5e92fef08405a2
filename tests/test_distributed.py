"""The probe on DistributedDataParallel: 2 real processes on CPU (gloo), against one process.

Each rank trains on its half of the same global batch the single-process reference sees, with
losses that are per-sample means (so DDP's averaged gradient is the global batch's gradient).
One spawn runs every distributed scenario; the tests below read what the ranks saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import gradprobe
from _spawn import rank_results, spawn_ranks
from models import TwoLatentNet, make_data

WORLD = 2
GLOBAL_BATCH = 32
STEPS = 6
WEIGHTS = {"proto": 0.1, "orth": 0.5}


def mean_losses(model, x, y, g):
    """Losses that are means over samples: the mean of the ranks' losses is the global one."""
    z_I, z_E, logit = model(x, g)
    prototypes = model.module.prototypes if hasattr(model, "module") else model.prototypes
    return {
        "task": F.binary_cross_entropy_with_logits(logit, y),
        "proto": ((z_E - prototypes[g]) ** 2).sum(1).mean(),
        "orth": (z_I * z_E).sum(1).pow(2).mean(),
    }, z_E


def batch_indices(step: int, rank: int | None) -> torch.Tensor:
    idx = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH) % 256
    if rank is None:
        return idx
    share = GLOBAL_BATCH // WORLD
    return idx[rank * share:(rank + 1) * share]


def run_training(model, probe, rank, *, break_at=None):
    """STEPS of SGD; ``break_at``: the step at which this rank observes a malformed latent."""
    x, y, g = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        idx = batch_indices(step, rank)
        losses, z_E = mean_losses(model, x[idx], y[idx], g[idx])
        if probe is None:
            sum(WEIGHTS.get(k, 1.0) * v for k, v in losses.items()).backward()
        else:
            bad = step == break_at
            probe.observe(z_E=z_E.long() if bad else z_E, groups=g[idx])
            probe.backward(losses, weights=WEIGHTS)
        opt.step()
        opt.zero_grad()
    if probe is not None:
        probe.close()
    return [p.detach().clone() for p in model.parameters()]


def attach(model, log, **kwargs):
    probe = gradprobe.Probe(model, every=1, run_file=log, **kwargs)
    inner = getattr(model, "module", model)
    probe.watch_latent("z_I", inner.f_I)
    probe.watch_latent("z_E")
    return probe


def ddp_model(calls):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TwoLatentNet())

    def counting_allreduce(state, bucket):
        state["allreduce"] += 1
        return allreduce_hook(None, bucket)

    model.register_comm_hook(calls, counting_allreduce)
    return model


def worker(rank: int, port: int, out: str) -> None:
    out = Path(out)
    with rank_results(rank, WORLD, port, out) as result:
        plain_calls = {"allreduce": 0}
        result["plain"] = run_training(ddp_model(plain_calls), None, rank)
        probed_calls = {"allreduce": 0}
        model = ddp_model(probed_calls)
        probe = attach(model, out / "ddp.gprobe")
        result["probed"] = run_training(model, probe, rank)
        result["allreduce"] = (plain_calls["allreduce"], probed_calls["allreduce"])
        result["writer_path"] = probe._writer.path

        # Rank 1's probe fails (a malformed latent) at step 3: every rank stops probing there.
        model = ddp_model({"allreduce": 0})
        probe = attach(model, out / "fail_rank1.gprobe")
        result["fail_rank1"] = run_training(model, probe, rank, break_at=3 if rank == 1 else None)
        result["fail_rank1_enabled"] = (probe.enabled, probe.step)

        # Rank 0's probe fails while writing (its prototype store goes away at step 2): rank 0
        # stops recording at once, rank 1 stops at the next probe step's vote.
        model = ddp_model({"allreduce": 0})
        probe = attach(model, out / "fail_rank0.gprobe")
        reads = {"n": 0}

        def prototypes():
            reads["n"] += 1
            if reads["n"] > 2:
                raise RuntimeError("prototype store went away")
            return model.module.prototypes

        probe.watch_prototypes("cell", prototypes, latent="z_E")
        result["fail_rank0"] = run_training(model, probe, rank)
        result["fail_rank0_enabled"] = (probe.enabled, probe.step)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    results = spawn_ranks(worker, out, WORLD)
    torch.manual_seed(0)
    model = TwoLatentNet()
    reference = run_training(model, attach(model, out / "single.gprobe"), None)
    return out, results, reference


def test_parameter_updates_are_unchanged_on_every_rank(ranks):
    out, results, reference = ranks
    for result in results:
        for plain, probed in zip(result["plain"], result["probed"]):
            assert torch.equal(plain, probed)
        # DDP averages the ranks' gradients: the same updates as one process on the global batch.
        for probed, single in zip(result["probed"], reference):
            torch.testing.assert_close(probed, single, rtol=1e-5, atol=1e-6)
        plain_calls, probed_calls = result["allreduce"]
        assert plain_calls == probed_calls > 0  # DDP's all-reduce ran once per step, as without


def test_recorded_statistics_are_those_of_the_global_batch(ranks):
    out, results, _ = ranks
    ddp, single = gradprobe.load_run(out / "ddp.gprobe"), gradprobe.load_run(out / "single.gprobe")
    assert ddp.probe_steps().tolist() == single.probe_steps().tolist() == list(range(STEPS))
    assert ddp.meta["shared_parameters"] == single.meta["shared_parameters"]
    assert not any(n.startswith("module.") for n in ddp.meta["shared_parameters"])
    assert ddp.meta["world_size"] == WORLD
    _, ddp_grams = ddp.arrays("grad_gram", "shared")
    _, single_grams = single.arrays("grad_gram", "shared")
    for a, b in zip(ddp_grams, single_grams):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
    compared = [("loss", "task"), ("grad_norm", "proto"), ("grad_cosine", "task|orth"),
                ("combined_grad_norm", "shared"), ("latent_grad_norm", "z_E|task"),
                ("latent_grad_norm", "z_I|orth"), ("effective_rank", "z_E"),
                ("effective_rank", "z_I"), ("cka", "z_I|z_E"), ("latent_rows", "z_E")]
    for quantity, name in compared:
        np.testing.assert_allclose(ddp.series(quantity, name)[1], single.series(quantity, name)[1],
                                   rtol=1e-4, atol=1e-9, err_msg=f"{quantity} {name}")
    np.testing.assert_array_equal(ddp.series("latent_rows", "z_E")[1], GLOBAL_BATCH)
    # Batch composition describes one rank's batch: what a per-rank loss sees.
    _, _, g = make_data()
    expected = [len(g[batch_indices(s, 0)].unique()) for s in range(STEPS)]
    np.testing.assert_array_equal(ddp.series("groups_per_batch", "batch")[1], expected)


def test_only_rank_0_writes(ranks):
    out, results, _ = ranks
    assert results[0]["writer_path"] == out / "ddp.gprobe"
    assert results[1]["writer_path"] is None  # no file and no lock: a second writer is refused


def test_a_failure_on_one_rank_disables_every_rank_without_deadlock(ranks):
    out, results, reference = ranks
    for result in results:
        assert result["fail_rank1_enabled"] == (False, STEPS)
        assert result["fail_rank0_enabled"] == (False, STEPS)
        for failed, single in zip(result["fail_rank1"], reference):
            torch.testing.assert_close(failed, single, rtol=1e-5, atol=1e-6)
        for failed, plain in zip(result["fail_rank0"], result["plain"]):
            assert torch.equal(failed, plain)
    run = gradprobe.load_run(out / "fail_rank1.gprobe")
    assert run.probe_steps().tolist() == [0, 1, 2]
    assert "another rank" in run.events("probe_disabled")[0]["message"]
    run = gradprobe.load_run(out / "fail_rank0.gprobe")
    assert run.probe_steps().tolist() == [0, 1]
    assert "prototype store went away" in run.events("probe_disabled")[0]["message"]
