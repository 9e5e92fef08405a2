"""The shared Linear (and Conv) layers' part of a probe step's Gram matrix, from the layers'
inputs and per-loss output gradients instead of per-loss weight gradients.

For a layer whose parameters all sit in the shared set, the probe takes each loss's gradient
with respect to the layer's *output* D_k (in the same one ``torch.autograd.grad`` per loss)
and adds ``G_ij = <D_i, S D_j>``, ``S = X X^T + 1``, to the Gram matrix of the other shared
parameters' Jacobian rows (layer_gram.py has the math and its reference). Autograd then forms
no per-loss weight gradient of that layer and the probe no K x P float64 Jacobian rows for it.

Only where it pays and only where it is exact; otherwise the layer's parameters go the
autograd way, as before, for that step:

- the inputs are captured by forward hooks that exist only between the ``after_backward``
  before a probe step and the next ``after_backward`` (:meth:`LayerInputs.arm`): a non-probe
  step runs no hook, and the first probe step (the shared set is not known before it) takes
  the autograd way;
- every use of the layer's parameters in the losses' graph must be a captured call whose
  input and output are unchanged since (``_version``), in the parameters' own dtype (no
  autocast); a tied weight used elsewhere, a call made before the hooks existed or an output
  changed in place by an ``inplace=True`` activation fails this and falls back;
- the cost model (:func:`~.layer_gram.input_route_pays`, from the shapes) must say that the
  N x N route takes fewer multiply-adds than K per-loss weight gradients: a Linear layer on
  a batch of a few hundred rows, rarely a convolution over long inputs.

On the assembled path the routed layer's ``.grad`` comes from the same rows: the weight
gradient of the weighted output gradient, ``(sum_k w_k D_k)^T X`` (and its column sums for the
bias), one product where the autograd way forms K; the cost model counts it.

Single process only: under DDP each rank sees its own rows X^r, and the sum of the ranks'
``<D_i^r, S^r D_j^r>`` misses the cross-rank terms of the global gradients' Gram matrix, so
there the probe keeps its Jacobian rows (they are all-reduced).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .layer_gram import SUPPORTED, call_rows, input_route_pays, layer_gram


@dataclass
class Call:
    """One forward call of a layer with gradients enabled."""

    input: Tensor
    output: Tensor
    input_version: int
    output_version: int

    def usable(self, layer: nn.Module) -> bool:
        """Unchanged since the call, no autocast, and a batched input for a convolution."""
        return (self.input._version == self.input_version
                and self.output._version == self.output_version
                and self.input.dtype == self.output.dtype
                and (isinstance(layer, nn.Linear)
                     or self.input.ndim == (3 if isinstance(layer, nn.Conv1d) else 4)))


@dataclass
class RoutedLayer:
    """A layer whose Gram matrix comes from its inputs: its calls, in the order their outputs
    are appended to the ``autograd.grad`` inputs, and once the per-loss gradients are taken,
    its rows (:func:`~.layer_gram.call_rows`): x [N, fan_in], d [K, N, out]."""

    layer: nn.Module
    calls: list[Call]
    x: Tensor | None = None
    d: Tensor | None = None

    def parameter_gradients(self, combined: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, gradient)`` of the layer for the output gradient rows ``combined``
        [N, out] (the weighted sum of d over the losses): what a backward would give."""
        with torch.no_grad():
            weight = self.layer.weight
            pairs = [(weight, (combined.T @ self.x).reshape(weight.shape))]
            if self.layer.bias is not None:
                pairs.append((self.layer.bias, combined.sum(dim=0)))
        return pairs


class LayerInputs:
    """The forward hooks of a probe step, on the shared set's supported layers."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._layers: list[nn.Module] = []
        self._shared_ids: frozenset[int] = frozenset()
        self._handles: list[Any] = []
        self._calls: dict[nn.Module, list[Call]] = {}

    def arm(self, shared: Sequence[Tensor] | None) -> None:
        """Hooks on for the next step when it is a probe step on ``shared`` (else None: hooks
        off); what the last step captured is dropped either way."""
        self._calls = {}
        if shared is None:
            self.disarm()
            return
        ids = frozenset(id(p) for p in shared)
        if ids != self._shared_ids:
            self.disarm()
            self._shared_ids = ids
            self._layers = [m for m in self.model.modules() if isinstance(m, SUPPORTED)
                            and getattr(m, "groups", 1) == 1 and _all_in(m, ids)]
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook) for m in self._layers]

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: nn.Module, inputs: tuple, output: Any) -> None:
        # Runs inside the user's forward: it only keeps references, and never raises.
        if torch.is_grad_enabled() and inputs and isinstance(inputs[0], Tensor) \
                and isinstance(output, Tensor):
            self._calls.setdefault(layer, []).append(
                Call(inputs[0], output, inputs[0]._version, output._version))

    def take(self, graphs: Sequence[dict], losses: int, assembling: bool) -> list[RoutedLayer]:
        """The captured layers that may take the input route this step, given the losses'
        reachable autograd nodes (``graph.reachable_nodes`` of each loss) and whether ``.grad``
        is assembled from the per-loss gradients."""
        calls, self._calls = self._calls, {}
        if not calls:
            return []
        nodes: dict = {}
        for graph in graphs:
            nodes.update(graph)
        accumulators = {id(v): node for node in nodes
                        if (v := getattr(node, "variable", None)) is not None}
        uses = Counter(id(child) for node in nodes for child, _ in node.next_functions
                       if child is not None)
        routed = []
        for layer, layer_calls in calls.items():
            used = [c for c in layer_calls if c.output.grad_fn in nodes]
            params = [p for p in layer.parameters() if p.requires_grad]
            if not used or not all(c.usable(layer) for c in used) or not all(
                    id(p) in accumulators and uses[id(accumulators[id(p)])] == len(used)
                    and p.dtype == used[0].output.dtype for p in params):
                continue
            rows = sum(c.input.numel() // c.input.shape[-1] if isinstance(layer, nn.Linear)
                       else _conv_rows(c.output) for c in used)
            if input_route_pays(layer, rows, losses, assembling):
                routed.append(RoutedLayer(layer, used))
        return routed


def _all_in(layer: nn.Module, ids: frozenset[int]) -> bool:
    """Every parameter of the layer trains and is shared (a frozen weight beside a trained
    bias would put the weight's part in the route's Gram matrix and ``.grad``)."""
    params = list(layer.parameters())
    return bool(params) and all(p.requires_grad and id(p) in ids for p in params)


def _conv_rows(output: Tensor) -> int:
    """Rows of a convolution's unfolded input: batch x output positions."""
    return output.numel() // output.shape[1]


def fill_rows(routed: Sequence[RoutedLayer], grads: Sequence[Sequence[Tensor | None]]) -> None:
    """Each routed layer's rows x and d, from ``grads``: per loss, its gradients with respect
    to the routed calls' outputs, in order (None where the loss does not reach one)."""
    column = 0
    with torch.no_grad():
        for entry in routed:
            columns = range(column, column + len(entry.calls))
            column += len(entry.calls)
            entry.x, entry.d = call_rows(entry.layer, [(c.input, c.output) for c in entry.calls],
                                         [[loss_grads[i] for i in columns]
                                          for loss_grads in grads])


def routed_gram(routed: Sequence[RoutedLayer], scale: Tensor | None
                ) -> list[tuple[nn.Module, Tensor]]:
    """Each routed layer with its K x K Gram matrix (float64, unscaled) from its rows."""
    grams = []
    with torch.no_grad():
        for entry in routed:
            gram = layer_gram(entry.layer, entry.x, entry.d, via_inputs=True)
            # The output gradients carry the GradScaler's scale once per side.
            grams.append((entry.layer, gram if scale is None else gram / (scale * scale)))
    return grams
