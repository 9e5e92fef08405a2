"""A Lightning fit with GradProbeCallback, run as a script by tests/test_lightning_distributed.py:
``python lightning_fit.py {single,ddp,fsdp} RUN_FILE``. ``ddp``: Lightning's DDP strategy on 2
CPU processes; ``fsdp``: ModelParallelStrategy (FSDP2) on 2 CPU processes; ``single``: one
process on the global batch (both ranks' shares). Lightning's launcher starts rank 1 by running
this script again."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from gradprobe.integrations.lightning import GradProbeCallback

PER_RANK_BATCH = 16


class TwoHeads(pl.LightningModule):
    def __init__(self, shard: bool):
        super().__init__()
        torch.manual_seed(0)
        self.shard = shard
        self.trunk = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                         torch.nn.Linear(32, 15))
        self.a, self.b = torch.nn.Linear(15, 1), torch.nn.Linear(15, 4)

    def configure_model(self):
        if self.shard:
            from torch.distributed.fsdp import fully_shard
            # Lightning calls training_step, not forward: shard the layers training_step
            # calls (a fully_shard on the LightningModule itself would never gather).
            for layer in (self.trunk, self.a, self.b):
                fully_shard(layer)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {"task": F.mse_loss(self.a(h), y), "reg": self.b(h).pow(2).mean()}

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(256, 8, generator=gen),
                                              torch.randn(256, 1, generator=gen))
        world = self.trainer.world_size
        # Rank r takes rows r, r + 2, ... in order: together the ranks' batches of 16 are the
        # single process's batch of 32.
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world,
                                                      rank=self.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(data, batch_size=PER_RANK_BATCH * (2 // world),
                                           sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(mode: str, run_file: str) -> None:
    if mode == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp" if mode == "ddp" else "auto"
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", devices=1 if mode == "single" else 2,
                         strategy=strategy, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False,
                         callbacks=[GradProbeCallback(run_file=run_file, every=2,
                                                      overwrite=True)])
    trainer.fit(TwoHeads(shard=mode == "fsdp"))


if __name__ == "__main__":
    main(*sys.argv[1:])
