"""The probe on DDP and FSDP2: which statistics are global, and the collectives behind them.

What DDP descends is the mean over ranks of each rank's gradient, so the probe records the
statistics of that mean gradient. The Gram matrix of the mean per-loss gradients is *not* the
mean of the ranks' Gram matrices (the cross-rank inner products are missing), so the K rows of
the per-loss Jacobian on the shared set are all-reduced: K x P float64 numbers per probe step,
P being the shared set's size (the nearest shared layer by default, so usually small; see
docs/distributed.md for measured costs). Losses and latent-gradient norms cost K and K x L
numbers; latents are all-gathered, at most ``max_rows // world`` rows from each rank.

Every probe step starts with one small all-reduce in which each rank says whether its probe
failed (and how many rows of each gathered tensor it holds): a failure anywhere disables the
probe on every rank at the same step, before any further collective, so no rank waits forever
in a collective the others no longer enter.

Under FSDP2 (fsdp.py) the rows are reduce-scattered instead and only K x K Gram blocks are
all-reduced; and since its per-loss passes enter FSDP2's all-gathers, a second vote precedes
them (probe.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from .fsdp import ShardedParameters
from .recording import StepNumbers
from .watches import ProbeUsageError, as_matrix


class RankGroup:
    """The process group a DDP or FSDP2 model averages its gradients over, seen from one rank.

    ``sharded``: the model's parameters are sharded with FSDP2 over this group (fsdp.py).
    """

    def __init__(self, group, device: torch.device, sharded: bool = False):
        self.group = group
        self.device = device
        self.sharded = sharded
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    @property
    def writes(self) -> bool:
        """Only the group's rank 0 writes the run file (and forwards to sinks)."""
        return self.rank == 0

    def agree(self, failed: bool, row_counts: Sequence[int]) -> tuple[bool, list[int]]:
        """One all-reduce: did any rank fail, and the fewest rows each rank holds per tensor."""
        votes = torch.tensor([-int(failed), *row_counts], dtype=torch.int64, device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MIN, group=self.group)
        values = votes.tolist()
        return values[0] < 0, values[1:]

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks, as DDP averages gradients (sum, then divide by the world size)."""
        return self.sum(tensor) / self.world

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (one all-reduce)."""
        reduced = tensor.to(self.device).contiguous()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.group)
        return reduced

    def mean_shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's column shard of the mean over ranks of ``rows`` [K, P]: one
        reduce-scatter (P is padded with zeros to a multiple of the world size)."""
        k, p = rows.shape
        width = -(-p // self.world)
        padded = torch.nn.functional.pad(rows.to(self.device), (0, width * self.world - p))
        chunks = padded.view(k, self.world, width).transpose(0, 1).contiguous()
        shard = torch.empty(k * width, dtype=rows.dtype, device=self.device)
        # reduce_scatter_single is the name from torch 2.13 on (reduce_scatter_tensor before)
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(shard, chunks.view(-1), op=dist.ReduceOp.SUM, group=self.group)
        return shard.view(k, width) / self.world

    def gather_rows(self, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of every rank's tensor, stacked in rank order."""
        local = tensor.detach()[:rows].to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts).to(tensor.device)


def rank_group_for(model: torch.nn.Module, sharded: ShardedParameters | None = None
                   ) -> RankGroup | None:
    """The ranks of a DDP-wrapped or FSDP2-sharded (``sharded``) model, or None for a model
    trained in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if sharded is not None:
        return RankGroup(sharded.process_group, sharded.device, sharded=True)
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    device = next(model.parameters()).device
    if dist.get_backend(model.process_group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return RankGroup(model.process_group, device)


def rows_of(tensor: Any) -> int:
    """The rows a watched tensor holds on this rank (0 where there is none)."""
    return tensor.shape[0] if isinstance(tensor, torch.Tensor) and tensor.ndim else 0


def rows_matrix(name: str, tensor: torch.Tensor, is_latent: bool,
                max_rows: int) -> torch.Tensor:
    """A watched tensor as [rows, features], single or double precision, for the gather."""
    if is_latent:
        matrix = as_matrix(name, tensor, max_rows)
    else:
        if tensor.ndim == 0 or tensor.is_complex():
            raise ProbeUsageError(f"{name!r} must be a real tensor with a batch dimension, "
                                  f"got {tensor.dtype} of shape {list(tensor.shape)}")
        matrix = tensor.detach().reshape(tensor.shape[0], -1)
    # Integer labels and targets travel as float64, exact for any class id below 2^53.
    return matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.double()


def globalize(ranks: RankGroup, numbers: StepNumbers, names: list[str], rows: list[int],
              max_rows: int) -> StepNumbers:
    """The ranks' numbers combined into those of the global batch (see the module docstring).

    Under DDP the Jacobian rows are all-reduced with the losses and latent-gradient norms.
    Under FSDP2 they are reduce-scattered instead, and only each rank's K x K Gram matrix of
    its shard of the global rows travels in the all-reduce (fsdp.py)."""
    k = numbers.loss_values.numel()
    if ranks.sharded:
        gram = torch.zeros(k, k, dtype=torch.float64, device=ranks.device)
        if numbers.jacobian is not None:
            shard = ranks.mean_shard(numbers.jacobian)
            gram = shard @ shard.T
        rows_part = gram.reshape(-1)
    else:
        rows_part = numbers.jacobian.reshape(-1)
    flat = torch.cat([numbers.loss_values.to(ranks.device), rows_part.to(ranks.device),
                      numbers.latent_grad_norms.square().reshape(-1).to(ranks.device)])
    summed = ranks.sum(flat).to(numbers.loss_values.device)
    size = rows_part.numel()
    rows_sum = summed[k:k + size]
    if ranks.sharded:
        jacobian, gram = None, rows_sum.reshape(k, k)
    else:
        jacobian, gram = rows_sum.reshape(numbers.jacobian.shape) / ranks.world, None
    observed = dict(numbers.observed)
    per_rank = max(1, max_rows // ranks.world)
    for name, fewest in zip(names, rows):
        if fewest == 0:  # missing on some rank: nothing comparable to gather
            observed.pop(name, None)
        else:
            observed[name] = ranks.gather_rows(observed[name], min(fewest, per_rank))
    # The global loss is the mean of the ranks' losses, so d(global)/d(latent rows of rank r)
    # is the rank's own latent gradient divided by the world size: squared norms add up
    # divided by world^2.
    squared = summed[k + size:].reshape(numbers.latent_grad_norms.shape) / ranks.world ** 2
    # Under DDP the all-reduced rows split into per-layer blocks as a single process's do;
    # under FSDP2 each rank holds a shard of the columns, and no blocks are recorded.
    return StepNumbers(summed[:k] / ranks.world, jacobian, squared.sqrt(), observed,
                       numbers.local_groups, gram, None if ranks.sharded else numbers.layout)
