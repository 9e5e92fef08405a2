"""``prototype-stale`` (issue 21, fifth held-out set): prototypes that never move are stale
when the latent leaves them outside their groups (a lag of many group std), and a fixed
target when each sits within its group at the end (an implicit codebook that a commitment
term pulls the latent onto). The lags are checked against a numpy computation of the
recorded formula on the same batches."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe
from gradprobe.diagnose import diagnose
from gradprobe.diagnose.thresholds import Thresholds
from gradprobe.record import run_from_state

import runs
from test_prototype_usage import _numpy_lag

STEPS, DIM = 60, 3
TABLE = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0)
                      for z in (-1.0, 1.0)])  # a fixed binary codebook, LFQ's in 3 bits


def _fixed_codebook_run():
    """A linear encoder whose output is watched against the fixed TABLE (never updated), with
    a commitment term pulling each row onto its nearest code (groups: that code), as a
    lookup-free quantiser's; returns the run and the lags computed here with numpy."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    encoder, head = nn.Linear(6, DIM), nn.Linear(DIM, 6)
    model = nn.ModuleDict(dict(encoder=encoder, head=head))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    probe = Probe(model, every=1)
    probe.watch_latent("z")
    probe.watch_prototypes("codebook", TABLE, latent="z")
    x = torch.randn(256, 6, generator=gen)
    lags = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(STEPS):
            z = encoder(x)
            groups = torch.cdist(z.detach(), TABLE).argmin(1)
            lags.append(_numpy_lag(TABLE.numpy(), z.detach().numpy(), groups.numpy()))
            probe.observe(z=z, groups=groups)
            probe.backward({"recon": F.mse_loss(head(z), x),
                            "commitment": F.mse_loss(z, TABLE[groups])})
            opt.step()
            opt.zero_grad()
    probe.close()
    run = run_from_state(probe.state_dict(), "fixed-codebook")
    assert np.allclose(run.series("prototype_lag", "codebook")[1], lags, rtol=1e-4)
    return run, np.array(lags)


def _stale(run):
    return [f for f in diagnose(run) if f.id == "prototype-stale"]


def test_a_fixed_table_the_latent_comes_to_is_no_stale_prototype():
    run, lags = _fixed_codebook_run()
    k = int(np.ceil(0.2 * STEPS))
    assert np.median(lags[-k:]) <= Thresholds().stale_lag_within
    (f,) = _stale(run)
    assert f.evidence["never_moved"] and f.evidence["latent_converged"]
    assert f.severity == "info" and "the latent came to them" in f.title


def test_prototypes_left_outside_their_groups_are_stale():
    """The record's case: the prototype loss pulls the features towards prototypes whose
    update is never called; they end 10 group std from their groups' means."""
    run = runs.prototype_model("never")
    _, lags = run.series("prototype_lag", "proto")
    k = int(np.ceil(0.2 * len(lags)))
    assert np.median(lags[-k:]) > Thresholds().stale_lag_within
    (f,) = _stale(run)
    assert f.severity == "error" and not f.evidence["latent_converged"]
