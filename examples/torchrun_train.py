"""gradprobe under torchrun, with DDP or FSDP2 (docs/distributed.md).

    torchrun --nproc_per_node=2 examples/torchrun_train.py --strategy fsdp --out run.gprobe

torchrun starts one process per rank and sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT,
which ``init_process_group`` reads. Every rank builds the probe with the same arguments; only
rank 0 writes ``--out``. gloo on CPU, nccl on GPUs.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import gradprobe


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                         torch.nn.Linear(32, 16))
        self.a, self.b = torch.nn.Linear(16, 1), torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.trunk(x)
        return self.a(h), self.b(h)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--out", default="torchrun_run.gprobe")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TwoHeads().to(device)
    if args.strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        inner = model.module
    else:
        fully_shard(model.trunk)  # each fully_shard-ed module is one all-gather group
        fully_shard(model)
        inner = model
    probe = gradprobe.Probe(model, every=5, run_file=args.out, overwrite=True)
    probe.watch_latent("h", inner.trunk)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)  # each rank: its own share of the batch
    for _ in range(args.steps):
        x, y = torch.randn(32, 8, generator=gen).to(device), torch.randn(32, 1, generator=gen)
        pred, aux = model(x)
        losses = {"task": F.mse_loss(pred, y.to(device)), "reg": aux.pow(2).mean()}
        probe.backward(losses, weights={"reg": 0.1})
        opt.step()
        opt.zero_grad()
    probe.close()
    if rank == 0:
        print("grad_cosine task|reg:", gradprobe.load_run(args.out).series("grad_cosine",
                                                                          "task|reg")[1])
    # Leave together: once in CI, under load, rank 1 aborted at exit ("terminate called
    # without an active exception") while rank 0 was still reading the run file.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
