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
    # (first column, end column, block, in the core set) of the Jacobian rows
    spans: list[tuple[int, int, int, bool]]
    routed: list[tuple[int, Tensor, bool]]  # (block, K x K Gram of a routed layer, in the core)

    def grams(self, jacobian: Tensor | None) -> tuple[Tensor, Tensor]:
        """The Gram matrix of the core set [K, K] and the blocks G_l [L, K, K] (float64; every
        block has at least one part)."""
        parts: list[list[Tensor]] = [[] for _ in self.names]
        core: list[Tensor] = []
        pieces = [] if jacobian is None else \
            [(jacobian[:, a:b], block, in_core) for a, b, block, in_core in self.spans]
        for rows, block, in_core in pieces:
            part = rows @ rows.T
            parts[block].append(part)
            if in_core:
                core.append(part)
        for block, gram, in_core in self.routed:
            parts[block].append(gram)
            if in_core:
                core.append(gram)
        blocks = torch.stack([functools.reduce(operator.add, p) for p in parts])
        if len(core) == sum(len(p) for p in parts):
            return blocks.sum(dim=0), blocks
        return functools.reduce(operator.add, core), blocks


class LayerBlocks:
    """The block of each probed parameter, found once per probed set; ``core``: the ids of the
    shared set the Gram matrix is recorded on (None: all of them). The probe takes the
    per-loss gradients on a wider set than the core where it records the blocks of the whole
    shared set (per_loss.shared_set)."""

    def __init__(self, names: Mapping[int, str]):
        self._names = names  # id -> parameter name (the probe's, updated in place under FSDP2)
        self.core: set[int] | None = None
        self._shared: tuple[int, ...] = ()
        self._block: dict[int, int] = {}
        self._block_names: list[str] = []

    def in_core(self, param: Tensor) -> bool:
        return self.core is None or id(param) in self.core

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
        spans: list[tuple[int, int, int, bool]] = []
        column = 0
        for p in rows:
            block, end, in_core = self._block[id(p)], column + p.numel(), self.in_core(p)
            if spans and spans[-1][2:] == (block, in_core) and spans[-1][1] == column:
                spans[-1] = (spans[-1][0], end, block, in_core)
            else:
                spans.append((column, end, block, in_core))
            column = end
        routed_blocks = [(self._block[id(next(layer.parameters()))], gram,
                          self.in_core(next(layer.parameters()))) for layer, gram in routed]
        return BlockLayout(list(self._block_names), spans, routed_blocks)
