"""The per-loss Gram matrix of Linear and Conv layers from what the layers see, without taking
a per-loss gradient of any parameter.

For a Linear layer ``y = x W^T + b`` applied to the rows x_1..x_N of its input (every row of
every call: batch, tokens, positions), the gradient of loss k with respect to W is
``D_k^T X``, with X the N x in input rows and D_k = dL_k/dy the N x out gradient of the
layer's output; with respect to b it is ``D_k^T 1``. Their inner products follow from two
small N x N matrices:

    <dL_i/dW, dL_j/dW> + <dL_i/db, dL_j/db> = sum_{r,s} (D_i D_j^T)_{rs} (X X^T + 1)_{rs}
                                             = <D_i, S D_j>,   S = X X^T + 1

(Dangel et al., "BackPACK: Packing more into backprop", ICLR 2020, use the same factorisation
of per-sample gradients). A convolution is a Linear layer on the unfolded input: its rows are
every (sample, output position) pair, x_r the receptive field (``torch.nn.functional.unfold``),
so N = batch x output positions.

The output gradients D_k of every layer come from one ``torch.autograd.grad`` per loss with
respect to the layers' outputs, which computes the input gradients a backward computes but
none of its parameter gradients (about half of a backward for these layers). Per layer the
cheaper of two exact ways is taken, by counting multiply-adds from the shapes: the N x N route
above (cheap when N is small next to the layer's width), or forming the K per-loss parameter
gradients ``D_k^T X`` in one batched matmul and their Gram matrix (cheap when N is large, as
for convolutions over long inputs). Either way the result is exact: the products run in the
layers' own precision, as the backward's do, and the K x K Gram matrix is summed in float64
(on the N x N route, each row's short sum over the output channels in the layers' precision).

Standalone here (:class:`LayerGram`); the probe uses the same per-layer functions on the
shared Linear and Conv layers of a probe step (``layer_inputs.py``, docs/probe.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LayerGram:
    """``G_ij = <dL_i/dtheta, dL_j/dtheta>`` over the parameters of the given Linear, Conv1d
    and Conv2d layers (``groups=1``), from their inputs and output gradients.

    Usage::

        gram = LayerGram.of(model.trunk)
        with gram.capture():
            losses = compute_losses(model, batch)  # the forward pass, as usual
        g = gram.gram([losses[k] for k in names])   # K x K, float64
        total.backward()                            # the ordinary backward, if training

    ``strategy``: ``"auto"`` (per layer, the cheaper way), ``"inputs"`` (always the N x N
    route) or ``"gradients"`` (always per-loss parameter gradients); all are exact.
    ``dtype``: the precision of the products (default: the layer inputs' own, like the
    backward's); the Gram matrix itself is always summed in float64.
    """

    def __init__(self, layers: Iterable[nn.Module], *, dtype: torch.dtype | None = None,
                 strategy: str = "auto"):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("LayerGram needs at least one Linear or Conv layer")
        for layer in self.layers:
            if not isinstance(layer, SUPPORTED):
                raise ValueError(f"LayerGram supports Linear, Conv1d and Conv2d layers, got "
                                 f"{type(layer).__name__}")
            if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups != 1:
                raise ValueError(f"LayerGram supports convolutions with groups=1, got "
                                 f"groups={layer.groups}")
        if strategy not in ("auto", "inputs", "gradients"):
            raise ValueError(f"strategy must be 'auto', 'inputs' or 'gradients', got {strategy!r}")
        self.dtype = dtype
        self.strategy = strategy
        self._calls: dict[int, list[tuple[Tensor, Tensor, int]]] = {}
        self._capturing = False
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    @classmethod
    def of(cls, module: nn.Module, **kwargs) -> "LayerGram":
        """Every trainable parameter of ``module`` must sit in a supported layer."""
        layers = [m for m in module.modules() if isinstance(m, SUPPORTED)]
        covered = {id(p) for layer in layers for p in layer.parameters()}
        others = [name for name, p in module.named_parameters()
                  if p.requires_grad and id(p) not in covered]
        if others:
            raise ValueError(f"LayerGram covers Linear and Conv layers only; these parameters "
                             f"are in other layers: {', '.join(others)}")
        return cls(layers, **kwargs)

    def parameters(self) -> list[Tensor]:
        return [p for layer in self.layers for p in layer.parameters()]

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the layers' inputs and outputs during the forward passes inside the block."""
        self._calls = {id(layer): [] for layer in self.layers}
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def _hook(self, layer: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self._capturing and torch.is_grad_enabled():
            self._calls[id(layer)].append((inputs[0].detach(), output, output._version))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def gram(self, losses: Sequence[Tensor]) -> Tensor:
        """The K x K Gram matrix of the per-loss gradients of the layers' parameters (the
        graph is kept: the ordinary backward can follow)."""
        calls = [(layer, call) for layer in self.layers for call in self._calls.get(id(layer), ())]
        if not calls:
            raise ValueError("no layer output was captured: run the forward pass inside "
                             "capture()")
        for layer, (_, output, version) in calls:
            if output._version != version:
                raise ValueError(f"the output of {type(layer).__name__} was modified in place "
                                 "after the layer (an inplace=True activation?): its gradient "
                                 "is no longer the layer's output gradient")
        outputs = [output for _, (_, output, _) in calls]
        per_loss = [torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
                    if loss.requires_grad else (None,) * len(outputs) for loss in losses]
        k = len(losses)
        device = outputs[0].device
        total = torch.zeros(k, k, dtype=torch.float64, device=device)
        for layer in self.layers:
            mine = [i for i, (owner, _) in enumerate(calls) if owner is layer]
            if not mine:
                continue
            x, d = call_rows(layer, [calls[i][1][:2] for i in mine],
                             [[g[i] for i in mine] for g in per_loss], self.dtype)
            via_inputs = self.strategy == "inputs" or (
                self.strategy == "auto" and input_route_pays(layer, x.shape[0], k))
            total += layer_gram(layer, x, d, via_inputs)
        return total


# -- one layer: the math LayerGram and the probe (layer_inputs.py) share ----------------------

def input_rows(layer: nn.Module, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """[N, fan_in]: the rows the layer's weight multiplies."""
    x = x.to(dtype or x.dtype)
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    pads = _padding(layer)
    if any(pads):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pads, mode=mode)
    if isinstance(layer, nn.Conv1d):  # as a Conv2d over a height of 1
        x = x.unsqueeze(-2)
    kernel, dilation, stride = (_two(layer, name) for name in
                                ("kernel_size", "dilation", "stride"))
    unfolded = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [B, fan_in, P]
    return unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])


def output_rows(layer: nn.Module, grad: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """[N, out]: the output gradient, one row per input row."""
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if isinstance(layer, nn.Linear):
        rows = grad.reshape(-1, out)
    else:  # [B, out, positions...] -> [B * P, out], the order unfold gives its columns
        rows = grad.reshape(grad.shape[0], out, -1).transpose(1, 2).reshape(-1, out)
    return rows.to(dtype or rows.dtype)


def call_rows(layer: nn.Module, calls: Sequence[tuple[Tensor, Tensor]],
              per_loss: Sequence[Sequence[Tensor | None]],
              dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The rows of a layer over its calls ``(input, output)``: x [N, fan_in] and d [K, N, out].

    ``per_loss[k][c]``: loss k's gradient with respect to call c's output (None where the loss
    does not reach it: zero rows)."""
    x = _joined([input_rows(layer, inp, dtype) for inp, _ in calls])
    d = torch.stack([_joined([output_rows(layer, torch.zeros_like(out) if g is None else g,
                                          dtype) for (_, out), g in zip(calls, grads)])
                     for grads in per_loss])
    return x, d


def _joined(parts: list[Tensor]) -> Tensor:
    """``torch.cat`` of the parts, without a copy for one part (one call: the usual case)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def input_route_pays(layer: nn.Module, n: int, k: int, assembling: bool = False) -> bool:
    """Whether the N x N route takes fewer multiply-adds than the K per-loss parameter
    gradients and their Gram matrix, for N input rows and K losses. ``assembling``: ``.grad``
    is filled from the per-loss gradients, which the route then pays with one weight gradient
    of the weighted output gradients (the K per-loss ones only add up)."""
    out, fan_in = layer.weight.shape[0], math.prod(layer.weight.shape[1:])
    via_inputs = n * n * fan_in + k * n * n * out + k * k * n * out
    if assembling:
        via_inputs += n * out * fan_in
    via_gradients = k * n * out * fan_in + k * k * out * (fan_in + (layer.bias is not None))
    return via_inputs < via_gradients


def layer_gram(layer: nn.Module, x: Tensor, d: Tensor, via_inputs: bool) -> Tensor:
    """x: [N, fan_in], d: [K, N, out] -> the layer's K x K Gram matrix (float64), by the
    N x N route (``via_inputs``) or from the per-loss parameter gradients."""
    k = d.shape[0]
    bias = layer.bias is not None
    if via_inputs:
        s = x @ x.T
        if bias:
            s = s + 1.0
        return _row_products(d, s @ d)
    weight = d.transpose(1, 2) @ x  # [K, out, fan_in]: the per-loss weight gradients
    flat = weight.reshape(k, -1)
    if bias:
        flat = torch.cat([flat, d.sum(dim=1)], dim=1)
    return _float64_products(flat, flat)


def _row_products(a: Tensor, b: Tensor) -> Tensor:
    """a, b: [K, N, out] -> ``sum_{n,c} a[i, n, c] b[j, n, c]``: each row's products summed in
    the layer's precision (sums as long as a backward's own, over the out channels), the N rows
    in float64 (no float64 copy of a or b, which cost more than the products here)."""
    return torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0)).sum(0, dtype=torch.float64)


def _float64_products(a: Tensor, b: Tensor) -> Tensor:
    """``a b^T`` summed in float64 (long sums of float32 products lose digits)."""
    return a.to(torch.float64) @ b.to(torch.float64).T


def _two(layer: nn.Module, name: str) -> tuple[int, int]:
    value = getattr(layer, name)
    value = (value,) if isinstance(value, int) else tuple(value)
    return (1, value[0]) if isinstance(layer, nn.Conv1d) else (value[0], value[-1])


def _padding(layer: nn.Module) -> tuple[int, ...]:
    """``F.pad`` amounts (last dimension first) that reproduce the layer's own padding."""
    kernel, dilation = _two(layer, "kernel_size"), _two(layer, "dilation")
    if layer.padding == "valid":
        per_dim = [(0, 0), (0, 0)]
    elif layer.padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        per_dim = [(t // 2, t - t // 2) for t in totals]
    else:
        per_dim = [(p, p) for p in _two(layer, "padding")]
        if isinstance(layer, nn.Conv1d):
            per_dim[0] = (0, 0)
    (top, bottom), (left, right) = per_dim
    return (left, right) if isinstance(layer, nn.Conv1d) else (left, right, top, bottom)
