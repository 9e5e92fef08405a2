"""The Gram matrix of a probe step split by layer: one K x K block per shared module.

The shared parameters are grouped by the module that owns them (``fc1.weight`` and
``fc1.bias``: block ``fc1``; a parameter of the model itself: block ``(model)``). The block of
layer l is ``G_l = J_l J_l^T``, J_l the columns of the per-loss Jacobian rows on that layer's
parameters (or, for a layer whose Gram matrix came from its inputs, that matrix:
layer_inputs.py); the blocks sum to the Gram matrix of the whole shared set, which is computed
as that sum. Everything stays on the device and travels in the probe step's one transfer.

The number of blocks is bounded by :data:`MAX_LAYER_BLOCKS`: beyond it, modules are merged
into their parents (every name cut to the same depth, the deepest level first) until the
count fits, down to one block for the whole model.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .graph import module_prefix

MAX_LAYER_BLOCKS = 32
MODEL_BLOCK = "(model)"  # the block of parameters that belong to the model itself


def block_names(parameter_names: Sequence[str], cap: int = MAX_LAYER_BLOCKS) -> list[str]:
    """Each parameter's block: its module's qualified name, cut to a common depth while there
    would be more than ``cap`` blocks."""
    modules = [module_prefix(n) for n in parameter_names]
    depth = max((m.count(".") + 1 for m in modules if m), default=0)
    keys = modules
    while len(set(keys)) > cap and depth > 0:
        depth -= 1
        keys = [".".join(m.split(".")[:depth]) for m in modules]
    return [k or MODEL_BLOCK for k in keys]


@dataclass
class BlockLayout:
    """Where each block's part of a probe step's Gram matrix comes from."""

    names: list[str]  # the blocks, in the order of the recorded blocks
    spans: list[tuple[int, int, int]]  # (first column, end column, block) of the Jacobian rows
    routed: list[tuple[int, Tensor]]  # (block, K x K Gram matrix of a routed layer)

    def blocks(self, jacobian: Tensor | None) -> Tensor:
        """[L, K, K] float64: G_l per block (every block has at least one part)."""
        parts: list[list[Tensor]] = [[] for _ in self.names]
        if jacobian is not None:
            for start, end, block in self.spans:
                rows = jacobian[:, start:end]
                parts[block].append(rows @ rows.T)
        for block, gram in self.routed:
            parts[block].append(gram)
        return torch.stack([functools.reduce(operator.add, p) for p in parts])


class LayerBlocks:
    """The block of each shared parameter, found once per shared set."""

    def __init__(self, names: Mapping[int, str]):
        self._names = names  # id -> parameter name (the probe's, updated in place under FSDP2)
        self._shared: tuple[int, ...] = ()
        self._block: dict[int, int] = {}
        self._block_names: list[str] = []

    def layout(self, shared: Sequence[Tensor], rows: Sequence[Tensor],
               routed: Sequence[tuple[torch.nn.Module, Tensor]]) -> BlockLayout:
        """The layout of a step whose Jacobian rows are on ``rows`` (in column order) and whose
        ``routed`` layers gave their Gram matrices from their inputs."""
        key = tuple(id(p) for p in shared)
        if key != self._shared:
            keys = block_names([self._names.get(id(p), "") for p in shared])
            self._block_names = list(dict.fromkeys(keys))
            index = {name: i for i, name in enumerate(self._block_names)}
            self._block = {id(p): index[k] for p, k in zip(shared, keys)}
            self._shared = key
        spans: list[tuple[int, int, int]] = []
        column = 0
        for p in rows:
            block, end = self._block[id(p)], column + p.numel()
            if spans and spans[-1][2] == block and spans[-1][1] == column:
                spans[-1] = (spans[-1][0], end, block)
            else:
                spans.append((column, end, block))
            column = end
        routed_blocks = [(self._block[id(next(layer.parameters()))], gram)
                         for layer, gram in routed]
        return BlockLayout(list(self._block_names), spans, routed_blocks)
