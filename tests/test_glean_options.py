"""GLEAN's options beyond the paper's defaults: per-dataset batches, the IRM reference's one-logit head, the
training noise (`train_sigma`) and the MLP's depth (issue 14 items 4 and 7)."""
from __future__ import annotations

import torch

from test_glean import CMNIST, IMAGES, _batch, _lipschitz_holds, one_thread  # noqa: F401  (the fixture)
from trainables.glean import Glean
from trainables.lipschitz import orthogonal_layers


def test_per_dataset_batch_size_and_one_logit_head():
    assert Glean(None, CMNIST).hparams["batch_size"] == 60_000            # full batch as IRM
    assert Glean({"width": 4}, IMAGES).hparams["batch_size"] == 128       # celeba: mini-batches
    assert Glean({"batch_size": 32, "width": 4}, IMAGES).hparams["batch_size"] == 32
    t = Glean({"hidden": 8, "head": "one_logit", "l2_scope": "head"}, CMNIST)   # the IRM reference's head
    z = torch.randn(5, 8)
    logits = t.net.head(z)
    assert torch.equal(logits[:, 0], torch.zeros(5)) and t.net.head.weight.shape == (2, 8)
    assert torch.allclose(logits, z @ t.net.head.weight.T + t.net.head.bias)
    assert [p.shape for p in t.l2_parameters()] == [torch.Size([1, 8]), torch.Size([1])]   # head only


def test_train_sigma_is_the_training_noise_and_depth_the_hidden_layers():
    """train_sigma (item 7's experiments) replaces sigma in training only: one update with sigma 0.12 and
    train_sigma 0.5 equals one with sigma 0.5, differs from plain sigma 0.12, and certifies at sigma 0.12."""
    x, y, d = _batch(CMNIST, 16)

    def after_one_update(hparams):
        torch.manual_seed(0)
        t = Glean({"hidden": 8, **hparams}, CMNIST)
        torch.manual_seed(1)
        t.update(x, y, d)
        return t, torch.cat([p.detach().flatten() for p in t.net.parameters()])

    split, w_split = after_one_update({"sigma": 0.12, "train_sigma": 0.5})
    _, w_wide = after_one_update({"sigma": 0.5})
    _, w_narrow = after_one_update({"sigma": 0.12})
    assert torch.equal(w_split, w_wide) and not torch.allclose(w_split, w_narrow)
    assert split.certifier().sigma == 0.12
    deep = Glean({"hidden": 8, "depth": 3}, CMNIST)
    assert len(orthogonal_layers(deep.net.encoder)) == 3
    _lipschitz_holds(deep, pairs=32)
