"""Training noise that does not depend on how a batch is shared out over data-parallel ranks.

The training loop (orchestrator/train_loop.py) cuts each epoch's permutation (seeded by (seed, epoch)) into
GLOBAL batches of the recipe's batch size B; with W ranks, rank r takes rows r, r+W, r+2W, ... of each global
batch (DistributedSampler's sharding). Before each `update` it hands the trainable a `BatchKeys`: the step's
(seed, epoch, step) and the rows its examples occupy in the global batch.

A trainable draws the noise of its examples with `BatchKeys.normal`: a generator seeded by (seed, epoch, step,
stream) draws the noise of the WHOLE global batch, [G, *shape], and the process keeps its own rows. So the noise
of an example is a function of (seed, epoch, its global position in the epoch's example stream) only -- not of
the world size -- and W ranks draw exactly the noise one process draws for the same global batch. (Each rank
generates the noise of all G examples and keeps 1/W of it: generation costs G * shape normals per step, small
next to the forward pass; it avoids one generator per example, which costs ~µs each -- 0.25 s per step for
GLEAN's full batches.)

Noise is drawn on the working device with that device's generator (CUDA and CPU generators give different, but
equally valid, streams); all ranks of a run share one device type, so they agree.

Without keys (a trainable called directly, outside the loop) trainables fall back to torch's global generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK = (1 << 63) - 1


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing: neighbouring inputs give unrelated seeds)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & ((1 << 64) - 1)
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
        h ^= h >> 31
    return h & _MASK


@dataclass(frozen=True)
class BatchKeys:
    """Where this process's examples sit in one global batch (module docstring)."""

    seed: int
    epoch: int
    step: int              # the global batch's index within the epoch
    rows: torch.Tensor     # [b] positions of this process's examples in the global batch, in the order of x
    #                        (ascending; all G of them, in order, when one process holds the batch)
    size: int              # G, examples in the global batch (all ranks)

    @classmethod
    def local(cls, seed: int, epoch: int, step: int, b: int) -> "BatchKeys":
        """One process holding the whole global batch of b examples."""
        return cls(seed, epoch, step, torch.arange(b), b)

    def split(self, parts: int) -> list["BatchKeys"]:
        """Keys of `torch.tensor_split(x, parts)`'s chunks (same global batch, the chunk's rows)."""
        return [BatchKeys(self.seed, self.epoch, self.step, r, self.size)
                for r in torch.tensor_split(self.rows, parts)]

    def generator(self, stream: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(mix(self.seed, self.epoch, self.step, stream))

    def normal(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32,
               stream: int = 0) -> torch.Tensor:
        """Standard normal noise [b, *shape] for this process's examples (row i: the example at rows[i])."""
        full = torch.randn((self.size, *shape), generator=self.generator(stream, torch.device(device)),
                           device=device, dtype=dtype)
        if len(self.rows) == self.size:     # the whole global batch (one process): rows are 0..G-1
            return full
        return full.index_select(0, self.rows.to(full.device))


__all__ = ["BatchKeys", "mix"]
