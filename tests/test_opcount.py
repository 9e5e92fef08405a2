"""The op and host-sync counter the benchmark uses, against hand-counted snippets."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gradprobe.opcount import count_ops


def test_scalar_reads_are_counted_one_per_read_with_the_calling_line():
    x = torch.arange(6, dtype=torch.float64)
    with count_ops() as counts:
        total = 0.0
        for i in range(5):
            total += x[i].item()          # 5 reads
        flag = bool(x.sum() > 3)          # 1
        value = float(x.max())            # 1
        index = int(x.argmax())           # 1
    assert (total, flag, value, index) == (10.0, True, 5.0, 5)
    assert counts.scalar_reads == 8 and counts.syncs == 8
    assert counts.by_op["aten::_local_scalar_dense"] == 8
    (site, n), = [(s, n) for s, n in counts.sync_sites.items() if n == 5]
    assert site.startswith("tests/test_opcount.py:")


def test_device_side_arithmetic_counts_its_ops_and_no_sync():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with count_ops() as counts:
        c = (a + b) * 2.0                 # add, mul
        g = c.T @ c                       # permute (the transpose view), mm
    assert dict(counts.by_op) == {"aten::add": 1, "aten::mul": 1, "aten::permute": 1,
                                  "aten::mm": 1}
    assert counts.ops == 4 and counts.syncs == 0
    with count_ops() as counts:
        flag = torch.isfinite(g).all()    # a tensor flag: no sync
    assert counts.syncs == 0 and counts.by_op["aten::all"] == 1 and flag.dtype == torch.bool


def test_host_reads_of_cpu_tensors_count_as_copies_on_a_cpu_run_only():
    x = torch.randn(3)

    def reads():
        x.tolist()
        x.cpu()
        x.numpy()
        np.asarray(x)
        x.to("cpu")
        x.to(torch.float64)               # a dtype change: no host read

    with count_ops() as proxy:
        reads()
    with count_ops(cpu_as_device=False) as plain:
        reads()
    assert proxy.host_copies == 5 and proxy.syncs == 5
    assert plain.syncs == 0


def test_ops_whose_cuda_kernels_wait_for_the_device_are_counted():
    x = torch.randn(8, 8)
    labels = torch.tensor([0, 2, 2, 5])
    with count_ops() as counts:
        torch.unique(labels, return_counts=True)   # 1: data-dependent output size
        torch.bincount(labels)                     # 1
        x[x > 0]                                   # 1: boolean mask indexing
        torch.linalg.eigvalsh(x @ x.T)             # 1: LAPACK info is checked
        x[torch.tensor([0, 1])]                    # integer indexing: no sync
    assert counts.sync_ops == 4 and counts.syncs == 4


def test_backward_ops_are_counted_and_other_threads_are_not():
    w = torch.randn(3, requires_grad=True)
    seen_elsewhere = []
    with count_ops() as counts:
        (w * w).sum().backward()
        worker = threading.Thread(target=lambda: seen_elsewhere.append(float(w.detach().sum())))
        worker.start()
        worker.join()
    assert counts.by_op["aten::mul"] >= 2  # forward, and the backward of w * w
    assert seen_elsewhere and counts.syncs == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_blocking_and_not():
    x = torch.randn(16, device="cuda")
    pinned = torch.empty(16, pin_memory=True)
    with count_ops(cpu_as_device=False) as counts:
        x.cpu()                                    # blocking device -> host: a sync
        x.tolist()                                 # a sync
        pinned.copy_(x, non_blocking=True)         # into pinned memory: no wait
        x.sum().item()                             # a sync
    assert counts.host_copies == 2 and counts.scalar_reads == 1 and counts.async_copies == 1
