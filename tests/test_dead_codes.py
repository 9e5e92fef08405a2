"""Most of a codebook dead while the codes in use share the rows evenly: a partial collapse
that the pooled usage entropy misses (20 of 64 codes in even use: entropy log 20 / log 64 =
0.72), found as ``prototype-collapse`` when at most ``proto_used_fraction`` of the codes are
assigned any row over the end window, with ``proto_dead_rows`` rows or more pooled per code
(docs/findings.md). A real vector-quantised training run whose dead codes are counted on the
trained model with numpy; the pooled counts checked against the recorded assignments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from torch import nn

from gradprobe import Probe, load_run
from gradprobe.diagnose import Thresholds, diagnose
from gradprobe.record.quantities import PROTOTYPE_ASSIGNMENTS

# A codebook loss reaches only the codebook, which the probe notes at its first step.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*shares no parameter:gradprobe._warnings.GradprobeWarning")

TH = Thresholds()
LIVE, CODES, DIM, STEPS, BATCH = 20, 64, 8, 120, 128


def _vq(tmp_path, dead_start: bool):
    """A VQ autoencoder trained by reconstruction, codebook and commitment losses on Gaussian
    inputs. Its codes start at encoded inputs (data initialisation); ``dead_start``: all but
    LIVE of them far from every encoding instead (dead from the start)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    encoder = nn.Linear(12, DIM)
    with torch.no_grad():
        start = encoder(torch.randn(CODES, 12, generator=gen))
        if dead_start:
            start[LIVE:] = 50.0 + torch.randn(CODES - LIVE, DIM, generator=gen)
    model = nn.Module()
    model.encoder, model.codebook = encoder, nn.Parameter(start.clone())
    model.decoder = nn.Linear(DIM, 12)
    codebook = model.codebook
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    path = tmp_path / f"vq-{dead_start}.gprobe"
    with Probe(model, run_file=path, every=1) as probe:
        probe.watch_latent("z")
        probe.watch_prototypes("codebook", lambda: codebook, latent="z")
        for _ in range(STEPS):
            x = torch.randn(BATCH, 12, generator=gen)
            z = encoder(x)
            probe.observe(z=z)
            nearest = torch.cdist(z, codebook).argmin(1)
            quantised = z + (codebook[nearest] - z).detach()  # straight-through
            probe.backward({"reconstruction": ((model.decoder(quantised) - x) ** 2).mean(),
                            "codebook_loss": ((z.detach() - codebook[nearest]) ** 2).mean(),
                            "commitment": ((z - codebook[nearest].detach()) ** 2).mean()},
                           weights={"commitment": 0.25})
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        x = torch.randn(2000, 12, generator=gen)
        z, table = encoder(x).numpy(), codebook.numpy()
    used = len(np.unique(np.argmin(((z[:, None] - table[None]) ** 2).sum(-1), axis=1)))
    return load_run(path), used


def _pooled(run):
    steps, counts = run.arrays(PROTOTYPE_ASSIGNMENTS, "codebook")
    in_window = steps >= steps[-1] - TH.window_share * (steps[-1] - steps[0])
    return np.sum(np.stack(counts)[in_window], axis=0)


def _collapse(run):
    return next((f for f in diagnose(run, TH) if f.id == "prototype-collapse"), None)


def test_a_mostly_dead_codebook_in_even_use_is_a_collapse(tmp_path):
    run, used = _vq(tmp_path, dead_start=True)
    assert used <= CODES * TH.proto_used_fraction  # counted on the trained model
    pooled = _pooled(run)
    assert entropy(pooled) / math.log(CODES) > TH.proto_usage  # the entropy alone misses it
    assert pooled.sum() >= TH.proto_dead_rows * CODES
    finding = _collapse(run)
    assert finding is not None and finding.subject == "codebook"
    assert finding.severity == "warning"
    recorded = finding.evidence["pooled_usage"]
    assert recorded["used"] == int((pooled > 0).sum()) and recorded["rows"] == int(pooled.sum())
    assert finding.key_number == f"{recorded['used']} of {CODES} used"


def test_a_data_initialised_codebook_is_not(tmp_path):
    run, used = _vq(tmp_path, dead_start=False)
    assert used > CODES * TH.proto_used_fraction
    assert _collapse(run) is None
