"""Checkpoints: what `trainables.checkpoint.save` writes loads back with torch's weights_only=True, for every
registered trainable (the refusal of a malicious pickle is a bad-input case: tests/test_bad_input.py)."""
from __future__ import annotations

import torch

from test_bad_input import CMNIST_INFO, MNIST_INFO
from trainables import checkpoint


def test_every_trainable_checkpoint_loads_with_weights_only(tmp_path):
    """weights_only=True loads what `save` writes, for every registered trainable (the allow-list suffices)."""
    from trainables.registry import TRAINABLES, get_trainable

    for name in TRAINABLES:
        cls = get_trainable(name)
        if "mnist" not in cls.DATASETS and "cmnist" not in cls.DATASETS:
            continue
        info = MNIST_INFO if "mnist" in cls.DATASETS else CMNIST_INFO
        trainable = cls({}, info, epochs=1)
        path = checkpoint.save(tmp_path / f"{name}.pt", trainable, epoch=1)
        loaded, blob = checkpoint.load(path)
        assert blob["trainable"] == name
        for k, v in trainable.net.state_dict().items():
            assert torch.equal(v, loaded.net.state_dict()[k])
