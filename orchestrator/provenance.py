"""The identity of the data a resumable artifact was made from, so that a resume never mixes two data sets.

    examples_sha256(data, indices)            # content hash of some examples (certify's manifest["data"])
    sweep_data_identity(splits, selection)    # what sweep.json records under "data"
    differences(old, new, keys)               # "key: <old> there, <new> now, ..." for a one-line refusal

Identity is content, not location: the same examples read from another folder, node or file format are the
same data, so paths and loaders are recorded (to tell the user where the data came from) but hashes decide.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import torch

#: a sweep's data provenance that `--resume` must match (sweep.json["data"]); "source" and "root" are recorded
#: only (see the module doc)
SWEEP_DATA_COMPARED = ("dataset", "train_examples", "train_sample_sha256", "val_examples_sha256",
                       "test_examples_sha256", "oracle_examples_sha256")
#: training examples hashed for a sweep's identity. Not all of them: DomainNet's and CelebA's training splits are
#: hundreds of thousands of images, and hashing them would add minutes to every start. 1,000 evenly spaced
#: examples plus the split's size catch another download, another recipe, another order or a changed cap; the
#: selection and test examples, which decide the sweep's figures, are hashed in full.
TRAIN_SAMPLE = 1000


def example(data, i: int) -> tuple[torch.Tensor, int]:
    """Example `i` of a map-style dataset yielding (x, y, ...) as (float32 tensor, int label)."""
    item = data[i]
    return torch.as_tensor(item[0], dtype=torch.float32), int(item[1])


def examples_sha256(data, indices: Sequence[int]) -> str:
    """sha256 of the examples' content (pixels as float32 and labels, in `indices` order): the data's
    identity, whatever folder, file format or download it came from."""
    h = hashlib.sha256()
    for i in indices:
        x, y = example(data, i)
        h.update(x.contiguous().numpy().tobytes())
        h.update(int(y).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def _short(v: Any) -> str:
    text = repr(v)
    return text[:16] + "…'" if isinstance(v, str) and len(v) == 64 else text


def differences(old: Mapping[str, Any], new: Mapping[str, Any], keys: Sequence[str]) -> str:
    """The keys whose values differ, as "key: <old> there, <new> now" joined by commas ("" when none)."""
    diff = [k for k in keys if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now" for k in diff)


def sweep_data_identity(splits, selection) -> dict[str, Any]:
    """What a sweep was trained and selected on: the dataset, where it was read from (recorded, not compared),
    the training split's size and a content hash of TRAIN_SAMPLE evenly spaced training examples, and content
    hashes of the validation examples that score trials, the test examples that report the final figures and
    (oracle protocol) the test-domain hold-out."""
    train = splits.train
    step = max(1, len(train) // TRAIN_SAMPLE)
    return {
        "dataset": splits.info.name, "source": splits.info.source,
        "train_examples": len(train),
        "train_sample_sha256": examples_sha256(train, range(0, len(train), step)[:TRAIN_SAMPLE]),
        "val_examples_sha256": examples_sha256(splits.val, selection.sel_indices),
        "test_examples_sha256": examples_sha256(splits.test, selection.test_indices),
        "oracle_examples_sha256": (examples_sha256(splits.test, selection.oracle_indices)
                                   if selection.oracle_indices else None),
    }


__all__ = ["SWEEP_DATA_COMPARED", "TRAIN_SAMPLE", "differences", "example", "examples_sha256",
           "sweep_data_identity"]
