"""The data-parallel pieces of the training loop (orchestrator/train_loop.py): global batches cut into per-rank
shards, and the DDP wrapper. See train_loop's docstring for what data parallelism guarantees."""
from __future__ import annotations

from typing import Iterator

import torch

from trainables.batchkeys import BatchKeys


def check_world(batch_size: int, world: int) -> None:
    """The recipe's batch is the global batch: W ranks take B/W each, so W must divide B (ValueError)."""
    if world > 1 and int(batch_size) % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by {world} workers: each of the W data-parallel "
                         f"workers takes batch_size/W examples of the recipe's batch; choose W dividing it")


def epoch_steps(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
                ) -> Iterator[tuple[torch.Tensor, BatchKeys]]:
    """(this rank's example indices, their BatchKeys) for each step of one epoch.

    The epoch's permutation is seeded by (seed, epoch) and cut into global batches of `batch_size` (the last may
    be smaller; a batch_size above n means one full batch); rank r takes rows r, r+W, ... of each global batch.
    With W > 1 the permutation is padded with its first examples to a multiple of W (DistributedSampler), so
    every rank makes the same number of equally sized steps (DDP needs that); W must divide batch_size."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) & 0x7FFFFFFFFFFF)
    perm = torch.randperm(n, generator=g)
    if world > 1:
        perm = torch.cat([perm, perm[: -(-n // world) * world - n]])
    batch_size = max(1, min(int(batch_size), len(perm)))
    if batch_size < len(perm):
        check_world(batch_size, world)
    for step, start in enumerate(range(0, len(perm), batch_size)):
        batch = perm[start:start + batch_size]
        rows = torch.arange(rank, len(batch), world)
        yield batch[rows], BatchKeys(int(seed), int(epoch), step, rows, len(batch))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
                  ) -> Iterator[torch.Tensor]:
    """The index batches of `epoch_steps` (this rank's examples of each global batch)."""
    for idx, _ in epoch_steps(n, batch_size, seed, epoch, rank, world):
        yield idx


def ddp_wrap(net):
    """DDP around `net` on its device (device_ids only for a GPU), BatchNorm synchronised where torch can."""
    from torch.nn.parallel import DistributedDataParallel

    from trainables.device import is_cuda

    device = next(net.parameters()).device
    net = sync_batchnorm(net, device)
    return DistributedDataParallel(net, device_ids=[device.index] if is_cuda(device) else None)


def sync_batchnorm(net, device):
    """BatchNorm -> SyncBatchNorm on GPUs (the global batch's statistics, as one process), in place (the new
    layers share the parameters and buffers, so the optimiser and the state dict are unchanged); unchanged on
    CPUs, where torch's SyncBatchNorm does not run (module docstring)."""
    from torch import nn

    from trainables.device import is_cuda

    if not is_cuda(device) or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return net
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert converted is net, "the network's root is a BatchNorm layer: not supported"
    return net


__all__ = ["check_world", "epoch_steps", "epoch_batches", "ddp_wrap", "sync_batchnorm"]
