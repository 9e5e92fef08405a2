"""The default shared set: the layer nearest the losses that every path of every loss
crosses, checked on small real training runs against an independent test (cutting a layer's
output from the graph with a forward hook)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
import runs
from gradprobe.demo.decoupling import GradReverse
from gradprobe.diagnose import diagnose
from gradprobe.record import run_from_state


def _layers(run):
    return sorted({name.rpartition(".")[0] for name in run.meta["shared_parameters"]})


def _reaches(model_losses, cut, parameter):
    """Which losses still reach ``parameter`` when ``cut``'s output is detached."""
    handle = cut.register_forward_hook(lambda module, inputs, output: output.detach())
    try:
        losses = model_losses()
    finally:
        handle.remove()
    return {name for name, loss in losses.items() if loss.requires_grad and
            torch.autograd.grad(loss, parameter, retain_graph=True, allow_unused=True)[0]
            is not None}


def test_a_vae_gets_its_encoder_not_one_of_the_parallel_heads():
    run = runs.vae(1.0)
    assert _layers(run) == ["fc1"]
    # Independently: fc21 (mean) and fc22 (log-variance) are each bypassed by the other
    # head's path, fc1 is not. Cutting fc1's output leaves fc1 itself reachable (it is the
    # layer), so the check is on a parameter below the heads: fc1's weight through the heads.
    torch.manual_seed(0)
    model = runs._VAE()
    x = (torch.rand(16, 32) > 0.5).float()

    def losses():
        recon, mu, logvar = model(x)
        return {"bce": F.binary_cross_entropy(recon, x, reduction="sum"),
                "kld": -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())}

    assert _reaches(losses, model.fc21, model.fc1.weight) == {"bce", "kld"}
    assert _reaches(losses, model.fc22, model.fc1.weight) == {"bce", "kld"}


def test_dann_gets_its_feature_extractor_and_a_detached_domain_head_is_the_finding():
    healthy, detached = runs.dann("healthy"), runs.dann("detached")
    assert _layers(healthy) == ["feature.3"]  # the extractor's last Linear (BatchNorm passed over)
    assert not [f.title for f in diagnose(healthy) if f.severity != "info"]
    assert not healthy.events("no_shared_path")
    found = {f.subject: f for f in diagnose(detached) if f.id == "inert-loss"}
    assert set(found) == {"s_domain", "t_domain"}
    for f in found.values():
        assert f.severity == "warning"
        assert "shares no parameter with the task loss 'label'" in f.title


def test_dann_extractor_is_crossed_by_every_path_of_every_loss():
    # The same check as the probe's, done independently with a forward hook: detaching the
    # extractor's last Linear cuts every loss from its first layer; detaching a head does not.
    torch.manual_seed(0)
    feature = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(),
                            nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU())
    label_head, domain_head = nn.Linear(16, 4), nn.Linear(16, 2)
    xs, xt = torch.randn(8, 10), torch.randn(8, 10)

    def losses():
        fs, ft = feature(xs), feature(xt)
        return {"label": F.cross_entropy(label_head(fs), torch.zeros(8, dtype=torch.long)),
                "s_domain": F.cross_entropy(domain_head(GradReverse.apply(fs, 1.0)),
                                            torch.zeros(8, dtype=torch.long)),
                "t_domain": F.cross_entropy(domain_head(GradReverse.apply(ft, 1.0)),
                                            torch.ones(8, dtype=torch.long))}

    assert _reaches(losses, feature[3], feature[0].weight) == set()
    assert _reaches(losses, feature[4], feature[0].weight) == set()  # passed over: 1-D only
    assert _reaches(losses, label_head, feature[0].weight) == {"s_domain", "t_domain"}
    model = nn.ModuleDict(dict(feature=feature, label=label_head, domain=domain_head))
    probe = gradprobe.Probe(model, every=1)
    probe.backward(losses())
    probe.close()
    assert _layers(run_from_state(probe.state_dict(), "dann")) == ["feature.3"]


def test_a_regulariser_on_one_head_neither_moves_the_shared_set_nor_is_reported():
    run = runs.left_right(1.0)
    assert _layers(run) == ["trunk.2"]
    assert run.roles["l2"] == "regularization"
    assert {e["name"] for e in run.events("no_shared_path")} == {"l2"}  # recorded...
    assert diagnose(run) == []  # ...and not a finding


def test_the_regulariser_raises_no_warning_while_training(tmp_path):
    torch.manual_seed(0)
    trunk, a, b = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 1)
    model = nn.ModuleList([trunk, a, b])
    probe = gradprobe.Probe(model, every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradprobe.GradprobeWarning)
        for _ in range(3):
            h = trunk(torch.randn(16, 4)).tanh()
            probe.backward({"task": a(h).pow(2).mean(), "aux": b(h).pow(2).mean(),
                            "l2": a.weight.pow(2).sum()})
    probe.close()
    assert _layers(run_from_state(probe.state_dict(), "mtl")) == ["0"]  # the trunk


@pytest.mark.parametrize("stop_gradient,layer", [(False, "encoder.3"), (True, "predictor.3")])
def test_one_loss_applied_to_two_views(stop_gradient, layer):
    # SimSiam: one loss, the encoder applied to two views. With the stop-gradient every path
    # to the encoder passes the predictor; without it, the target branch bypasses it.
    assert _layers(runs.simsiam(stop_gradient)) == [layer]


def test_the_default_records_the_blocks_of_the_whole_shared_set_and_says_why():
    # The shared set (and the Gram matrix) stays the nearest layer; the per-layer blocks cover
    # every parameter the task and another loss reach: DANN's whole extractor. The domain
    # head, which only the two domain losses share, is not in it; with the domain head
    # detached no other loss meets the label loss, and the blocks are the nearest layer's.
    healthy, detached = runs.dann("healthy"), runs.dann("detached")
    assert _layers(healthy) == ["feature.3"]
    assert healthy.array_names("grad_gram_layer") == ["feature.0", "feature.1", "feature.3",
                                                      "feature.4"]
    assert "per-layer blocks of the whole shared set" in \
        healthy.events("shared_set")[0]["message"]
    _, gram = healthy.arrays("grad_gram", "shared")
    _, block = healthy.arrays("grad_gram_layer", "feature.3")
    assert np.allclose(gram, block, rtol=1e-12)
    assert detached.array_names("grad_gram_layer") == _layers(detached)
    assert "per-layer blocks of it alone" in detached.events("shared_set")[0]["message"]
