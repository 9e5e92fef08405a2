"""Per-loss gradients of a probe step: one ``torch.autograd.grad`` per loss, and what the probe
makes of them on the device (the Jacobian rows, the shared Linear and Conv layers' Gram matrix
from their inputs where that pays (layer_inputs.py), the latents' gradient norms, ``.grad``
assembled from them), with no value read on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .fsdp import is_fully_sharded
from .graph import group_whole, has_user_hooks, infer_shared, leaves_of, reachable_nodes
from .layer_blocks import LayerBlocks
from .layer_inputs import LayerInputs, RoutedLayer, fill_rows, routed_gram
from .recording import StepNumbers
from .transfer import one_dim
from .watches import ProbeUsageError

@dataclass
class PerLossGradients:
    """The per-loss gradients of one probe step: rows of the Jacobian J, split by input kind."""

    path: str  # "assembled" (.grad filled from these) or "separate" (the ordinary backward)
    weights: list  # one per loss, as backward() resolved them: a float or a detached tensor
    # The shared parameters with Jacobian rows, other leaves, latents, routed layers' outputs.
    inputs: list[torch.Tensor]
    grads: list[tuple[torch.Tensor | None, ...]]  # one tuple per loss, aligned with inputs
    n_shared: int  # shared parameters with Jacobian rows (not in a routed layer)
    n_others: int
    latent_names: list[str]
    per_loss_leaves: list[dict]
    shared_ids: set[int]
    scale: torch.Tensor | None  # the GradScaler's scale the gradients carry (None without one)
    routed: list[RoutedLayer]  # layers whose Gram comes from their inputs (layer_inputs.py)


@dataclass
class ProbeStep:
    """A step between :meth:`Probe.before_backward` and :meth:`Probe.after_backward`."""

    step: int
    probing: bool
    losses: Mapping[str, torch.Tensor]
    total: torch.Tensor
    gradients: PerLossGradients | None
    scaler: Any


def choose_path(model: torch.nn.Module, per_loss_leaves: list[dict], weights: Sequence[Any],
                assemble: bool) -> str:
    """'assembled' fills .grad from the per-loss gradients; 'separate' runs the ordinary backward.

    'separate' is the default: the parameter updates are then bit-identical to training
    without the probe. ``assemble=True`` saves that backward (worth it when the shared set
    reaches deep into the model, where each per-loss pass costs a full backward) and gives the
    same ``.grad`` up to float32 rounding; it is used only when the ordinary backward has no
    side effects of its own: no DDP reducer or FSDP2 reduce-scatter, no hooks on the leaves,
    no loss weight that itself needs a gradient.
    """
    if not assemble or isinstance(model, torch.nn.parallel.DistributedDataParallel) \
            or is_fully_sharded(model):
        return "separate"
    if any(isinstance(w, torch.Tensor) and w.requires_grad for w in weights):
        return "separate"
    if any(has_user_hooks(t) for leaves in per_loss_leaves for t, _ in leaves.values()):
        return "separate"
    return "assembled"


def per_loss_gradients(model: torch.nn.Module, losses: Sequence[torch.Tensor],
                       weights: Sequence[Any], shared: list[torch.Tensor],
                       latents: Mapping[str, torch.Tensor], scaler: Any,
                       assemble: bool, layer_inputs: LayerInputs | None = None
                       ) -> PerLossGradients:
    """One ``torch.autograd.grad`` per loss, over the shared parameters and watched latents
    (and, on the assembled path, every other leaf, so that ``.grad`` can be filled exactly).
    The shared layers ``layer_inputs`` captured and may route give their outputs instead of
    their parameters (layer_inputs.py)."""
    graphs = [reachable_nodes(loss) for loss in losses]
    per_loss_leaves = [leaves_of(graph) for graph in graphs]
    path = choose_path(model, per_loss_leaves, weights, assemble)
    shared_ids = {id(p) for p in shared}
    routed = layer_inputs.take(graphs, len(losses), path == "assembled") \
        if layer_inputs is not None else []
    routed_ids = {id(p) for entry in routed for p in entry.layer.parameters()}
    rows = [p for p in shared if id(p) not in routed_ids]
    others: dict[int, torch.Tensor] = {}
    if path == "assembled":
        for leaves in per_loss_leaves:
            others.update((k, t) for k, (t, _) in leaves.items() if k not in shared_ids)
    inputs = rows + list(others.values()) + list(latents.values()) + \
        [call.output for entry in routed for call in entry.calls]
    # With a GradScaler the per-loss gradients are taken of the scaled losses, as the ordinary
    # backward is (small half-precision gradients would underflow otherwise); the recorded
    # statistics divide the scale out again. The scale stays a tensor on the device: reading
    # it (scaler.get_scale()) would wait for the device.
    scale = None
    if scaler is not None and scaler.is_enabled():
        scale = scaler.scale(torch.ones((), device=losses[0].device))
    # d(s * L)/dx is the backward of L seeded with s: one seed serves every loss (with a
    # scaler it is the scale itself), instead of a ones_like and a product per loss.
    # (autograd casts the seed to a loss's own dtype, float64 or half, as it starts.)
    seed = scale if scale is not None else torch.ones((), device=losses[0].device)
    grads = []
    for loss in losses:
        if not loss.requires_grad:
            grads.append((None,) * len(inputs))
            continue
        # The graph is kept so that a failure anywhere in the probe step can still fall back
        # to the ordinary backward; it is freed when the loop drops its losses.
        grads.append(torch.autograd.grad(loss, inputs, grad_outputs=seed, retain_graph=True,
                                         allow_unused=True))
    if routed:
        routed_outputs = sum(len(entry.calls) for entry in routed)
        fill_rows(routed, [g[len(g) - routed_outputs:] for g in grads])
    return PerLossGradients(path, list(weights), inputs, grads, len(rows), len(others),
                            list(latents), per_loss_leaves, shared_ids, scale, routed)


def weighted(t: torch.Tensor, weight: Any) -> torch.Tensor:
    """``weight * t``; a weight of 1.0 multiplies nothing (the same value, one op fewer)."""
    return t if isinstance(weight, float) and weight == 1.0 else weight * t


def weighted_total(terms: Sequence[torch.Tensor | None], weights: Sequence[Any]
                   ) -> torch.Tensor | None:
    """``sum_k w_k t_k`` over the terms that are not None (None if none is): the losses as the
    ordinary backward sees them, or per-loss gradients as it would sum them. The sum starts
    at the first term, not at 0 (the same value and gradients as Python's ``sum(w * t)``, with
    two ops fewer)."""
    total = None
    for term, weight in zip(terms, weights):
        if term is not None:
            term = weighted(term, weight)
            total = term if total is None else total + term
    return total


def assemble(gradients: PerLossGradients) -> None:
    """``.grad += sum_k w_k g_k``: what the ordinary backward of the weighted sum gives; a
    routed layer's from its rows, ``(sum_k w_k D_k)^T X``."""
    n_params = gradients.n_shared + gradients.n_others
    pairs = [(param, weighted_total([per_loss[j] for per_loss in gradients.grads],
                                    gradients.weights))
             for j, param in enumerate(gradients.inputs[:n_params])]
    for entry in gradients.routed:
        pairs += entry.parameter_gradients(weighted_total(list(entry.d), gradients.weights))
    for param, combined in pairs:
        if combined is not None:
            param.grad = combined if param.grad is None else param.grad + combined


class JacobianBuffer:
    """The float64 Jacobian rows on the shared set, filled by one ``cat`` per probe step.

    The buffer is the biggest thing a probe step allocates (K x P float64) and is kept between
    probe steps: a fresh one costs a page fault per 4 KiB (14 ms for 4 losses x 2.6M
    parameters). ``names``: id -> parameter name, which the rows' per-layer blocks are
    named by (layer_blocks.py).
    """

    def __init__(self, names: Mapping[int, str]):
        self._buffer: torch.Tensor | None = None
        self.blocks = LayerBlocks(names)

    def fill(self, gradients: PerLossGradients) -> torch.Tensor | None:
        """J [K, P] float64, unscaled: row k is loss k's gradient on the shared parameters
        with Jacobian rows (zeros where it does not reach one); None if there are none."""
        n_shared = gradients.n_shared
        shared = gradients.inputs[:n_shared]
        if not shared:
            return None
        device = shared[0].device
        rows = len(gradients.grads)
        size = sum(p.numel() for p in shared)
        buffer = self._buffer
        if buffer is None or buffer.numel() != rows * size or buffer.device != device:
            buffer = self._buffer = torch.empty(rows * size, dtype=torch.float64, device=device)
        # One cat over every (loss, parameter) gradient, cast to float64 as it is written.
        pieces = [one_dim(g) if g is not None else p.new_zeros(p.numel())
                  for per_loss in gradients.grads
                  for g, p in zip(per_loss[:n_shared], shared)]
        torch.cat(pieces, out=buffer)
        jacobian = buffer.view(rows, size)
        if gradients.scale is not None:
            jacobian = jacobian / gradients.scale
        return jacobian


def latent_grad_norms(gradients: PerLossGradients, device: torch.device) -> torch.Tensor:
    """[L * K] float64, latent-major: the norm of dL_k / d latent_i at ``i * K + k`` (0 where
    loss k does not reach it). Kept flat: it travels to the host flat."""
    n_params = gradients.n_shared + gradients.n_others
    latents = len(gradients.latent_names)
    if not latents:
        return torch.zeros(0, dtype=torch.float64, device=device)
    zero = None
    flat = []
    for i in range(latents):
        for per_loss in gradients.grads:
            g = per_loss[n_params + i]
            if g is None:
                if zero is None:
                    zero = torch.zeros(1, device=device)
                g = zero
            flat.append(g)
    norms = torch.stack(torch._foreach_norm(flat, 2, dtype=torch.float64))
    if gradients.scale is not None:
        norms = norms / gradients.scale
    return norms


# ``shared=None`` records the per-layer blocks of the whole shared set while its float64
# Jacobian rows, K x P entries, stay within this many (2^25 entries, 256 MiB: 8M parameters
# for 4 losses); beyond it only those of the nearest layer (docs/probe.md).
WHOLE_SET_ENTRIES = 2 ** 25


def shared_set(losses: Sequence[torch.Tensor], names: Mapping[int, str], roles: Sequence[str],
               task: int, spec: Any, widen: bool) -> tuple[list[torch.Tensor],
                                                            list[torch.Tensor], str]:
    """The parameters the per-loss gradients are taken on, the shared set the Gram matrix and
    its statistics describe (docs/probe.md), and which rule chose them and why. ``spec``
    ``"all"``: every parameter two or more losses reach; ``None`` or ``"nearest"``: the nearest
    layer every path of every loss crosses. With ``spec=None`` and ``widen`` (not under
    FSDP2) the gradients are taken on the whole shared set, every parameter that the task and
    another of the losses meeting there reach, while that fits :data:`WHOLE_SET_ENTRIES`: its
    per-layer blocks are recorded. Regularisers do not count."""
    losses = list(losses)
    regularisers = [k for k, role in enumerate(roles) if role == "regularization"]
    whole = spec == "all"
    shared = infer_shared(losses, names, task=task, exempt=regularisers, whole=whole)
    if not shared:
        raise ProbeUsageError("no parameter of the model receives gradient from "
                              + ("two or more losses" if whole else "the losses")
                              + ": there is nothing shared to probe (pass shared=...)")
    if whole:
        return shared, shared, 'shared="all": every parameter two or more losses reach'
    why = "the nearest layer every path of every loss crosses"
    if spec is not None or not widen:
        return shared, shared, why + (' (shared="nearest")' if spec is not None else
                                      "; per-layer blocks of it alone under FSDP2")
    candidates = group_whole(losses, names, task=task, exempt=regularisers)
    numel = sum(p.numel() for p in candidates)
    if len(candidates) > len(shared) and len(losses) * numel <= WHOLE_SET_ENTRIES:
        return candidates, shared, why + (
            f"; per-layer blocks of the whole shared set: {numel} parameters that the task "
            f"and another loss reach ({len(losses)} x {numel} Jacobian entries, within "
            f"{WHOLE_SET_ENTRIES})")
    return shared, shared, why + ("; per-layer blocks of it alone: " + (
        f"the whole shared set ({len(losses)} x {numel} Jacobian entries) is over "
        f"{WHOLE_SET_ENTRIES}" if len(candidates) > len(shared) else
        "no parameter beyond it is shared with the task"))


def graph_events(names: list[str], task: str, gradients: PerLossGradients,
                 core: set[int] | None) -> list[tuple]:
    """``(kind, loss name, message)`` for each loss the graph walk found inert (no gradient path
    to any parameter) or off the shared set (``no_shared_path``; ``core``: the shared set's
    ids where the gradients were taken on a wider set)."""
    shared_ids = gradients.shared_ids if core is None else core
    leaves = gradients.per_loss_leaves
    task_reach = set(leaves[names.index(task)])
    events = []
    for loss_name, reach in zip(names, leaves):
        if not reach:
            events.append(("inert_loss", loss_name,
                           f"loss {loss_name!r} has no gradient path to any parameter "
                           "(computed from detached tensors?): it trains nothing"))
        elif not (set(reach) & shared_ids):
            if loss_name != task and not (set(reach) & task_reach):
                message = (f"loss {loss_name!r} shares no parameter with the task loss "
                           f"{task!r} (computed from detached features?): it reaches none of "
                           "the shared parameters")
            else:
                # It shares parameters with the task (its reach reads "shared"), none of them
                # in the set where the gradients are compared.
                message = (f"loss {loss_name!r} reaches none of the parameters of the shared "
                           "set, where the losses' gradients are compared")
            events.append(("no_shared_path", loss_name, message))
    return events


def step_numbers(losses: Sequence[torch.Tensor], gradients: PerLossGradients,
                 shared: list[torch.Tensor], jacobian: JacobianBuffer,
                 observed: dict[str, Any]) -> StepNumbers:
    """This process's numbers of a probe step, on the device (nothing read on the host)."""
    device = shared[0].device
    with torch.no_grad():
        loss_values = torch.stack(list(losses)).to(device, torch.float64)
    groups = observed.get("groups")
    if groups is not None:
        groups = torch.as_tensor(groups)
        groups = groups.detach() if groups.requires_grad else groups
        observed["groups"] = groups if groups.ndim == 1 else groups.reshape(-1)
    layout = jacobian.blocks.layout(shared, gradients.inputs[:gradients.n_shared],
                                    routed_gram(gradients.routed, gradients.scale))
    return StepNumbers(loss_values, jacobian.fill(gradients), latent_grad_norms(gradients, device),
                       observed, observed.get("groups"), layout=layout)
