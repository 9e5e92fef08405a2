"""MISA, after Hazarika, Zimmermann & Poria 2020 ("MISA: Modality-Invariant and -Specific
Representations for Multimodal Sentiment Analysis", ACM Multimedia) and its public code
declare-lab/MISA (src/models.py, src/solver.py, src/utils/functions.py, src/config.py).

DOCSTRING: to be written with the measurements.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe

from .common import batches, digits_split
from .dsn import linear_cka, max_abs_correlation
from .harness import Expect, Family, Variant

STEPS, BATCH, HIDDEN, CLASSES, CLIP = 1200, 64, 128, 10, 1.0
LR = {"code": 1e-4, "fast": 1e-3}  # src/config.py's learning rate, and ten times it
WEIGHTS = {"diff": 0.3, "cmd": 1.0, "recon": 1.0}  # src/config.py: diff, sim, recon weights
CMD_MOMENTS = 5  # src/solver.py get_cmd_loss
ROLES = {"diff": "orthogonality"}  # the code's name hints at nothing
CODE_LR = ("healthy", "no-diff")  # the others run at ten times the code's learning rate
NORM_EVERY = 25  # the latents' norm on the test images, every so many steps, for their peak


def modalities(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two "modalities" of a flattened 8x8 digit: its left and its right four columns."""
    img = x.view(-1, 8, 8)
    return img[:, :, :4].reshape(-1, 32), img[:, :, 4:].reshape(-1, 32)


class MISA(nn.Module):
    """src/models.py at CPU scale: per modality a projection Linear + ReLU + LayerNorm (the
    utterance features), a private encoder Linear + Sigmoid; one shared encoder Linear +
    Sigmoid for both modalities; per modality a linear reconstruction of the projection from
    private + shared; a fusion MLP on the concatenated private and shared features."""

    def __init__(self):
        super().__init__()
        self.project = nn.ModuleList([nn.Sequential(nn.Linear(32, HIDDEN), nn.ReLU(),
                                                    nn.LayerNorm(HIDDEN)) for _ in range(2)])
        self.private = nn.ModuleList([nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Sigmoid())
                                      for _ in range(2)])
        self.shared = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Sigmoid())
        self.recon = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN) for _ in range(2)])
        self.fusion = nn.Sequential(nn.Linear(4 * HIDDEN, 2 * HIDDEN), nn.ReLU(),
                                    nn.Linear(2 * HIDDEN, CLASSES))

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        orig = [p(m) for p, m in zip(self.project, modalities(x))]
        private = [enc(u) for enc, u in zip(self.private, orig)]
        shared = [self.shared(u) for u in orig]
        recon = [r(p + s) for r, p, s in zip(self.recon, private, shared)]
        logits = self.fusion(torch.cat(private + shared, dim=1))
        return {"orig": orig, "private": private, "shared": shared, "recon": recon,
                "logits": logits}


def diff_loss(a: torch.Tensor, b: torch.Tensor, normalised: bool) -> torch.Tensor:
    """functions.py's DiffLoss: the mean of the squared entries of A^T B on batch-centred rows
    divided by their (detached) l2 norms; without ``normalised``, on the raw features."""
    if normalised:
        a, b = (h - h.mean(0, keepdim=True) for h in (a, b))
        a, b = (h / (h.norm(dim=1, keepdim=True).detach() + 1e-6) for h in (a, b))
    return (a.T @ b).pow(2).mean()


def cmd(x1: torch.Tensor, x2: torch.Tensor, moments: int = CMD_MOMENTS) -> torch.Tensor:
    """functions.py's CMD (central moment discrepancy, Zellinger et al. 2017): the distance of
    the means plus that of the central moments 2..moments."""
    m1, m2 = x1.mean(0), x2.mean(0)
    s1, s2 = x1 - m1, x2 - m2
    out = (m1 - m2).norm()
    for k in range(2, moments + 1):
        out = out + (s1.pow(k).mean(0) - s2.pow(k).mean(0)).norm()
    return out


def losses_of(out: dict, y: torch.Tensor, normalised: bool) -> dict[str, torch.Tensor]:
    """solver.py's four losses: cls (cross-entropy, its ur_funny criterion), diff (private vs
    shared per modality, and across the privates), cmd (shared features across modalities),
    recon (the projection from private + shared)."""
    (p1, p2), (s1, s2) = out["private"], out["shared"]
    return {"cls": F.cross_entropy(out["logits"], y),
            "diff": diff_loss(p1, s1, normalised) + diff_loss(p2, s2, normalised)
            + diff_loss(p1, p2, normalised),
            "cmd": cmd(s1, s2),
            "recon": sum(F.mse_loss(r, o) for r, o in zip(out["recon"], out["orig"])) / 2}


def _mean_norms(model: MISA, x: torch.Tensor) -> dict[str, float]:
    """The private and the shared features' mean row norms, averaged over the modalities."""
    with torch.no_grad():
        out = model(x)
    return {k: float(np.mean([float(h.norm(dim=1).mean()) for h in out[k]]))
            for k in ("private", "shared")}


def _shared_total_variance(model: MISA, x: torch.Tensor) -> float:
    """The shared features' total variance (sum of per-unit variances), over the modalities."""
    with torch.no_grad():
        return float(np.mean([float(h.var(0).sum()) for h in model(x)["shared"]]))


def misa_truth(model: MISA, x: torch.Tensor, y: torch.Tensor, peaks: dict,
               start_variance: float) -> dict:
    """What the features became on the test images, without gradprobe."""
    with torch.no_grad():
        out = model(x)
    end = _mean_norms(model, x)
    pairs = [(out["private"][0], out["shared"][0]), (out["private"][1], out["shared"][1]),
             (out["private"][0], out["private"][1])]
    pairs = [(a.double().numpy(), b.double().numpy()) for a, b in pairs]
    truth = {}
    for k in ("private", "shared"):
        truth[f"{k}_norm"] = end[k]
        truth[f"{k}_peak_ratio"] = end[k] / peaks[k]
    truth["shared_variance_ratio"] = _shared_total_variance(model, x) / start_variance
    truth["shared_saturated"] = float(np.mean([((h < 0.01) | (h > 0.99)).float().mean()
                                               for h in out["shared"]]))
    truth["cka"] = float(np.mean([linear_cka(a, b) for a, b in pairs[:2]]))
    truth["cka_privates"] = linear_cka(*pairs[2])
    perm = np.random.default_rng(0).permutation(len(x))
    truth["corr_excess"] = float(np.mean([max_abs_correlation(a, b) - max_abs_correlation(a, b[perm])
                                          for a, b in pairs[:2]]))
    truth["recon_mse"] = float(sum(F.mse_loss(r, o) for r, o in zip(out["recon"], out["orig"])) / 2)
    truth["acc"] = float((out["logits"].argmax(1) == y).float().mean())
    return truth


def train(variant: str, seed: int, log: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = MISA()
    opt = torch.optim.Adam(model.parameters(), lr=LR["code" if variant in CODE_LR else "fast"])
    weights = dict(WEIGHTS)
    if variant == "no-diff":
        weights["diff"] = 0.0
    normalised = variant != "raw-diff"
    probe = gradprobe.Probe(model, run_file=log, roles=ROLES)
    probe.watch_latent("shared")
    probe.watch_latent("private")
    stream = batches(len(x_tr), BATCH, gen)
    peaks = {"private": 0.0, "shared": 0.0}
    start_variance = _shared_total_variance(model, x_te)
    with probe:
        for step in range(STEPS):
            if step % NORM_EVERY == 0:
                peaks = {k: max(v, _mean_norms(model, x_te)[k]) for k, v in peaks.items()}
            idx = next(stream)
            out = model(x_tr[idx])
            probe.observe(shared=out["shared"][0], private=out["private"][0])
            probe.backward(losses_of(out, y_tr[idx], normalised), weights=weights)
            nn.utils.clip_grad_value_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad()
    model.eval()
    return misa_truth(model, x_te, y_te, peaks, start_variance)


FAMILY = Family(
    name="misa",
    source="Hazarika, Zimmermann & Poria 2020 (MISA); declare-lab/MISA",
    train=train,
    variants=(
        Variant("healthy", True, "the code's normalised DiffLoss, CMD, reconstruction, task",
                must_not=("orthogonality-vanishing", "latent-dependence",
                          "representation-collapse")),
        Variant("raw-diff", False, "DiffLoss on the raw sigmoid features",
                expected=(Expect("orthogonality-vanishing", "private"),
                          Expect("latent-dependence", "shared|private")),
                allowed=(Expect("orthogonality-vanishing", "diff"),)),
        Variant("lr-1e-3", False, "the code's losses at lr 1e-3: shared code constant",
                expected=(Expect("representation-collapse", "shared"),)),
        Variant("no-diff", False, "diff weight 0",
                expected=(Expect("latent-dependence", "shared|private"),)),
    ),
    seeds=(0, 1),
)
