"""Real 2-process runs on CPU (gloo) for the distributed tests: each rank joins the process
group, trains, and saves its results to ``rank<r>.pt`` (``rank_results``); the test process
spawns the ranks under a deadline and reads back what they saved (``spawn_ranks``)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    """In a rank: one torch thread, and a gloo group whose collectives fail after 30 s instead
    of hanging the test on a deadlock."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))


@contextlib.contextmanager
def rank_results(rank: int, world: int, port: int, out: Path):
    """In a rank: join the group and yield the dict of this rank's results; leave the group
    however the body ends, and save the results (``rank<r>.pt`` in ``out``) when it ends well."""
    join_group(rank, world, port)
    result: dict = {}
    try:
        yield result
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def spawn_ranks(worker: Callable[[int, int, str], None], out: Path, world: int,
                deadline: float = 120.0) -> list[dict]:
    """Run ``worker(rank, port, out)`` in ``world`` spawned processes; each rank's saved result,
    in rank order. Ranks still running after ``deadline`` seconds are killed and the test fails."""
    context = mp.start_processes(worker, args=(free_port(), str(out)), nprocs=world,
                                 join=False, start_method="spawn")
    start = time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - start > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {deadline:.0f} s")
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
