"""Each loss's weighted gradient where it acts: per shared layer, from the recorded per-layer
blocks of the Gram matrix (``grad_gram_layer``), for ``gradient-swamping`` and, pair by pair
(``layer_pair``, ``pair_on_layers``), for ``gradient-conflict``.

On layer l at a probe step, loss k's weighted gradient norm is ``|w_k| sqrt(G_l[k, k])``. Its
ratio on the layer is that norm over the largest competing loss's on the same layer (itself
included, so at most 1); a layer counts for loss k where k and at least one other competing
loss have a gradient on it (the layers they both reach). The loss's ratio at the step is the
median of its per-layer ratios over those layers: it is swamped where it is drowned on most
of the layers it shares, each layer one vote. Neither the largest layer (a norm over the
whole set: an embedding that the task dominates by construction hides what the loss holds
on a router above it) nor one layer alone (a maximum: a PINN's boundary term holds a third
of the output layer while drowned on every hidden layer, and is harmed) decides.

A pair of losses is judged where it fights: on the layers both reach whose own cosine is
persistently negative, their blocks summed. Unlike swamping's vote, no aggregate over every
shared layer: two tasks fighting over a shared output layer agree on the trunk below it, and
two tasks fighting over a trunk can look orthogonal on the head above it.
"""

from __future__ import annotations

import numpy as np

from gradprobe.record import Run
from gradprobe.record.quantities import GRAD_GRAM_LAYER, WEIGHT

from .._series import get, held_share, median


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


def layer_pair(blocks: np.ndarray, weights: np.ndarray, a: int, b: int) -> dict[str, np.ndarray]:
    """Losses ``a`` and ``b`` on each layer they both reach, for ``gradient-conflict``.

    ``blocks`` [T, L, K, K], ``weights`` [K, T]. Per layer and step (NaN where either loss has
    no gradient on the layer): ``cosine`` [L, T], G_l[a, b] / sqrt(G_l[a, a] G_l[b, b]), and
    ``undone_a`` / ``undone_b`` [L, T], the share of one loss's own first-order descent on the
    layer that the other's weighted gradient undoes, -w_b G_l[a, b] / (w_a G_l[a, a]) for a,
    clipped to [0, 1] (``_series.descent_undone`` on the layer alone); ``magnitude`` [L, T],
    PCGrad's magnitude similarity 2 |g_a| |g_b| / (|g_a|^2 + |g_b|^2) (of the unweighted
    gradients, as the recorded ``magnitude_similarity``);
    ``shared`` [L, T] marks the layers both reach."""
    gram = blocks[:, :, [a, b]][:, :, :, [a, b]]  # [T, L, 2, 2]
    own_a, own_b, cross = gram[..., 0, 0], gram[..., 1, 1], gram[..., 0, 1]
    shared = (own_a > 0) & (own_b > 0) & np.isfinite(cross)
    w_a, w_b = weights[a][:, None], weights[b][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.where(shared, cross / np.sqrt(own_a * own_b), np.nan)
        undone_a = np.where(shared, np.clip(-w_b * cross / (w_a * own_a), 0.0, 1.0), np.nan)
        undone_b = np.where(shared, np.clip(-w_a * cross / (w_b * own_b), 0.0, 1.0), np.nan)
        magnitude = np.where(shared, 2 * np.sqrt(own_a * own_b) / (own_a + own_b), np.nan)
    return {"cosine": cosine.T, "undone_a": undone_a.T, "undone_b": undone_b.T,
            "magnitude": magnitude.T, "shared": shared.T}


def layer_weights(run: Run, steps: np.ndarray) -> np.ndarray:
    """[K, T]: each loss's recorded weight at ``steps`` (1 where none was recorded)."""
    return np.vstack([np.interp(steps, *get(run, WEIGHT, n)) if run.has(WEIGHT, n)
                      else np.ones(len(steps)) for n in run.losses])


def pair_on_layers(run: Run, blocks: tuple | None, pair: tuple[str, str], steps: np.ndarray,
                   judged: np.ndarray, median_cosine: float, share: float) -> dict | None:
    """The pair where it fights: on the layers both losses reach, the layers whose cosine
    (``layer_pair``) has its median over the ``judged`` steps at most ``median_cosine`` and
    is negative on at least ``share`` of them; over those layers together (their blocks
    summed: the Gram matrix of the gradients restricted to their parameters) per step the
    cosine, each loss's descent undone (keyed by loss name) and "tragic" (cos <= -magnitude
    similarity), NaN at steps without blocks. None where the run holds no blocks or they
    miss a judged step; ``layers`` empty where the pair fights on no layer, ``everywhere``
    where it fights on every layer both reach."""
    if blocks is None or not set(pair) <= set(run.losses):
        return None
    block_steps, layers, grams = blocks
    if not np.isin(steps[judged], block_steps).all():
        return None
    at = np.isin(steps, block_steps)
    k = [run.losses.index(n) for n in pair]
    gram = np.full((len(steps), len(layers), 2, 2), np.nan)
    gram[at] = grams[np.searchsorted(block_steps, steps[at])][:, :, k][:, :, :, k]
    weights = np.ones((2, len(steps)))
    weights[:, at] = layer_weights(run, steps[at])[k]
    cosine = layer_pair(gram, weights, 0, 1)["cosine"][:, judged]
    medians = {layer: median(cosine[i]) for i, layer in enumerate(layers)}
    fight = [i for i, layer in enumerate(layers) if medians[layer] <= median_cosine and
             held_share(steps[judged], cosine[i] < 0) >= share]
    together = layer_pair(gram[:, fight].sum(axis=1, keepdims=True), weights, 0, 1)
    return {"cosine": together["cosine"][0], pair[0]: together["undone_a"][0],
            pair[1]: together["undone_b"][0],
            "tragic": together["cosine"][0] <= -together["magnitude"][0],
            "layers": [layers[i] for i in fight], "layer_cosines": medians,
            "everywhere": len(fight) == sum(np.isfinite(m) for m in medians.values())}
