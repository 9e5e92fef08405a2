"""Reading the autograd graph: which leaves each loss reaches, and how far away they are.

A walk over ``grad_fn.next_functions`` costs a few microseconds per node and computes
nothing numerical; it tells the probe which parameters each loss can move (inert losses,
the shared set) and which leaves a full set of per-loss gradients must cover.
"""

from __future__ import annotations

from collections import deque

import torch


def reachable_leaves(loss: torch.Tensor) -> dict[int, tuple[torch.Tensor, int]]:
    """Leaves (tensors that accumulate ``.grad``) reachable from ``loss``: id -> (tensor, depth).

    Depth is the smallest number of graph edges between the loss and the leaf, found
    breadth first, so the last layers before a loss have the smallest depth.
    """
    root = loss.grad_fn
    if root is None:
        return {}
    leaves: dict[int, tuple[torch.Tensor, int]] = {}
    seen = {root}
    queue = deque([(root, 0)])
    while queue:
        node, depth = queue.popleft()
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.setdefault(id(variable), (variable, depth))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                queue.append((child, depth + 1))
    return leaves


def infer_shared(per_loss_leaves: list[dict[int, tuple[torch.Tensor, int]]],
                 names: dict[int, str], whole: bool = False) -> list[torch.Tensor]:
    """The parameters two or more losses compete for.

    With ``whole=False`` (the default) only the shared layer nearest the losses is kept:
    the parameters whose name shares the module prefix of the shared leaf of smallest
    depth. Its per-loss gradients cost a backward through the heads only, and it is where
    the losses' demands meet first. With ``whole=True`` every shared parameter is kept.
    """
    counts: dict[int, int] = {}
    depth: dict[int, int] = {}
    tensors: dict[int, torch.Tensor] = {}
    for leaves in per_loss_leaves:
        for key, (tensor, d) in leaves.items():
            counts[key] = counts.get(key, 0) + 1
            depth[key] = min(d, depth.get(key, d))
            tensors[key] = tensor
    shared = [key for key, c in counts.items() if c >= 2 and key in names]
    if not shared:
        return []
    if whole:
        return [tensors[k] for k in sorted(shared, key=lambda k: names[k])]
    nearest = min(shared, key=lambda k: (depth[k], names[k]))
    prefix = module_prefix(names[nearest])
    return [tensors[k] for k in sorted(shared, key=lambda k: names[k])
            if module_prefix(names[k]) == prefix]


def module_prefix(parameter_name: str) -> str:
    return parameter_name.rpartition(".")[0]


def has_user_hooks(tensor: torch.Tensor) -> bool:
    """Hooks that expect ``.grad`` to be filled by an ordinary backward."""
    return bool(getattr(tensor, "_backward_hooks", None)) or \
        bool(getattr(tensor, "_post_accumulate_grad_hooks", None))
