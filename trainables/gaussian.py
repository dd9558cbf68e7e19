"""Gaussian data augmentation (Cohen, Rosenfeld & Kolter 2019): cross-entropy on x + N(0, σ²I).

Optimiser from the DRF paper's MNIST recipe (released configs): SGD, momentum 0.9, Nesterov, lr 0.01,
weight decay 1e-4, batch 256, lr x0.1 at 1/3 and 2/3 of the epochs (30/60 of 90).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.base import Trainable
from trainables.hparams import HParam
from trainables.models import DEFAULT_ARCHITECTURE, build_model

SIGMAS = (0.12, 0.25, 0.5, 1.0)

#: optimiser hyperparameters shared by the input-space baselines (DRF paper, MNIST)
SGD_HPARAMS: dict[str, HParam] = {
    "lr": HParam(0.01, 1e-3, 0.1, log=True, check="> 0", doc="SGD learning rate (DRF MNIST recipe)"),
    "momentum": HParam(0.9, check="in [0, 1)", doc="Nesterov momentum"),
    "weight_decay": HParam(1e-4, check=">= 0", doc="L2 weight decay"),
    "batch_size": HParam(256, check=">= 1", doc="examples per optimisation step"),
    "arch": HParam("", doc="architecture; '' = the dataset's default (trainables.models.DEFAULT_ARCHITECTURE)"),
}


class SgdTrainable(Trainable):
    """A classifier from the model zoo trained by Nesterov SGD with step decay at 1/3 and 2/3 of the run."""

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
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self):
        return {**super().state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


class Gaussian(SgdTrainable):
    NAME = "gaussian"
    HPARAMS = {
        "sigma": HParam(0.25, choices=SIGMAS, check="> 0", doc="noise level in training and certification"),
        **SGD_HPARAMS,
    }

    def update(self, x, y, d):
        self.model.train()
        x, y = x.to(self.device), y.to(self.device)
        loss = F.cross_entropy(self.model(x + torch.randn_like(x) * self.sigma), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item()}
