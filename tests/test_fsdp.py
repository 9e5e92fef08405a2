"""The probe on an FSDP2 (``fully_shard``) model: 2 real processes on CPU (gloo), against one.

Each rank trains on its half of the global batch the single-process reference sees, with
per-sample-mean losses, so the mean of the ranks' gradients is the global batch's gradient.
The ranks count every collective they enter (the ``torch.distributed`` functions FSDP2 and
the probe call, wrapped) step by step, with and without the probe.
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gradprobe
from _spawn import rank_results, spawn_ranks
from test_moe import documented_example, usage_entropy

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch build has no gloo backend for the 2-process runs",
                allow_module_level=True)
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 32
STEPS = 5
EVERY = 2  # probe steps 0, 2, 4; steps 1 and 3 are not probed
LOSSES = 3
FSDP_GROUPS = 2  # fully_shard on the trunk and on the root
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") \
    else "reduce_scatter_tensor"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter",
               "broadcast", "barrier")


class Trunk3Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # 31 outputs: the shared layer's 32 * 31 + 31 = 1023 parameters do not split evenly
        # over 2 ranks, so the reduce-scatter's padding is exercised.
        self.trunk = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                         torch.nn.Linear(32, 31))
        self.heads = torch.nn.ModuleList([torch.nn.Linear(31, 1), torch.nn.Linear(31, 4),
                                          torch.nn.Linear(31, 2)])

    def forward(self, x):
        h = self.trunk(x)
        return h, [head(h) for head in self.heads]


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(256, 8, generator=gen), torch.randn(256, 1, generator=gen), \
        torch.randint(0, 4, (256,), generator=gen)


def batch(step, rank):
    idx = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
    share = GLOBAL_BATCH // WORLD
    return idx if rank is None else idx[rank * share:(rank + 1) * share]


def train(model, probe, rank, counts=None):
    """STEPS of SGD; returns the parameters (gathered whole under FSDP2) and the collectives
    entered at each step."""
    x, y, c = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_step = []
    for step in range(STEPS):
        if counts is not None:
            counts.clear()
        idx = batch(step, rank)
        _, (a, b, d) = model(x[idx])
        losses = {"task": F.mse_loss(a, y[idx]), "cls": F.cross_entropy(b, c[idx]),
                  "aux": d.pow(2).mean()}
        if probe is None:
            (losses["task"] + 0.5 * losses["cls"] + 0.1 * losses["aux"]).backward()
        else:
            probe.backward(losses, weights={"cls": 0.5, "aux": 0.1})
        opt.step()
        opt.zero_grad()
        if counts is not None:
            per_step.append(dict(counts))
    if probe is not None:
        probe.close()
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return [p.detach().clone() for p in params], per_step


def attach(model, run_file):
    probe = gradprobe.Probe(model, every=EVERY, run_file=run_file, overwrite=True)
    probe.watch_latent("h", model.trunk)
    return probe


def sharded_model(**kwargs):
    torch.manual_seed(0)
    model = Trunk3Heads()
    fully_shard(model.trunk, **kwargs)
    fully_shard(model, **kwargs)
    return model


def count_collectives() -> collections.Counter:
    counts = collections.Counter()
    for name in COLLECTIVES:
        if hasattr(dist, name):
            def counted(*args, _call=getattr(dist, name), _name=name, **kwargs):
                counts[_name] += 1
                return _call(*args, **kwargs)
            setattr(dist, name, counted)
    return counts


def moe_training(rank: int, world: int, run_file: Path) -> list[float]:
    """docs/probe.md's top-1 MoE (balancing loss off, so that the global loss is the mean of
    the ranks' losses), sharded with FSDP2 when ``world`` > 1; the router's own top-1 usage
    of the global batch at each probe step."""
    namespace: dict = {}
    exec(documented_example()[0], namespace)
    torch.manual_seed(0)
    moe, head = namespace["TopOneMoE"](), torch.nn.Linear(8, 1)
    if world > 1:
        fully_shard(moe)
        fully_shard(head)
    opt = torch.optim.Adam([*moe.parameters(), *head.parameters()], lr=0.01)
    probe = gradprobe.Probe(torch.nn.ModuleDict({"moe": moe, "head": head}), shared=moe.router,
                            every=5, run_file=run_file, overwrite=True,
                            roles={"balance": "other"})
    keys = {}
    probe.watch_latent("tokens")
    probe.watch_prototypes("experts", lambda: keys["rows"], latent="tokens")
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(8, generator=gen)
    usage = []
    for step in range(16):
        kinds = torch.randint(0, 4, (64,), generator=gen)
        x = 1.0 + 0.3 * F.one_hot(kinds, 8) + torch.randn(64, 8, generator=gen)
        y = 3 * (x @ a)[:, None]
        if probe.is_probe_step:  # every rank gathers the sharded router rows (a collective)
            weight = moe.router.weight
            rows = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
            keys["rows"] = F.normalize(rows.detach(), dim=1)
            usage.append(usage_entropy((F.normalize(x, dim=1) @ keys["rows"].T).argmax(-1), 4))
        mine = slice(rank * 64 // world, (rank + 1) * 64 // world)
        out, balance = moe(x[mine])
        task = F.mse_loss(head(out), y[mine]) / y.var()
        probe.observe(tokens=F.normalize(x[mine], dim=1), groups=kinds[mine])
        probe.backward({"task": task, "balance": balance}, weights={"balance": 0.0})
        opt.step()
        opt.zero_grad()
    probe.close()
    return usage


def worker(rank: int, port: int, out: str) -> None:
    out = Path(out)
    with rank_results(rank, WORLD, port, out) as result:
        counts = count_collectives()
        result["plain"], result["plain_counts"] = train(sharded_model(), None, rank, counts)
        model = sharded_model()
        result["probed"], result["probed_counts"] = train(
            model, attach(model, out / f"fsdp_rank{rank}.gprobe"), rank, counts)
        try:
            gradprobe.Probe(sharded_model(offload_policy=CPUOffloadPolicy(pin_memory=False)))
        except gradprobe.ProbeUsageError as exc:
            result["offload_error"] = str(exc)
        result["moe_usage"] = moe_training(rank, WORLD, out / f"moe_rank{rank}.gprobe")
        # Prototypes handed over as a sharded parameter: rank 0 refuses them when it reads
        # them, and every rank stops probing at the next vote (no rank left in a collective).
        model = sharded_model()
        probe = gradprobe.Probe(model, every=1)
        probe.watch_prototypes("rows", model.trunk[2].weight)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, probe, rank)
        result["dtensor_prototypes"] = (probe.enabled, [str(w.message) for w in caught
                                                        if "gradprobe" in str(w.message)])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    results = spawn_ranks(worker, out, WORLD)
    torch.manual_seed(0)
    model = Trunk3Heads()
    reference, _ = train(model, attach(model, out / "single.gprobe"), None)
    return out, results, reference, moe_training(0, 1, out / "moe_single.gprobe")


def test_parameters_are_bit_identical_with_and_without_the_probe(ranks):
    out, results, reference, _ = ranks
    for result in results:
        for plain, probed in zip(result["plain"], result["probed"]):
            assert torch.equal(plain, probed)
        # FSDP2 averages the ranks' gradients: one process on the global batch, up to rounding.
        for probed, single in zip(result["probed"], reference):
            torch.testing.assert_close(probed, single, rtol=1e-5, atol=1e-6)


def test_recorded_gram_is_that_of_the_global_batch(ranks):
    out, _, _, _ = ranks
    sharded = gradprobe.load_run(out / "fsdp_rank0.gprobe")
    single = gradprobe.load_run(out / "single.gprobe")
    assert sharded.meta["world_size"] == WORLD
    assert sorted(sharded.meta["shared_parameters"]) == \
        sorted(single.meta["shared_parameters"]) == ["trunk.2.bias", "trunk.2.weight"]
    steps, grams = sharded.arrays("grad_gram", "shared")
    ref_steps, ref_grams = single.arrays("grad_gram", "shared")
    assert list(steps) == list(ref_steps) == [0, 2, 4]
    for gram, ref in zip(grams, ref_grams):
        assert gram.shape == (LOSSES, LOSSES)
        assert np.abs(gram - ref).max() <= 1e-5 * np.abs(ref).max()
    for quantity, name in [("loss", "cls"), ("latent_grad_norm", "h|task"),
                           ("effective_rank", "h")]:
        _, values = sharded.series(quantity, name)
        _, ref_values = single.series(quantity, name)
        np.testing.assert_allclose(values, ref_values, rtol=1e-4)


def test_only_rank_0_writes(ranks):
    out, _, _, _ = ranks
    assert (out / "fsdp_rank0.gprobe").exists()
    assert not (out / "fsdp_rank1.gprobe").exists()


def test_collectives_are_counted_as_docs_state(ranks):
    _, results, _, _ = ranks
    for result in results:
        plain, probed = result["plain_counts"], result["probed_counts"]
        for step in range(STEPS):
            if step % EVERY:
                assert probed[step] == plain[step], step  # a non-probe step: FSDP2's own only
                continue
            # docs/distributed.md: two votes and the Gram all-reduce, one reduce-scatter of the
            # per-loss rows, one all-gather per watched latent, and FSDP2 all-gathering each of
            # its parameter groups again for each per-loss pass.
            extra = collections.Counter(probed[step])
            extra.subtract(plain[step])
            assert {k: v for k, v in extra.items() if v} == {
                "all_reduce": 3, REDUCE_SCATTER: 1, "all_gather": 1,
                "all_gather_single": LOSSES * FSDP_GROUPS}, step


def test_cpu_offload_is_refused_at_construction(ranks):
    _, results, _, _ = ranks
    for result in results:
        assert "CPUOffloadPolicy" in result["offload_error"]


def test_moe_router_usage_is_recorded_from_the_global_batch(ranks):
    out, results, _, single_usage = ranks
    sharded = gradprobe.load_run(out / "moe_rank0.gprobe")
    single = gradprobe.load_run(out / "moe_single.gprobe")
    assert not (out / "moe_rank1.gprobe").exists()
    steps, usage = sharded.series("prototype_usage", "experts")
    ref_steps, ref_usage = single.series("prototype_usage", "experts")
    assert steps.tolist() == ref_steps.tolist() == [0, 5, 10, 15]
    # the router's own top-1 usage of the global batch, in the sharded run and in one process
    for rank in range(WORLD):
        np.testing.assert_allclose(results[rank]["moe_usage"], usage, atol=1e-12)
    np.testing.assert_allclose(single_usage, ref_usage, atol=1e-12)
    np.testing.assert_allclose(usage, ref_usage, atol=1e-12)


def test_sharded_prototypes_are_refused_on_every_rank(ranks):
    _, results, _, _ = ranks
    for rank, result in enumerate(results):
        enabled, messages = result["dtensor_prototypes"]
        assert not enabled
        assert len(messages) == 1
        assert ("sharded DTensor" if rank == 0 else "failed on another rank") in messages[0]
