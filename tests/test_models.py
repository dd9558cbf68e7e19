"""The model zoo (trainables/models.py): output shapes, LeNet's layers, ResNet-110's depth, Normalize first.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.data import DataInfo
from trainables.models import ARCHITECTURES, DEFAULT_ARCHITECTURE, Normalize, build_model

@pytest.fixture(autouse=True)
def one_thread():
    """Small forwards on a shared 2-core machine: a second OpenMP thread only spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


INFOS = {
    "mnist": DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,)),
    "cmnist": DataInfo("cmnist", 2, (2, 14, 14), (0.1, 0.1), (0.2, 0.2)),
    "cifar10": DataInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "celeba": DataInfo("celeba", 2, (3, 64, 64), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("dataset", ["mnist", "cmnist", "cifar10"])
def test_output_shape(arch, dataset):
    info = INFOS[dataset]
    if arch == "lenet" and info.input_shape[-1] < 28:
        pytest.skip("LeNet's two 5x5 convolutions and poolings need >= 28 pixels")
    model = build_model(arch, info).eval()
    with torch.no_grad():
        out = model(torch.rand(3, *info.input_shape))
    assert out.shape == (3, info.num_classes)


def test_default_architectures_fit_their_datasets():
    for dataset, info in INFOS.items():
        model = build_model(DEFAULT_ARCHITECTURE[dataset], info).eval()
        with torch.no_grad():
            assert model(torch.rand(2, *info.input_shape)).shape == (2, info.num_classes)


def test_lenet_layers():
    model = build_model("lenet", INFOS["mnist"])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)),
                                                                                (20, 50, (5, 5))]
    assert [(f.in_features, f.out_features) for f in fcs] == [(800, 500), (500, 10)]
    # max-pool 2x2 after each convolution: 28 -> 24 -> 12 -> 8 -> 4, so 50 * 4 * 4 = 800 features
    feats = {}

    def record(name):
        def hook(module, inputs, output):
            feats[name] = inputs[0].shape  # returns None: the output is left alone
        return hook

    convs[1].register_forward_hook(record("conv2_in"))
    fcs[0].register_forward_hook(record("fc1_in"))
    model(torch.rand(1, 1, 28, 28))
    assert feats["conv2_in"] == (1, 20, 12, 12) and feats["fc1_in"] == (1, 800)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)


def test_resnet110_depth():
    model = build_model("resnet110", INFOS["cifar10"])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    shortcut = [c for c in convs if c.kernel_size == (1, 1)]
    main_path = [c for c in convs if c.kernel_size == (3, 3)]
    # depth 110 = 1 stem convolution + 3 stages x 18 blocks x 2 convolutions + 1 linear layer
    assert len(main_path) == 1 + 3 * 18 * 2 == 109
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) == 1
    assert len(shortcut) == 2  # projection shortcuts where the width doubles (16->32, 32->64)
    assert {c.out_channels for c in main_path} == {16, 32, 64}
    assert 1.6e6 < sum(p.numel() for p in model.parameters()) < 1.8e6  # ~1.7M parameters (He et al.)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_normalize_is_the_first_layer(arch):
    info = INFOS["cifar10"]
    model = build_model(arch, info)
    first = model[0]
    assert isinstance(first, Normalize)
    x = torch.rand(2, *info.input_shape)
    expected = (x - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(1, -1, 1, 1)
    assert torch.allclose(first(x), expected)
    assert first.lipschitz == pytest.approx(1 / min(info.std))
    # nothing else normalises: the rest of the network is the architecture itself
    assert not any(isinstance(m, Normalize) for m in list(model.modules())[2:])


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'lenett'"):
        build_model("lenett", INFOS["mnist"])
