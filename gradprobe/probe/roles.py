"""What each loss is for: its role, read at the first probe step from what its autograd graph
reaches, declared by the user, or hinted by its name (docs/findings.md, "Roles").

The graph gives a loss's *reach*, one of
- ``shared``: it reaches parameters another loss (not a penalty) also reaches;
- ``own``: it reaches only parameters no other loss reaches (a codebook, a discriminator, a
  prototype table, a head of its own);
- ``loss-weights``: it reaches only loss-weight parameters: the leaves a weight given as a
  tensor (``weights={"cls": torch.exp(-s)}``) is computed from;
- ``penalty``: it reaches parameters with no input-dependent tensor in its graph (an L2
  penalty): a role the graph settles (``regularization``);
- ``none``: it reaches no trainable parameter.

A ``shared`` loss also has or lacks a *forward pass of its own*: a node of its graph that
applies a shared parameter (a layer run on its inputs) and belongs to no other loss's graph.
A PINN's boundary loss runs the network on the boundary points and a second task runs the
trunk on its batch; a term computed from the activations another loss's forward pass made
(a regulariser on the task's features, logits or latent) has none, and with no parameters
of its own it serves that loss: whether its small gradient share is the design or harm
depends on intent the graph does not show (docs/findings.md, "gradient-swamping").

Input dependence is read from the graph: a leaf that is not a parameter of the model (a PINN's
collocation points) or a tensor a node saved for its backward that requires no grad and is not
a 0-dim constant (a batch, a target, an index) marks the loss as computed from the data. Its
limits: data that enters only through additions leaves nothing saved (the loss reads as a
penalty), and a penalty towards fixed non-scalar tensors (EWC's anchor) saves them (it reads as
``shared`` or ``own``); a declaration settles either.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

import torch

from gradprobe.record import role_declaration

from .checks import name_hint
from .graph import leaves_of, reachable_nodes

# The roles the graph alone settles.
_GRAPH_ROLES = {"penalty": "regularization", "loss-weights": "regularization"}


def loss_weight_leaves(weights: Sequence[Any]) -> dict[int, torch.Tensor]:
    """The leaves the loss weights given as tensors that require grad are computed from."""
    leaves: dict[int, torch.Tensor] = {}
    for w in weights:
        if isinstance(w, torch.Tensor) and w.requires_grad:
            if w.grad_fn is None:
                leaves[id(w)] = w
            leaves.update((k, t) for k, (t, _) in leaves_of(reachable_nodes(w)).items())
    return leaves


def _input_dependent(nodes: Mapping[Any, int]) -> bool:
    """Whether a node of the graph saved a tensor computed from the data (module docstring)."""
    for node in sorted(nodes, key=nodes.get):  # nearest the loss first: found early
        for attribute in dir(node):
            if not attribute.startswith("_saved_"):
                continue
            try:
                saved = getattr(node, attribute)
            except RuntimeError:  # freed by an earlier backward
                continue
            for tensor in saved if isinstance(saved, (tuple, list)) else (saved,):
                if isinstance(tensor, torch.Tensor) and not tensor.requires_grad \
                        and tensor.ndim > 0:
                    return True
    return False


def _applications(nodes: Collection[Any], parameters: Collection[int]) -> set[Any]:
    """The nodes among ``nodes`` that apply one of ``parameters`` (ids): a layer run once."""
    return {node for node in nodes
            if any(id(getattr(child, "variable", None)) in parameters
                   for child, _ in node.next_functions if child is not None)}


def prototypes_reached(leaf_ids: Collection[int], tables: Mapping[str, torch.Tensor]
                       ) -> list[str]:
    """The watched prototype tables (Parameters, leaves of the graph) among a loss's leaves."""
    return sorted(name for name, table in tables.items() if id(table) in leaf_ids)


def read_reach(losses: Sequence[torch.Tensor], weights: Sequence[Any],
               parameters: Collection[int],
               prototypes: Mapping[str, torch.Tensor] | None = None) -> list[dict]:
    """Each loss's reach: ``{"kind": its kind (module docstring), "shared": n, "own": n,
    "loss_weights": n, "prototypes": the watched prototype tables it reaches, "own_pass":
    whether a ``shared`` loss runs the shared parameters on a forward pass of its own (module
    docstring)}`` (numbers of parameter tensors). ``parameters``: the ids of the model's
    parameters; another leaf a loss reaches (a PINN's collocation points, an input that
    requires grad) is data. ``prototypes``: the watched tables given as Parameters (leaves),
    by name: a loss that reaches one acts on the assignments it makes (a balancing or codebook
    loss on a router or codebook), the quantity the diagnosis then judges it by."""
    weight_ids = set(loss_weight_leaves(weights))
    graphs = [reachable_nodes(loss) for loss in losses]
    leaves = [set(leaves_of(graph)) for graph in graphs]
    reached = [{k for k in found if k in parameters or k in weight_ids} for found in leaves]
    trained = [found - weight_ids for found in reached]
    penalty = [bool(found) and leaves[k] == reached[k] and not _input_dependent(graphs[k])
               for k, found in enumerate(trained)]
    reaches = []
    for k, found in enumerate(trained):
        rivals = [j for j in range(len(trained)) if j != k and not penalty[j]]
        shared = found & set().union(*(trained[j] for j in rivals))
        passes_of_others = set().union(*(graphs[j] for j in rivals))
        kind = ("none" if not reached[k] else "loss-weights" if not found
                else "penalty" if penalty[k] else "shared" if shared else "own")
        reaches.append({"kind": kind, "shared": len(shared), "own": len(found - shared),
                        "loss_weights": len(reached[k] & weight_ids),
                        "prototypes": prototypes_reached(leaves[k], prototypes or {}),
                        "own_pass": bool(_applications(graphs[k], shared) - passes_of_others)})
    return reaches


def reach_summary(reach: dict | None) -> str:
    if reach is None:
        return "not read"
    parts = [f"{reach[key]} {label}" for key, label in
             (("shared", "shared"), ("own", "own"), ("loss_weights", "loss-weight")) if reach[key]]
    acts_on = "".join(f"; reaches prototypes {name!r}" for name in reach.get("prototypes", ()))
    if reach["kind"] == "shared" and reach.get("own_pass") is False:
        acts_on += "; computed on another loss's forward pass"
    return (("parameter tensors reached: " + ", ".join(parts)) if parts
            else "no trainable parameter reached") + acts_on


def role_records(names: list[str], task: str, declared: Mapping[str, str], task_declared: bool,
                 reaches: list[dict] | None) -> list[dict]:
    """One record per loss: its role, where the role came from (``declared``; ``first``: the
    task by default; ``graph``; ``name``: a weak hint), the reach, the declaration that
    overrides the role, and the ambiguity the graph leaves where intent decides the verdict."""
    records = []
    for k, loss_name in enumerate(names):
        reach = reaches[k] if reaches is not None else None
        kind = reach["kind"] if reach else None
        role, hint = name_hint(loss_name)
        if loss_name in declared:
            role, source = declared[loss_name], "declared"
        elif loss_name == task:
            role, source = "task", "declared" if task_declared else "first"
        elif kind in _GRAPH_ROLES:
            role, source = _GRAPH_ROLES[kind], "graph"
        else:
            source = "name"
        ambiguity = None
        # The task is what the other losses serve: sharing nothing with them says nothing of
        # its own intent (it is the others that may be cut off).
        if kind == "own" and source not in ("declared", "first"):
            ambiguity = ("reaches only parameters no other loss reaches: a codebook or prototype "
                         "loss (fine) or a head cut off from the shared layers (inert); the graph "
                         "looks the same; declare its role to settle it")
        alternative = ("prototype" if role != "prototype" else "adversarial") if ambiguity \
            else "task" if role != "task" else "other"
        records.append({"name": loss_name, "role": role, "source": source,
                        "hint": hint if source == "name" else None, "reach": kind,
                        "reach_summary": reach_summary(reach),
                        "counts": {key: reach[key] for key in ("shared", "own", "loss_weights")}
                        if reach else None,
                        "prototypes_reached": reach.get("prototypes", []) if reach else None,
                        "own_pass": reach.get("own_pass") if reach else None,
                        "override": role_declaration(loss_name, role if source == "declared"
                                                else alternative),
                        "ambiguity": ambiguity})
    return records


class RoleReader:
    """The probe's roles: name hints when the losses are first seen, the graph's reach at the
    first probe step (where the graph settles a role, ``roles`` is updated in place)."""

    def __init__(self, declared: Mapping[str, str] | None, task_declared: bool):
        self.declared = dict(declared or {})
        self.task_declared = task_declared
        self.records: list[dict] = []
        self.weight_ids: set[int] = set()
        self.read = False

    def start(self, roles: dict[str, str], names: list[str], task: str) -> None:
        self.records = role_records(names, task, self.declared, self.task_declared, None)
        roles.update((r["name"], r["role"]) for r in self.records)

    def read_graph(self, roles: dict[str, str], names: list[str], task: str,
                   losses: Sequence[torch.Tensor], weights: Sequence[Any],
                   parameters: Collection[int], prototypes: Mapping[str, torch.Tensor]) -> None:
        self.weight_ids = set(loss_weight_leaves(weights))
        self.records = role_records(names, task, self.declared, self.task_declared,
                                    read_reach(losses, weights, parameters, prototypes))
        roles.update((r["name"], r["role"]) for r in self.records)
        self.read = True

    def settled_roles(self, names: Sequence[str]) -> list[str]:
        """Each loss's role where it was declared or read from the graph, else ``"other"``: a
        role from the name never changes what the probe measures (a loss named ``reg`` may
        be a regression as well as a regulariser)."""
        settled = {r["name"]: r["role"] for r in self.records
                   if r["source"] in ("declared", "first", "graph")}
        return [settled.get(name, "other") for name in names]

    def parameter_names(self, names: Mapping[int, str]) -> dict[int, str]:
        """The model's parameter names less the loss weights (never in the shared set)."""
        return {k: v for k, v in names.items() if k not in self.weight_ids}
