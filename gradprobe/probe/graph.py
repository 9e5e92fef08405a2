"""Reading the autograd graph: which leaves each loss reaches, how far away they are, and
where the losses' gradients meet.

A walk over ``grad_fn.next_functions`` costs a few microseconds per node and computes
nothing numerical; it tells the probe which parameters each loss can move (inert losses,
the shared set) and which leaves a full set of per-loss gradients must cover.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Collection

import torch


def leaves_of(nodes: dict[Any, int]) -> dict[int, tuple[torch.Tensor, int]]:
    """Leaves (tensors that accumulate ``.grad``) among a loss's ``reachable_nodes``:
    id -> (tensor, depth).

    Depth is the smallest number of graph edges between the loss and the leaf, found
    breadth first, so the last layers before a loss have the smallest depth.
    """
    leaves: dict[int, tuple[torch.Tensor, int]] = {}
    for node, depth in nodes.items():
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.setdefault(id(variable), (variable, depth))
    return leaves


def reachable_nodes(loss: torch.Tensor) -> dict[Any, int]:
    """Every autograd node reachable from ``loss`` -> its smallest depth (breadth first)."""
    root = loss.grad_fn
    if root is None:
        return {}
    depth = {root: 0}
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is not None and child not in depth:
                depth[child] = depth[node] + 1
                queue.append(child)
    return depth


def infer_shared(losses: list[torch.Tensor], names: dict[int, str], *, task: int = 0,
                 exempt: Collection[int] = (), whole: bool = False) -> list[torch.Tensor]:
    """The parameters the losses compete for, named in ``names`` (id -> parameter name).

    ``whole=True``: every parameter two or more losses reach. Otherwise one layer: the one
    nearest the losses that *every path* of every loss's gradient crosses on its way to the
    deepest parameter they share. A layer is crossed by all paths when cutting every use of
    it from the autograd graph (every application: a model run on two batches has two)
    leaves that parameter without a path from the loss. Parallel heads (a VAE's mean and
    log-variance layers) are not crossed by all paths; the layer they both read from is.
    Layers with a weight matrix or kernel are preferred: a normalisation layer's per-channel
    scale and shift alone are passed over.

    The losses taken into account are all those that reach a parameter, less the
    ``exempt`` ones (regularisers that touch a few parameters by design) when two or more
    others remain. When those losses have no parameter in common, the task (index ``task``)
    and the most losses that share a parameter with it are taken; a loss that shares
    nothing with the task is left out, which the probe reports for it.
    """
    reach, leaves, tensors = _named_leaves(losses, names)
    if whole:
        return _reached_by_two(leaves, range(len(leaves)), tensors, names)
    group = _meeting_group(leaves, task, set(exempt))
    if not group:
        return []
    common = set(leaves[group[0]]).intersection(*(leaves[k] for k in group[1:]))
    graphs = [_Graph(losses[k].grad_fn, reach[k], names) for k in group]
    # The deepest shared parameter: the longest path to it, so that a layer below two
    # parallel heads counts as deeper than either head.
    bottom = max(common, key=lambda key: (max(graph.longest[leaves[k][key]]
                                              for k, graph in zip(group, graphs)), names[key]))
    by_layer: dict[str, list[torch.Tensor]] = {}
    for key in sorted(common, key=lambda key: names[key]):
        by_layer.setdefault(module_prefix(names[key]), []).append(tensors[key])
    nearest_first = sorted(by_layer, key=lambda layer: (max(g.depth_of(layer) for g in graphs),
                                                        layer))
    crossed_plain = None
    for layer in nearest_first:
        if not all(g.crossed(layer, leaves[k][bottom]) for k, g in zip(group, graphs)):
            continue
        if any(t.ndim >= 2 for t in by_layer[layer]):
            return by_layer[layer]
        crossed_plain = crossed_plain or layer
    return by_layer[crossed_plain or module_prefix(names[bottom])]


def group_whole(losses: list[torch.Tensor], names: dict[int, str], *, task: int = 0,
                exempt: Collection[int] = ()) -> list[torch.Tensor]:
    """Every parameter that the task and at least one other of the losses :func:`infer_shared`
    takes into account reach (the same losses: a loss that shares nothing with the task, or a
    regulariser, adds none; two auxiliary losses sharing a head of their own add none), in
    name order; empty where no other loss meets the task."""
    _, leaves, tensors = _named_leaves(losses, names)
    group = _meeting_group(leaves, task, set(exempt))
    if len(group) < 2:
        return []
    anchor = task if task in group else group[0]
    others = set().union(*(leaves[k] for k in group if k != anchor))
    return [tensors[k] for k in sorted(set(leaves[anchor]) & others, key=lambda k: names[k])]


def _named_leaves(losses: list[torch.Tensor], names: dict[int, str]) -> tuple[list, list, dict]:
    """Each loss's reachable nodes, its leaves named in ``names`` (id -> node), and the tensors."""
    reach = [reachable_nodes(loss) for loss in losses]
    leaves = [{id(v): node for node in nodes if (v := getattr(node, "variable", None)) is not None
               and id(v) in names} for nodes in reach]
    tensors = {key: node.variable for found in leaves for key, node in found.items()}
    return reach, leaves, tensors


def _reached_by_two(leaves: list[dict], which: Collection[int], tensors: dict,
                    names: dict[int, str]) -> list[torch.Tensor]:
    counts = Counter(key for k in which for key in leaves[k])
    return [tensors[k] for k in sorted((k for k, c in counts.items() if c >= 2),
                                       key=lambda k: names[k])]


def _meeting_group(leaves: list[dict], task: int, exempt: set[int]) -> list[int]:
    """The losses whose common layer is the shared set (indices into the losses)."""
    active = [k for k, found in enumerate(leaves) if found]
    if not active:
        return []
    anchor = task if task in active else active[0]
    core = [k for k in active if k not in exempt or k == anchor]
    if len(core) < 2:
        core = active
    if set(leaves[anchor]).intersection(*(leaves[k] for k in core)):
        return core
    # No parameter common to all: the anchor with the most losses that share a parameter
    # with it; among groups of that size, the one sharing the most parameter values.
    groups = {tuple(k for k in core if key in leaves[k]) for key in leaves[anchor]}
    most = max(len(g) for g in groups)
    if most < 2:
        return [anchor]

    def overlap(g: tuple[int, ...]) -> int:
        shared = set(leaves[anchor]).intersection(*(leaves[k] for k in g))
        return sum(leaves[anchor][key].variable.numel() for key in shared)

    return list(max((g for g in groups if len(g) == most), key=lambda g: (overlap(g), g)))


class _Graph:
    """One loss's autograd graph: its layers' operations, depths and cuts."""

    def __init__(self, root: Any, depth: dict[Any, int], names: dict[int, str]):
        self.root, self.depth = root, depth
        self.children = {node: [c for c, _ in node.next_functions if c is not None]
                         for node in depth}
        # A layer's operations: the nodes its parameters feed (directly, or through a
        # transpose or view of the weight).
        self.operations: dict[str, set[Any]] = {}
        for node, kids in self.children.items():
            for child in kids:
                parameter = _parameter_below(child)
                if parameter is not None and id(parameter) in names:
                    self.operations.setdefault(module_prefix(names[id(parameter)]),
                                               set()).add(node)
        indegree = Counter(c for kids in self.children.values() for c in kids)
        order, queue = [], deque([root])
        while queue:
            node = queue.popleft()
            order.append(node)
            for child in self.children[node]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    queue.append(child)
        self.longest = {root: 0}
        for node in order:
            for child in self.children[node]:
                self.longest[child] = max(self.longest.get(child, 0), self.longest[node] + 1)

    def depth_of(self, layer: str) -> int:
        return min(self.depth[node] for node in self.operations[layer])

    def crossed(self, layer: str, target: Any) -> bool:
        """Whether every path from the loss to ``target`` passes an operation of ``layer``."""
        cut = self.operations[layer]
        if self.root in cut:
            return True
        seen, queue = {self.root}, deque([self.root])
        while queue:
            for child in self.children[queue.popleft()]:
                if child is target:
                    return False
                if child not in seen and child not in cut:
                    seen.add(child)
                    queue.append(child)
        return True


def _parameter_below(node: Any, hops: int = 3) -> torch.Tensor | None:
    """The leaf ``node`` is, or leads to through single-input nodes (a weight's transpose)."""
    for _ in range(hops):
        variable = getattr(node, "variable", None)
        if variable is not None:
            return variable
        inputs = [c for c, _ in node.next_functions if c is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def module_prefix(parameter_name: str) -> str:
    return parameter_name.rpartition(".")[0]


def has_user_hooks(tensor: torch.Tensor) -> bool:
    """Hooks that expect ``.grad`` to be filled by an ordinary backward."""
    return bool(getattr(tensor, "_backward_hooks", None)) or \
        bool(getattr(tensor, "_post_accumulate_grad_hooks", None))
