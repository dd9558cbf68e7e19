"""Certified accuracy on a radius grid and ACR. (Being written.)"""
from __future__ import annotations

import numpy as np

#: radius grids of the papers' tables: DRF certifies at radii 0-2.75 step 0.25 (MNIST, CIFAR-10);
#: GLEAN at 0-0.45 step 0.05 (CMNIST, CelebA, DomainNet).
RADII_DRF = tuple(round(r, 2) for r in np.arange(0, 2.75 + 1e-9, 0.25))
RADII_GLEAN = tuple(round(r, 2) for r in np.arange(0, 0.45 + 1e-9, 0.05))
RADII_BY_DATASET = {"mnist": RADII_DRF, "cifar10": RADII_DRF,
                    "cmnist": RADII_GLEAN, "celeba": RADII_GLEAN, "domainnet": RADII_GLEAN}
