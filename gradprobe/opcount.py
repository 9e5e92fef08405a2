"""Count what code asks of torch: the aten ops it dispatches and the host synchronisations.

A measuring tool for the probe's cost on a GPU that runs without one (benchmarks, tests). It is
no stage of the pipeline and nothing in it imports it.

A host synchronisation is a point where the Python thread waits for the device to finish its
queued work, because it needs a value the device computes. Counted, on the thread that enters
:func:`count_ops` (autograd's worker threads inherit it; other threads are not counted):

- ``scalar_reads``: ``aten::_local_scalar_dense``, which every ``.item()``, ``bool(t)``,
  ``float(t)``, ``int(t)`` and f-string of a tensor dispatches;
- ``host_copies``: a blocking copy between the host and a device (``.cpu()``, ``.tolist()``,
  ``.numpy()``, ``.to(device)``; on CUDA a non-blocking copy is not one, see ``async_copies``).
  A CPU run has no device, so there the copies the same code would make on a GPU are counted
  where they are asked for: ``.cpu()``, ``.tolist()``, ``.numpy()``, ``np.asarray(t)`` and
  ``.to("cpu")`` of any tensor (``.to(device)`` with a device object is not counted: on a CPU
  run it cannot be told from a move to the model's own device);
- ``sync_ops``: ops whose CUDA kernels read a device value on the host before they return
  (outputs whose size depends on the data, linear algebra that checks LAPACK's ``info``):
  :data:`SYNCING_OPS`, and indexing with a boolean mask.

On a CPU run the three together are what the same code would synchronise on a GPU, with one
over-count: a ``.tolist()`` of a tensor that lives on the host on a GPU too is counted.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounts", "count_ops", "SYNCING_OPS"]

# Ops whose CUDA implementation waits for the device: data-dependent output sizes, and the
# linear algebra that PyTorch documents as "synchronizes that device with the CPU".
SYNCING_OPS = frozenset({
    "aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::bincount", "aten::equal",
    "aten::repeat_interleave", "aten::_linalg_eigh", "aten::_linalg_svd",
    "aten::linalg_eig", "aten::_linalg_check_errors", "aten::cholesky", "aten::linalg_lstsq",
})
_MASK_INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_",
                            "aten::_index_put_impl_"})
_COPIES = frozenset({"aten::_to_copy", "aten::copy_"})
# Python-level reads of a tensor's values on the host (counted as copies on a CPU run).
_HOST_READS = frozenset({"cpu", "tolist", "numpy", "__array__"})

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


@dataclass
class OpCounts:
    """What one block of code dispatched; ``syncs`` is the number of host synchronisations."""

    ops: int = 0
    scalar_reads: int = 0
    host_copies: int = 0
    sync_ops: int = 0
    async_copies: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_sites: Counter = field(default_factory=Counter)  # "file:line" of the caller -> count

    @property
    def syncs(self) -> int:
        return self.scalar_reads + self.host_copies + self.sync_ops

    def _sync(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.sync_sites[_caller()] += 1


def _caller() -> str:
    """The innermost frame outside torch and this module: the line that asked for the sync."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            return f"{_short(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "<torch>"


def _short(path: str) -> str:
    parts = path.split(os.sep)
    for anchor in ("gradprobe", "benchmarks", "tests"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
    return os.path.basename(path)


def _device_of(value) -> torch.device | None:
    return value.device if isinstance(value, torch.Tensor) else None


class _Counting:
    """A torch mode that adds what it sees to ``counts``."""

    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts


class _Dispatch(_Counting, TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counts = self.counts
        name = func._schema.name
        counts.ops += 1
        counts.by_op[name] += 1
        if name == "aten::_local_scalar_dense":
            counts._sync("scalar_reads")
        elif name in SYNCING_OPS:
            counts._sync("sync_ops")
        elif name in _MASK_INDEXING and _has_mask(args[1] if len(args) > 1 else ()):
            counts._sync("sync_ops")
        elif name in _COPIES:
            self._copy(name, args, kwargs)
        return func(*args, **kwargs)

    def _copy(self, name: str, args, kwargs) -> None:
        if name == "aten::copy_":
            target, source = _device_of(args[0]), _device_of(args[1])
            non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking"))
        else:
            source = _device_of(args[0])
            target = torch.device(kwargs["device"]) if kwargs.get("device") is not None \
                else source
            non_blocking = bool(kwargs.get("non_blocking"))
        if source is None or target is None or source.type == target.type:
            return
        if non_blocking and target.type == "cpu":
            self.counts.async_copies += 1  # into pinned memory: no wait (a pageable one does)
        else:
            self.counts._sync("host_copies")


def _has_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in (indices if isinstance(indices, (list, tuple)) else ()))


class _HostReads(_Counting, TorchFunctionMode):
    """On a CPU run: the Python calls that read a tensor's values on the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" and (
                name in _HOST_READS or (name == "to" and _to_cpu_literal(args[1:], kwargs))):
            self.counts._sync("host_copies")
        return func(*args, **kwargs)


def _to_cpu_literal(args, kwargs) -> bool:
    device = kwargs.get("device", args[0] if args else None)
    return isinstance(device, str) and device.startswith("cpu")


@contextmanager
def count_ops(cpu_as_device: bool = True) -> Iterator[OpCounts]:
    """Count the aten ops and host synchronisations of the block (see the module docstring).

    ``cpu_as_device``: count the host reads of CPU tensors as the copies they would be on a
    GPU (the proxy for a CPU run); pass ``False`` on a GPU run, where the real copies are
    counted where they are dispatched.
    """
    counts = OpCounts()
    if cpu_as_device:
        with _HostReads(counts), _Dispatch(counts):
            yield counts
    else:
        with _Dispatch(counts):
            yield counts
