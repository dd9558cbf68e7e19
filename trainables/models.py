"""The model zoo. Every network starts with `Normalize`, so callers add noise in [0,1] pixel space and
every certified radius is a pixel-space l2 radius.

MNIST differs from the released models here: Cohen's, Salman's and Jeong & Shin's code (on which the DRF paper's
MNIST rows are trained) uses no normalisation for MNIST (`get_normalize_layer("mnist")` is the identity), while
our MNIST LeNet starts with Normalize((0.1307,), (0.3081,)). We keep it: a fixed per-channel affine map before a
convolution is absorbed by that convolution (weights / std, bias shifted), so the function class, the certified
radii and the input gradients of any given function are unchanged; what differs is SGD's conditioning of the
first layer (its effective learning rate), so trajectories at the paper's lr 0.01 are not bit-comparable with
the release. CIFAR-10 matches the release (Cohen et al.'s mean/std layer).

- `lenet`: the Consistency/DRF MNIST LeNet (conv 5x5->20, pool, conv 5x5->50, pool, fc 800->500->10).
- `resnet110`: Cohen et al.'s CIFAR ResNet (`archs/cifar_resnet.py`, depth 110: 3 stages of 18 basic blocks,
  16/32/64 channels).
- `mlp3`: a 3-layer MLP (the IRM reference's Colored-MNIST MLP: hidden 256, ReLU).
- `cnn4`: a 4-layer CNN for the image domain datasets (DomainBed's MNIST_CNN layout: 4 convolutions, global
  average pooling, a linear head).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from trainables.data import DataInfo


class Normalize(nn.Module):
    """(x - mean) / std per channel. A layer, not a transform, so noise is added before it."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @property
    def lipschitz(self) -> float:
        """The l2 Lipschitz constant of this layer: 1 / min std."""
        return float(1.0 / self.std.min())


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, side: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        flat = 50 * (((side - 4) // 2 - 4) // 2) ** 2
        self.fc1 = nn.Linear(flat, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class _BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """Cohen et al.'s CIFAR ResNet (He et al. 2016, Sec. 4.2): depth = 6n + 2 with basic blocks."""

    def __init__(self, depth: int = 110, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MLP3(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CNN4(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _flat(info: DataInfo) -> int:
    return math.prod(info.input_shape)


ARCHITECTURES: dict[str, Callable[[DataInfo], nn.Module]] = {
    "lenet": lambda i: LeNet(i.input_shape[0], i.num_classes, i.input_shape[-1]),
    "resnet110": lambda i: CifarResNet(110, i.num_classes, i.input_shape[0]),
    "mlp3": lambda i: MLP3(_flat(i), i.num_classes),
    "cnn4": lambda i: CNN4(i.input_shape[0], i.num_classes),
}

#: the architecture each dataset is trained with unless a trainable says otherwise (papers' choices)
DEFAULT_ARCHITECTURE: dict[str, str] = {
    "mnist": "lenet", "cifar10": "resnet110", "cmnist": "mlp3", "celeba": "cnn4", "domainnet": "cnn4",
}


def build_model(arch: str, info: DataInfo) -> nn.Module:
    """`Normalize(info.mean, info.std)` followed by the named architecture."""
    try:
        body = ARCHITECTURES[arch](info)
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None
    return nn.Sequential(Normalize(info.mean, info.std), body)
