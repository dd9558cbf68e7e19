"""CIFAR-10's training augmentation as the released code applies it: RandomCrop(32, padding=4) + horizontal flip.

Cohen et al., Salman et al. and Jeong & Shin train CIFAR-10 with torchvision's
`Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor()])` on the training split only. We apply
the same to whole training batches already in [0,1] (our data loaders never augment; `trainables.data`), on
the batch's device, drawing the crop offsets and flips from a seeded `torch.Generator` so a run is reproducible:

- pad every side by `padding` zero pixels (RandomCrop's default fill 0, padding_mode "constant");
- crop a `size` window at a uniform offset in {0..2·padding}² per example;
- flip left-right with probability 1/2 per example.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Randomly cropped (after zero padding) and horizontally flipped copy of the batch x [B, C, H, W]."""
    if x.dim() != 4:
        raise ValueError(f"crop_flip expects a batch [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    span = 2 * padding + 1
    top = torch.randint(0, span, (b,), generator=generator)
    left = torch.randint(0, span, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = top[:, None] + torch.arange(h)                                  # [B, H]
    cols = left[:, None] + torch.arange(w)                                 # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
