"""The probe on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 registers *sharded* parameters (DTensors) on the model, but the forward runs on the
all-gathered *unsharded* parameters it swaps in, so the graph's leaves are those: the per-loss
gradients are taken with respect to them (``FSDPParam.unsharded_param``, one stable tensor per
parameter from the first forward on). ``torch.autograd.grad`` fills no ``.grad``, so FSDP2's
post-backward hook finds nothing to reduce-scatter; its pre-backward hooks all-gather the
parameters again for each per-loss pass (docs/distributed.md counts them).

Each rank then holds its local per-loss gradients in full. The Gram matrix of the global
(mean over ranks) gradients needs the cross-rank inner products, so the K x P rows are
reduce-scattered (one collective), each rank takes the K x K Gram of its shard of the global
rows, and those K x K blocks are summed by the probe's one all-reduce (distributed.py).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .watches import ProbeUsageError

try:
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
except ImportError:  # a torch built without distributed support
    FSDPModule = CPUOffloadPolicy = None


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to the model or any of its submodules (as
    Lightning's ModelParallelStrategy leaves a LightningModule whose ``configure_model``
    shards its layers)."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


class ShardedParameters:
    """The FSDP2 parameter groups under a ``fully_shard``-ed model, and their names."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        groups = [group for module in model.modules() if isinstance(module, FSDPModule)
                  for group in module._get_fsdp_state()._fsdp_param_groups]
        if not groups:
            raise ProbeUsageError("the fully_shard-ed model holds no sharded parameter")
        self.groups = groups
        for group in groups:
            if isinstance(group.offload_policy, CPUOffloadPolicy):
                raise ProbeUsageError(
                    "gradprobe does not support FSDP2 with CPUOffloadPolicy (its per-loss "
                    "gradients on offloaded parameters are untested); drop offload_policy= "
                    "on the runs you probe")
            if group.mesh_info.mesh.ndim != 1:
                raise ProbeUsageError(
                    "gradprobe supports FSDP2 on a 1-D device mesh only (plain sharding); "
                    f"this model is sharded on a {group.mesh_info.mesh.ndim}-D mesh (HSDP or "
                    "tensor parallel), whose global gradient it would not compute")
        meshes = {id(group.mesh_info.shard_process_group) for group in groups}
        if len(meshes) != 1:
            raise ProbeUsageError("gradprobe supports FSDP2 models sharded over one process "
                                  "group; this model's parameter groups use several")
        mesh = groups[0].mesh_info.mesh
        self.process_group = groups[0].mesh_info.shard_process_group
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if mesh.device_type == "cuda" else torch.device(mesh.device_type))
        qualified = {id(module): name for name, module in model.named_modules()}
        self._names = {}
        for fsdp_param in self._params():
            info = fsdp_param._module_info
            prefix = qualified[id(info.module)]
            self._names[id(fsdp_param)] = f"{prefix}.{info.param_name}" if prefix \
                else info.param_name

    def _params(self) -> Iterator:
        for group in self.groups:
            yield from group.fsdp_params

    def unsharded_names(self) -> dict[int, str]:
        """``{id(unsharded parameter): name}`` for the parameters gathered so far (a forward
        creates them): the leaves the losses' graphs reach."""
        return {id(p.unsharded_param): self._names[id(p)] for p in self._params()
                if hasattr(p, "_unsharded_param")}

    def unsharded(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The unsharded parameters the forward uses, for the sharded ones the user named
        (those already unsharded stay as they are)."""
        by_id = {id(p.sharded_param): p.unsharded_param for p in self._params()
                 if hasattr(p, "_unsharded_param")}
        by_id.update((id(u), u) for u in list(by_id.values()))
        missing = [p for p in params if id(p) not in by_id]
        if missing:
            raise ProbeUsageError("shared= names a parameter that FSDP2 does not shard in this "
                                  "model; name the model's own (sharded) parameters")
        return [by_id[id(p)] for p in params]
