"""Seeded synthetic data with the shape of the record-22 problem.

One-hot DNA sequences carrying planted motifs; cell lines in two lineages (epithelial,
fibroblast), each with its own motif weights (the lineage decides which motifs matter, the
cell line adds a gain, an offset and its own small deviations -- an interaction between
sequence and environment, not just an offset); a binary outcome drawn from a known logistic
ground truth, so the Bayes-optimal accuracy is known exactly.

The environment encoder sees a cell-line *context vector*: a fixed random projection of the
cell line's ground-truth parameters (lineage, gain, offset, motif weights) plus per-sample
measurement noise. A held-out cell line is therefore in principle describable from its
context, as a new cell line with a measured chromatin profile would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Split", "DecouplingData", "make_data", "scan_motifs", "LINEAGES"]

LINEAGES = ("epithelial", "fibroblast")


@dataclass
class Split:
    """One split: ``x`` [N, 4, L] one-hot, ``y`` [N] in {0, 1}, ``cell`` [N] cell-line ids,
    ``context`` [N, context_dim], ``prob`` [N] ground-truth P(y=1 | sequence, cell line),
    ``motifs`` [N, K] motif presence (found by scanning the final sequence)."""

    x: torch.Tensor
    y: torch.Tensor
    cell: torch.Tensor
    context: torch.Tensor
    prob: torch.Tensor
    motifs: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def bayes_accuracy(self) -> float:
        """Expected accuracy of the Bayes rule (predict 1 iff prob > 0.5): mean max(p, 1 - p)."""
        p = self.prob.double()
        return float(torch.maximum(p, 1 - p).mean())

    @property
    def bayes_empirical(self) -> float:
        """Accuracy of the Bayes rule on the labels actually drawn (noisy estimate of the above)."""
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
    weights: np.ndarray            # [C, K] ground-truth motif weights per cell line
    bias: np.ndarray               # [C]
    gain: np.ndarray               # [C]
    cell_features: np.ndarray      # [C, context_dim] noise-free context of each cell line
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
    n, length = seqs.shape
    k, ml = motif_seqs.shape
    powers = 4 ** np.arange(ml, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(seqs.astype(np.int64), ml, axis=1)  # [N, L-ml+1, ml]
    codes = windows @ powers                                                               # [N, L-ml+1]
    motif_codes = motif_seqs.astype(np.int64) @ powers                                     # [K]
    return (codes[:, :, None] == motif_codes[None, None, :]).any(1)


def _sample_split(rng, cells_per_sample, motif_seqs, plant_p, seq_len, data_fn, composition):
    n = cells_per_sample.shape[0]
    k, ml = motif_seqs.shape
    # background bases drawn from each sample's cell-line composition [C, 4]
    cum = np.cumsum(composition[cells_per_sample], axis=1)[:, None, :3]          # [N, 1, 3]
    seqs = (rng.random((n, seq_len))[:, :, None] >= cum).sum(2).astype(np.int8)   # [N, L] in 0..3
    for j in range(k):
        rows = np.nonzero(rng.random(n) < plant_p)[0]
        pos = rng.integers(0, seq_len - ml + 1, size=rows.shape[0])
        seqs[rows[:, None], pos[:, None] + np.arange(ml)] = motif_seqs[j]
    motifs = scan_motifs(seqs, motif_seqs).astype(np.float32)
    return data_fn(seqs, motifs, cells_per_sample)


def make_data(seed: int = 0, n_cells: int = 10, heldout_cells: tuple[int, ...] = (4, 9),
              n_train_per_cell: int = 128, n_val_per_cell: int = 200, n_heldout_per_cell: int = 1000,
              seq_len: int = 100, n_motifs: int = 8, motif_len: int = 8, plant_p: float = 0.4,
              context_dim: int = 16, context_noise: float = 0.3,
              composition_concentration: float | None = 30.0) -> DecouplingData:
    """Generate the synthetic record-22 problem, deterministically from ``seed``.

    Cell lines ``0 .. n_cells/2 - 1`` are epithelial, the rest fibroblast. Ground truth, for
    motif presence ``m`` in {0,1}^K and cell line ``c`` of lineage ``l``::

        w_c = gain_c * (w_shared + w_lineage[l]) + dev_c,   logit = w_c . m + b_c,
        y ~ Bernoulli(sigmoid(logit))

    ``w_shared`` weighs motifs 0..3 (all lineages), ``w_lineage`` motifs 4..5 for epithelial
    and 6..7 for fibroblast lines (the lineage changes which motifs matter), ``gain_c`` in
    [0.5, 1.5] scales the sequence effect per cell line, ``dev_c`` are small per-line
    deviations, and ``b_c`` centres each line (plus a per-line offset). ``heldout_cells``
    (default one per lineage) appear only in the held-out split; ``val`` holds fresh samples
    of the training cell lines.

    Two choices make the problem faithful to the record's data rather than convenient:

    - ``n_train_per_cell`` is small (128 sequences per cell line by default), as measured
      per-cell-line data is; the record's over-parameterised model can memorise it (its
      "L_task ~ 0" solution) while the validation loss climbs (biological point 3).
    - Each cell line's library has its own background base composition, drawn from a
      Dirichlet with ``composition_concentration`` (30: base frequencies differ by about
      +-0.08 between lines; ``None``: uniform bases for every line). Sequences measured in
      different cell lines therefore carry cell-line information, as real libraries do (GC
      bias of the assay, the cell line's accessible regions). The label does *not* depend on
      it; it is a shortcut the intrinsic encoder can use to learn per-cell-line biases, and
      the one the domain-adversarial loss exists to remove (I(z_I; c) small). With uniform
      bases the adversary has nothing to remove and is inert by construction.
    """
    if n_cells < 4 or n_cells % 2:
        raise ValueError("n_cells must be even and >= 4")
    if n_motifs < 4:
        raise ValueError("n_motifs must be >= 4")
    rng = np.random.default_rng(seed)
    lineage = np.repeat(np.arange(2), n_cells // 2)
    motif_seqs = rng.integers(0, 4, size=(n_motifs, motif_len), dtype=np.int8)
    if composition_concentration is None:
        composition = np.full((n_cells, 4), 0.25)
    else:
        if not composition_concentration > 0:
            raise ValueError("composition_concentration must be positive (or None)")
        composition = rng.dirichlet(np.full(4, composition_concentration / 4.0), size=n_cells)

    w_shared = np.zeros(n_motifs)
    n_shared = n_motifs // 2
    w_shared[:n_shared] = rng.choice([-1.0, 1.0], n_shared) * rng.uniform(1.0, 2.0, n_shared)
    w_lin = np.zeros((2, n_motifs))
    rest = np.arange(n_shared, n_motifs)
    half = len(rest) // 2
    w_lin[0, rest[:half]] = rng.choice([-1.0, 1.0], half) * rng.uniform(1.0, 2.0, half)
    w_lin[1, rest[half:]] = rng.choice([-1.0, 1.0], len(rest) - half) * rng.uniform(1.0, 2.0, len(rest) - half)
    gain = rng.uniform(0.5, 1.5, n_cells)
    dev = rng.normal(0.0, 0.25, size=(n_cells, n_motifs))
    weights = gain[:, None] * (w_shared[None, :] + w_lin[lineage]) + dev
    p_motif = plant_p  # centre each line's logit at its mean motif load, then add an offset
    bias = -(weights * p_motif).sum(1) + rng.normal(0.0, 0.5, n_cells)

    raw = np.column_stack([np.eye(2)[lineage], gain, bias, weights])   # [C, 4 + K]
    proj = rng.normal(0.0, 1.0, size=(raw.shape[1], context_dim)) / np.sqrt(raw.shape[1])
    cell_features = (raw @ proj).astype(np.float32)

    def to_split(seqs, motifs, cells):
        logit = (motifs * weights[cells]).sum(1) + bias[cells]
        prob = 1.0 / (1.0 + np.exp(-logit))
        y = (rng.random(len(cells)) < prob).astype(np.float32)
        ctx = cell_features[cells] + rng.normal(0.0, context_noise, size=(len(cells), context_dim)).astype(np.float32)
        onehot = np.eye(4, dtype=np.float32)[seqs].transpose(0, 2, 1)
        return Split(x=torch.from_numpy(np.ascontiguousarray(onehot)), y=torch.from_numpy(y),
                     cell=torch.from_numpy(cells.astype(np.int64)), context=torch.from_numpy(ctx),
                     prob=torch.from_numpy(prob.astype(np.float32)), motifs=torch.from_numpy(motifs))

    heldout = sorted(set(int(c) for c in heldout_cells))
    if any(c < 0 or c >= n_cells for c in heldout):
        raise ValueError("heldout_cells out of range")
    train_cells = [c for c in range(n_cells) if c not in heldout]
    splits = {}
    for name, cells, n in (("train", train_cells, n_train_per_cell), ("val", train_cells, n_val_per_cell),
                           ("heldout", heldout, n_heldout_per_cell)):
        cell_ids = np.repeat(np.asarray(cells, dtype=np.int64), n)
        splits[name] = _sample_split(rng, cell_ids, motif_seqs, plant_p, seq_len, to_split, composition)
    return DecouplingData(train=splits["train"], val=splits["val"], heldout=splits["heldout"],
                          train_cells=train_cells, heldout_cells=heldout, lineage=lineage,
                          motif_seqs=motif_seqs, weights=weights, bias=bias, gain=gain,
                          cell_features=cell_features, seed=seed,
                          meta={"seq_len": seq_len, "motif_len": motif_len, "plant_p": plant_p,
                                "context_noise": context_noise, "lineages": LINEAGES,
                                "composition": composition,
                                "composition_concentration": composition_concentration,
                                "n_train_per_cell": n_train_per_cell})
