"""The one device-to-host transfer of a probe step.

Everything a probe step records is gathered, on the training thread, into one float64 tensor
per device (``torch.cat`` of the pieces, flattened), and that tensor is copied once,
non-blocking, into pinned host memory, after which a CUDA event is recorded. Nothing on the
training thread waits for it: the writer thread (or a user asking for
``probe.last_grad_norms``) waits on the event when it needs the values, and unpacks them into
host tensors of the pieces' shapes. Pieces that already live on the host (a prototype table
kept on the CPU, say) are concatenated on the host, which copies them as they are now.
Integer pieces (group ids, labels) travel as float64, exact below 2^53. Facts the training
thread knows as Python values (a flag the user passed, say) travel beside them as they are.
"""

from __future__ import annotations

import threading

import torch


class Transfer:
    """The pieces of one probe step, on their way to the host (see the module docstring)."""

    def __init__(self, pieces: dict[str, torch.Tensor], facts: dict | None = None):
        self._facts = dict(facts or {})
        self._shapes = {key: tuple(t.shape) for key, t in pieces.items()}
        by_device: dict[torch.device, list[str]] = {}
        for key, tensor in pieces.items():
            by_device.setdefault(tensor.device, []).append(key)
        self._parts: list[tuple[list[str], torch.Tensor, object]] = []
        for device, keys in by_device.items():
            with torch.no_grad():  # what is recorded needs no graph (and no detach op each)
                flat = torch.cat([one_dim(pieces[k]).to(torch.float64) for k in keys])
            event = None
            if device.type == "cuda":
                host = torch.empty(flat.shape, dtype=torch.float64, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                # ``flat`` stays referenced until the copy is done; the allocator's stream
                # order already makes reusing its memory safe.
                self._parts.append((keys, host, (event, flat)))
            else:
                self._parts.append((keys, flat, None))
        self._values: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def values(self) -> dict[str, torch.Tensor]:
        """The pieces as float64 host tensors of their shapes, and the facts; waits for the
        copy (on CUDA)."""
        with self._lock:
            if self._values is None:
                values = dict(self._facts)
                for keys, host, pending in self._parts:
                    if pending is not None:
                        pending[0].synchronize()
                    sizes = [_numel(self._shapes[k]) for k in keys]
                    for key, part in zip(keys, torch.split(host, sizes)):
                        values[key] = part.view(self._shapes[key])
                self._values = values
                self._parts = [(keys, host, None) for keys, host, _ in self._parts]
            return self._values


def one_dim(t: torch.Tensor) -> torch.Tensor:
    """``t`` as one dimension; a tensor that has one already is returned as it is (``reshape``
    would dispatch a view op for it, which a probe step pays per piece)."""
    return t if t.ndim == 1 else t.reshape(-1)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
