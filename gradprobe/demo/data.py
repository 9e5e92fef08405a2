"""Seeded synthetic data with the shape of the record-22 problem.

A massively parallel reporter assay, simplified. Each measured sequence is a one-hot DNA
*insert* carrying planted motifs, followed by a short *tag* region; it is measured in a cell
line of one of two lineages (epithelial, fibroblast) and gives a binary outcome y drawn from a
known logistic ground truth, so the best achievable accuracy is known exactly:

- **The sequence acts the same way everywhere** (one motif program ``w``: what ``z_I`` is meant
  to capture) **but the cell line decides how strongly**: chromatin is open in epithelial
  lines (high gain) and mostly closed in fibroblasts (low gain), and each line has its own
  baseline activity. ``logit = gain_c * w . (m - plant_p) + baseline_c`` -- an interaction
  between sequence and cell line, not an offset.
- **The environment encoder sees a context vector per sample**: a fixed random projection of
  the line's lineage, log gain and baseline (its measured chromatin profile) plus measurement
  noise, so a held-out cell line is describable from its context.
- **A shortcut exists only in the training lines.** The training lines were assayed with a
  protocol whose sorting step ligated each line's own barcode to the sequences it recovered,
  more often to active ones: in a training line the tag region carries that line's barcode
  with probability ``shortcut[0]`` when y = 1 and ``shortcut[1]`` when y = 0, random bases
  otherwise. The barcode is a cell-line-specific sequence feature that predicts the label
  there. The held-out lines were assayed without that bias: their barcode appears at a rate
  that does not depend on y. A model whose ``z_I`` encodes cell-line identity can use the
  barcodes; one whose ``z_I`` is free of cell-line identity (record-22: I(z_I; c) small)
  cannot, and must learn the motifs, which is what held-out lines need.

The ground truth ``prob`` is P(y = 1 | insert, cell line). In held-out lines the tag carries
no information, so ``bayes_accuracy`` there is the best any model can do; in training lines
the tag adds information, so a model can beat it there (by using the shortcut).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = ["Split", "DecouplingData", "make_data", "scan_motifs", "LINEAGES"]

LINEAGES = ("epithelial", "fibroblast")


@dataclass
class Split:
    """One split: ``x`` [N, 4, L] one-hot (insert then tag region), ``y`` [N] in {0, 1}, ``cell``
    [N] cell-line ids, ``context`` [N, context_dim], ``prob`` [N] ground-truth P(y=1 | insert,
    cell line), ``motifs`` [N, K] motif presence (found by scanning the final insert),
    ``tagged`` [N] whether the tag region carries the line's barcode."""

    x: torch.Tensor
    y: torch.Tensor
    cell: torch.Tensor
    context: torch.Tensor
    prob: torch.Tensor
    motifs: torch.Tensor
    tagged: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def bayes_accuracy(self) -> float:
        """Expected accuracy of the ground-truth rule (predict 1 iff prob > 0.5): mean max(p, 1 - p).
        The best achievable accuracy wherever the tag carries no information (held-out lines)."""
        p = self.prob.double()
        return float(torch.maximum(p, 1 - p).mean())

    @property
    def bayes_empirical(self) -> float:
        """Accuracy of the ground-truth rule on the labels actually drawn (noisy estimate of the above)."""
        return float(((self.prob > 0.5).float() == self.y).float().mean())


@dataclass
class DecouplingData:
    train: Split
    val: Split
    heldout: Split
    train_cells: list[int]
    heldout_cells: list[int]
    lineage: np.ndarray            # [C] 0 = epithelial, 1 = fibroblast
    motif_seqs: np.ndarray         # [K, motif_len] bases 0..3
    barcodes: np.ndarray           # [C, tag_len] bases 0..3: each line's barcode
    motif_weights: np.ndarray      # [K] the intrinsic motif program w
    weights: np.ndarray            # [C, K] ground-truth motif weights per cell line (gain_c * w)
    bias: np.ndarray               # [C] logit with no motif
    gain: np.ndarray               # [C] how strongly the line reads the sequence
    baseline: np.ndarray           # [C] logit of an average sequence
    cell_features: np.ndarray      # [C, context_dim] noise-free context of each cell line
    shortcut: Optional[tuple[float, float]]  # P(barcode | y=1), P(barcode | y=0) in training lines
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.weights.shape[0])

    @property
    def context_dim(self) -> int:
        return int(self.cell_features.shape[1])

    def true_prob(self, motifs: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """Ground-truth P(y = 1) for motif-presence rows and cell ids."""
        logit = (motifs * self.weights[cells]).sum(1) + self.bias[cells]
        return 1.0 / (1.0 + np.exp(-logit))


def scan_motifs(seqs: np.ndarray, motif_seqs: np.ndarray) -> np.ndarray:
    """[N, K] bool: does motif k occur (exact match) anywhere in sequence n? ``seqs`` [N, L] in 0..3."""
    k, ml = motif_seqs.shape
    powers = 4 ** np.arange(ml, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(seqs.astype(np.int64), ml, axis=1)  # [N, L-ml+1, ml]
    codes = windows @ powers                                                               # [N, L-ml+1]
    motif_codes = motif_seqs.astype(np.int64) @ powers                                     # [K]
    return (codes[:, :, None] == motif_codes[None, None, :]).any(1)


def _background(rng, cells, composition, length):
    """[N, length] bases drawn from each sample's cell-line base composition [C, 4]."""
    cum = np.cumsum(composition[cells], axis=1)[:, None, :3]                    # [N, 1, 3]
    return (rng.random((len(cells), length))[:, :, None] >= cum).sum(2).astype(np.int8)


def make_data(seed: int = 0, n_cells: int = 10, heldout_cells: tuple[int, ...] = (4, 9),
              n_train_per_cell: int = 192, n_val_per_cell: int = 200, n_heldout_per_cell: int = 1000,
              seq_len: int = 100, n_motifs: int = 6, motif_len: int = 8, plant_p: float = 0.4,
              tag_len: int = 10, shortcut: Optional[tuple[float, float]] = (0.8, 0.1),
              lineage_gain: tuple[float, float] = (2.0, 0.1), lineage_baseline: tuple[float, float] = (0.5, -1.5),
              line_spread: float = 0.3, context_dim: int = 16, line_identity: float = 0.5,
              context_noise: float = 0.3,
              composition_concentration: float | None = 30.0) -> DecouplingData:
    """Generate the synthetic record-22 problem, deterministically from ``seed``.

    Cell lines ``0 .. n_cells/2 - 1`` are epithelial, the rest fibroblast. Each sequence has
    ``seq_len`` bases: an insert of ``seq_len - tag_len`` bases with motifs planted (each with
    probability ``plant_p``; presence is read back by scanning the insert) and a tag region of
    ``tag_len`` bases. Ground truth, for motif presence ``m`` and cell line ``c`` of lineage ``l``::

        gain_c = lineage_gain[l] * exp(N(0, line_spread^2))
        baseline_c = lineage_baseline[l] + N(0, line_spread^2)
        logit = gain_c * w . (m - plant_p) + baseline_c,    y ~ Bernoulli(sigmoid(logit))

    with one motif program ``w`` (weights +-[1.5, 2.5]). ``heldout_cells`` (default one per
    lineage) appear only in the held-out split; ``val`` holds fresh samples of the training
    lines, assayed like them (so it carries the shortcut too).

    ``shortcut = (p1, p0)``: in training lines the tag region is the line's barcode with
    probability ``p1`` if y = 1 and ``p0`` if y = 0; in held-out lines with probability
    ``(p1 + p0) / 2`` whatever y. ``None``: no line carries its barcode (random tag regions).
    ``n_train_per_cell`` is small, as measured per-cell-line data is. Each line's library also
    has its own background base composition (Dirichlet, ``composition_concentration``; ``None``:
    uniform), a second, label-free trace of the cell line in the sequence.
    """
    if n_cells < 4 or n_cells % 2:
        raise ValueError("n_cells must be even and >= 4")
    if n_motifs < 1 or not 0 < tag_len < seq_len - motif_len:
        raise ValueError("need n_motifs >= 1 and 0 < tag_len < seq_len - motif_len")
    if shortcut is not None and not all(0.0 <= q <= 1.0 for q in shortcut):
        raise ValueError("shortcut probabilities must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    lineage = np.repeat(np.arange(2), n_cells // 2)
    motif_seqs = rng.integers(0, 4, size=(n_motifs, motif_len), dtype=np.int8)
    barcodes = rng.integers(0, 4, size=(n_cells, tag_len), dtype=np.int8)
    if composition_concentration is None:
        composition = np.full((n_cells, 4), 0.25)
    else:
        if not composition_concentration > 0:
            raise ValueError("composition_concentration must be positive (or None)")
        composition = rng.dirichlet(np.full(4, composition_concentration / 4.0), size=n_cells)

    w = rng.choice([-1.0, 1.0], n_motifs) * rng.uniform(1.5, 2.5, n_motifs)
    gain = np.asarray(lineage_gain)[lineage] * np.exp(rng.normal(0.0, line_spread, n_cells))
    baseline = np.asarray(lineage_baseline)[lineage] + rng.normal(0.0, line_spread, n_cells)
    weights = gain[:, None] * w[None, :]
    bias = baseline - (weights * plant_p).sum(1)

    raw = np.column_stack([np.eye(2)[lineage], np.log(gain), baseline])   # [C, 4]: the line's profile
    proj = rng.normal(0.0, 1.0, size=(raw.shape[1], context_dim)) / np.sqrt(raw.shape[1])
    identity = rng.normal(0.0, line_identity, size=(n_cells, context_dim))    # what else makes a line itself
    cell_features = (raw @ proj + identity).astype(np.float32)

    heldout = sorted(set(int(c) for c in heldout_cells))
    if any(c < 0 or c >= n_cells for c in heldout):
        raise ValueError("heldout_cells out of range")
    train_cells = [c for c in range(n_cells) if c not in heldout]
    insert_len = seq_len - tag_len

    def sample(cells: list[int], n: int, biased_assay: bool) -> Split:
        cells = np.repeat(np.asarray(cells, dtype=np.int64), n)
        seqs = _background(rng, cells, composition, seq_len)
        for j in range(n_motifs):
            rows = np.nonzero(rng.random(len(cells)) < plant_p)[0]
            pos = rng.integers(0, insert_len - motif_len + 1, size=rows.shape[0])
            seqs[rows[:, None], pos[:, None] + np.arange(motif_len)] = motif_seqs[j]
        motifs = scan_motifs(seqs[:, :insert_len], motif_seqs).astype(np.float32)
        logit = (motifs * weights[cells]).sum(1) + bias[cells]
        prob = 1.0 / (1.0 + np.exp(-logit))
        y = (rng.random(len(cells)) < prob).astype(np.float32)
        if shortcut is None:
            p_tag = np.zeros(len(cells))
        elif biased_assay:
            p_tag = np.where(y == 1, shortcut[0], shortcut[1])
        else:
            p_tag = np.full(len(cells), (shortcut[0] + shortcut[1]) / 2)
        tagged = rng.random(len(cells)) < p_tag
        seqs[tagged, insert_len:] = barcodes[cells[tagged]]
        ctx = cell_features[cells] + rng.normal(0.0, context_noise, size=(len(cells), context_dim)).astype(np.float32)
        onehot = np.eye(4, dtype=np.float32)[seqs].transpose(0, 2, 1)
        return Split(x=torch.from_numpy(np.ascontiguousarray(onehot)), y=torch.from_numpy(y),
                     cell=torch.from_numpy(cells), context=torch.from_numpy(ctx),
                     prob=torch.from_numpy(prob.astype(np.float32)), motifs=torch.from_numpy(motifs),
                     tagged=torch.from_numpy(tagged))

    train = sample(train_cells, n_train_per_cell, biased_assay=True)
    val = sample(train_cells, n_val_per_cell, biased_assay=True)
    held = sample(heldout, n_heldout_per_cell, biased_assay=False)
    return DecouplingData(train=train, val=val, heldout=held, train_cells=train_cells, heldout_cells=heldout,
                          lineage=lineage, motif_seqs=motif_seqs, barcodes=barcodes, motif_weights=w,
                          weights=weights, bias=bias, gain=gain, baseline=baseline, cell_features=cell_features,
                          shortcut=None if shortcut is None else (float(shortcut[0]), float(shortcut[1])),
                          seed=seed,
                          meta={"seq_len": seq_len, "insert_len": insert_len, "tag_len": tag_len,
                                "motif_len": motif_len, "plant_p": plant_p, "context_noise": context_noise,
                                "lineages": LINEAGES, "composition": composition,
                                "composition_concentration": composition_concentration,
                                "n_train_per_cell": n_train_per_cell})
