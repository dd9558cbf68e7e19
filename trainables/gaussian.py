"""Gaussian data augmentation (Cohen, Rosenfeld & Kolter 2019): cross-entropy on x + N(0, σ²I).

`SgdTrainable` is the base of every input-space baseline and of DRF. Its optimiser is the DRF paper's recipe
(released configs): SGD, momentum 0.9, Nesterov without dampening, weight decay 1e-4, batch 256, lr x0.1 at
1/3 and 2/3 of the run's epochs (MNIST 30/60 of 90; CIFAR-10 50/100 of 150). The learning rate is per dataset
(MNIST 0.01, CIFAR-10 0.1): `RECIPES` below is the one place that says so; it sits beneath the user's
overrides, so `--set lr=...` still wins.

`SgdTrainable` also counts finished epochs (`self.epoch`, resumed from the state dict) so that the schedules
of its subclasses (ε warm-up, MACER's deferred regulariser) scale with the run's epochs: `ramp`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from trainables.base import Trainable
from trainables.data import DataInfo
from trainables.device import HOST
from trainables.hparams import ARCH_CHECK, HParam
from trainables.models import DEFAULT_ARCHITECTURE, build_model

SIGMAS = (0.12, 0.25, 0.5, 1.0)
#: the training (and certification) noise level: the same declaration for every input-space method
SIGMA = HParam(0.25, choices=SIGMAS, check="> 0", doc="noise level in training and certification")

#: per-dataset departures from the SGD_HPARAMS defaults (the DRF paper's training details): applied beneath
#: the user's overrides. MNIST uses the declared defaults (lr 0.01).
RECIPES: dict[str, dict[str, Any]] = {
    "cifar10": {"lr": 0.1, "augment": True},
}


def ramp(epoch: int, epochs: int, fraction: float) -> float:
    """Linear warm-up factor in (0, 1] for 0-based `epoch` of a run of `epochs`.

    The released SmoothAdv/Consistency/SmoothMix loops use min(1, (epoch + 1) / W) with W = 10 of 90 epochs;
    here W = round(fraction * epochs), so the warm-up keeps its share of a shorter run. W = 0 (fraction 0, or a
    run too short for one warm-up epoch) means no warm-up: the factor is 1 from the first epoch.
    """
    width = round(fraction * epochs)
    return 1.0 if width <= 0 else min(1.0, (epoch + 1) / width)

#: optimiser hyperparameters shared by the input-space baselines (DRF paper, MNIST)
SGD_HPARAMS: dict[str, HParam] = {
    "lr": HParam(0.01, 1e-3, 0.1, log=True, check="> 0", doc="SGD learning rate (DRF MNIST recipe)"),
    "momentum": HParam(0.9, check="in [0, 1)", doc="Nesterov momentum"),
    "weight_decay": HParam(1e-4, check=">= 0", doc="L2 weight decay"),
    "batch_size": HParam(256, check=">= 1", doc="examples per optimisation step"),
    "arch": HParam("", check=ARCH_CHECK, doc="architecture; '' = the dataset's default (trainables.models.DEFAULT_ARCHITECTURE)"),
    "augment": HParam(False, choices=(True, False),
                      doc="random crop (padding 4) + horizontal flip of training batches (CIFAR-10 recipe: on)"),
}


class SgdTrainable(Trainable):
    """A classifier from the model zoo trained by Nesterov SGD with step decay at 1/3 and 2/3 of the run."""

    def __init__(self, hparams: Mapping[str, Any] | None, info: DataInfo, epochs: int = 1,
                 device: str | torch.device = HOST):
        super().__init__({**RECIPES.get(info.name, {}), **(hparams or {})}, info, epochs, device)
        self.epoch = 0  # finished epochs: the 0-based index of the epoch being trained
        # crop/flip draws: seeded from the global generator (the loop seeds it), saved with the state
        self._augment_rng = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The training batch as the recipe augments it (trainables.augment.crop_flip when `augment`)."""
        if not self.hparams.get("augment"):
            return x
        from trainables.augment import crop_flip
        return crop_flip(x, self._augment_rng)

    def build_net(self):
        arch = self.hparams["arch"] or DEFAULT_ARCHITECTURE[self.info.name]
        return build_model(arch, self.info)

    def build_optimizer(self):
        h = self.hparams
        opt = torch.optim.SGD(self.net.parameters(), lr=h["lr"], momentum=h["momentum"],
                              weight_decay=h["weight_decay"], nesterov=h["momentum"] > 0)
        milestones = sorted({max(1, round(self.epochs / 3)), max(1, round(2 * self.epochs / 3))})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        return opt

    def end_epoch(self, epoch: int) -> dict[str, float]:
        self.scheduler.step()
        self.epoch = epoch + 1
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self):
        return {**super().state_dict(), "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                "augment_rng": self._augment_rng.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state.get("epoch", 0))
        if "augment_rng" in state:
            self._augment_rng.set_state(state["augment_rng"])


class Gaussian(SgdTrainable):
    NAME = "gaussian"
    HPARAMS = {
        "sigma": SIGMA,
        **SGD_HPARAMS,
    }

    def update(self, x, y, d):
        self.model.train()
        x, y = self.augment(x.to(self.device)), y.to(self.device)
        loss = F.cross_entropy(self.model(x + self.example_noise(x) * self.sigma), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item()}
