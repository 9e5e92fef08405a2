"""Each loss's weighted gradient where it acts: per shared layer, from the recorded per-layer
blocks of the Gram matrix (``grad_gram_layer``), for ``gradient-swamping``.

On layer l at a probe step, loss k's weighted gradient norm is ``|w_k| sqrt(G_l[k, k])``. Its
ratio on the layer is that norm over the largest competing loss's on the same layer (itself
included, so at most 1); a layer counts for loss k where k and at least one other competing
loss have a gradient on it (the layers they both reach). The loss's ratio at the step is the
median of its per-layer ratios over those layers: it is swamped where it is drowned on most
of the layers it shares, each layer one vote. Neither the largest layer (a norm over the
whole set: an embedding that the task dominates by construction hides what the loss holds
on a router above it) nor one layer alone (a maximum: a PINN's boundary term holds a third
of the output layer while drowned on every hidden layer, and is harmed) decides.
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
    """Per loss and step, on the layers it shares (see the module docstring).

    ``blocks`` [T, L, K, K], ``weights`` [K, T] (the loss weights at those steps),
    ``competing`` [K] (losses that count as competitors). Returns ``ratio`` [K, T] (NaN where
    the loss shares no layer with a competitor), ``per_layer`` [K, L, T] (the ratio on each
    layer, NaN where not shared) and ``dominant`` [K, T] (the competing loss with the largest
    weighted gradient over the layers loss k shares; -1 where none)."""
    diag = np.clip(np.diagonal(blocks, axis1=2, axis2=3), 0.0, None)  # [T, L, K]
    energy = diag * np.square(weights.T)[:, None, :]  # squared weighted norms
    norm = np.sqrt(energy)
    rivals = np.where(competing[None, None, :] & np.isfinite(norm), norm, -np.inf)
    largest = rivals.max(axis=2)  # [T, L]
    k_count, steps = blocks.shape[2], len(blocks)
    ratio = np.full((k_count, steps), np.nan)
    per_layer = np.full((k_count, blocks.shape[1], steps), np.nan)
    dominant = np.full((k_count, steps), -1)
    for k in range(k_count):
        others = np.delete(rivals, k, axis=2).max(axis=2)
        shared = (norm[:, :, k] > 0) & np.isfinite(norm[:, :, k]) & (others > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            on_layer = np.where(shared, norm[:, :, k] / np.maximum(largest, norm[:, :, k]),
                                np.nan)
        per_layer[k] = on_layer.T
        any_shared = shared.any(axis=1)
        ratio[k, any_shared] = np.nanmedian(on_layer[any_shared], axis=1)
        pushed = np.where(shared[:, :, None] & competing[None, None, :],
                          np.nan_to_num(energy), 0.0).sum(axis=1)  # [T, K]
        dominant[k] = np.where(any_shared, pushed.argmax(axis=1), -1)
    return ratio, per_layer, dominant
