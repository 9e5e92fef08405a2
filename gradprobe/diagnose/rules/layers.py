"""Each loss's weighted gradient where it acts: per shared layer, from the recorded per-layer
blocks of the Gram matrix (``grad_gram_layer``), for ``gradient-swamping``.

On layer l at a probe step, loss k's weighted gradient norm is ``|w_k| sqrt(G_l[k, k])``. Its
ratio on the layer is that norm over the largest competing loss's on the same layer (itself
included, so at most 1); a layer counts for loss k where k and at least one other competing
loss have a gradient on it (the layers they both reach). The loss's ratio at the step is the
mean of its per-layer ratios weighted by where it acts: each layer's share of its own squared
weighted gradient over those layers. A loss is swamped where most of what it pushes is
drowned by another loss's push on the same parameters; a large layer that another loss
dominates by construction (an embedding feeding a router) does not hide what it holds on the
layer it acts on (the router), and a small layer that it barely touches cannot clear it.
"""

from __future__ import annotations

import numpy as np

from gradprobe.record import Run
from gradprobe.record.quantities import GRAD_GRAM_LAYER


def layer_blocks(run: Run) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """``(steps, layers, G)`` with G [T, L, K, K] (losses in ``run.losses`` order) over the
    probe steps every layer was recorded at; None for a run file without blocks."""
    layers = run.array_names(GRAD_GRAM_LAYER)
    if not layers:
        return None
    loaded = [run.arrays(GRAD_GRAM_LAYER, layer) for layer in layers]
    common = set(loaded[0][0].tolist()).intersection(*(s.tolist() for s, _ in loaded[1:]))
    steps = np.array(sorted(common), dtype=np.int64)
    k = len(run.losses)
    blocks = np.empty((len(steps), len(layers), k, k))
    for i, (s, grams) in enumerate(loaded):
        at = {int(step): j for j, step in enumerate(s)}
        for t, step in enumerate(steps):
            gram = np.asarray(grams[at[int(step)]], dtype=np.float64)
            if gram.shape != (k, k):
                return None
            blocks[t, i] = gram
    return steps, layers, blocks


def layer_ratios(blocks: np.ndarray, weights: np.ndarray, competing: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per loss and step, where it acts (see the module docstring).

    ``blocks`` [T, L, K, K], ``weights`` [K, T] (the loss weights at those steps),
    ``competing`` [K] (losses that count as competitors). Returns ``ratio`` [K, T] (NaN where
    the loss shares no layer with a competitor), ``per_layer`` [K, L, T] (the ratio on each
    layer, NaN where not shared) and ``dominant`` [K, T] (the index of the loss with the
    largest weighted gradient on the layer where loss k acts most; -1 where none)."""
    diag = np.clip(np.diagonal(blocks, axis1=2, axis2=3), 0.0, None)  # [T, L, K]
    energy = diag * np.square(weights.T)[:, None, :]  # squared weighted norms
    norm = np.sqrt(energy)
    with np.errstate(invalid="ignore"):
        rivals = np.where(competing[None, None, :] & np.isfinite(norm), norm, -np.inf)
    largest = rivals.max(axis=2)  # [T, L]
    dominant_on = rivals.argmax(axis=2)
    k_count = blocks.shape[2]
    ratio = np.full((k_count, len(blocks)), np.nan)
    per_layer = np.full((k_count, blocks.shape[1], len(blocks)), np.nan)
    dominant = np.full((k_count, len(blocks)), -1)
    for k in range(k_count):
        others = np.delete(rivals, k, axis=2).max(axis=2) if k_count > 1 else largest
        shared = (norm[:, :, k] > 0) & (others > 0) & np.isfinite(norm[:, :, k])
        with np.errstate(divide="ignore", invalid="ignore"):
            on_layer = np.where(shared, norm[:, :, k] / np.maximum(largest, norm[:, :, k]),
                                np.nan)
        per_layer[k] = on_layer.T
        own = np.where(shared, energy[:, :, k], 0.0)
        total = own.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio[k] = np.where(total > 0, np.nansum(on_layer * own, axis=1) / total, np.nan)
        acts = np.argmax(own, axis=1)
        dominant[k] = np.where(total > 0, dominant_on[np.arange(len(blocks)), acts], -1)
    return ratio, per_layer, dominant
