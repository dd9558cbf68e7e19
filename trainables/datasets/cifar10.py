"""CIFAR-10 from torchvision's pickled batches."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trainables.datasets.base import (ROOT_ENV, DataInfo, DatasetNotFoundError, DatasetSplits, TensorSplit,
                                      _md5_note, _try_download)

# --- cifar10 ------------------------------------------------------------------------------------------------

CIFAR_HOST = "www.cs.toronto.edu"
CIFAR_VAL_FRACTION = 0.1            # the last 10% of the training batches (5,000 of 50,000)


def _load_cifar10(root: Path, explicit: bool, download: bool) -> DatasetSplits:
    """CIFAR-10 from torchvision's pickled batches. Train: the first 90% of the 50,000 training images
    (45,000), val: the last 10% (5,000), test: the 10,000 test images. No augmentation (the model sees [0,1]
    pixels; Cohen et al.'s random crop + flip is left to the trainable)."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    files = [folder / f for f, _ in CIFAR10.train_list + CIFAR10.test_list]
    files.append(folder / CIFAR10.meta["filename"])
    how = ""
    if not all(f.is_file() for f in files):
        why = _try_download(CIFAR_HOST, lambda: CIFAR10(str(root), train=True, download=True), download)
        if why is not None or not all(f.is_file() for f in files):
            raise DatasetNotFoundError(
                f"cifar10: CIFAR-10 not found under {folder} (expected data_batch_1..5, test_batch, "
                f"batches.meta); {why or 'download finished without the expected files'}. Download "
                f"{CIFAR10.url} and extract it into {root}, or run "
                f"torchvision.datasets.CIFAR10({str(root)!r}, download=True) with network; "
                f"point --data-root / {ROOT_ENV} at the folder holding {CIFAR10.base_folder}/.")
        how = " (downloaded)"
    md5s = [(folder / f, m) for f, m in CIFAR10.train_list + CIFAR10.test_list]
    md5s.append((folder / CIFAR10.meta["filename"], CIFAR10.meta["md5"]))
    check = _md5_note("cifar10", md5s)

    def batches(names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)

    with open(folder / CIFAR10.meta["filename"], "rb") as f:
        classes = tuple(pickle.load(f, encoding="latin1")[CIFAR10.meta["key"]])
    x, y = batches([f for f, _ in CIFAR10.train_list])
    n_val = round(CIFAR_VAL_FRACTION * len(y))
    train, val = TensorSplit(x[:-n_val], y[:-n_val]), TensorSplit(x[-n_val:], y[-n_val:])
    test = TensorSplit(*batches([f for f, _ in CIFAR10.test_list]))
    info = DataInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                    source=f"torchvision CIFAR-10 from {root}{how}{check}", class_names=classes)
    notes = (f"validation = the last {n_val:,} training images", "no data augmentation")
    return DatasetSplits(info, train, val, test, notes)


