"""The contract every trainable follows (DomainBed's `update(batch) -> dict` / `predict(x)`).

A trainable owns one network, its optimiser and its loss. The training loop (written once, in
`orchestrator/train_loop.py`) only ever calls:

    t = Cls(hparams, info, epochs)          # hparams: overrides of Cls.HPARAMS; info: trainables.data.DataInfo
    # batches of t.hparams["batch_size"] examples
    for epoch in range(epochs):
        for x, y, d in loader:              # x in [0,1] pixel space, y class, d training-domain index
            metrics = t.update(x, y, d)     # one optimisation step -> {"loss": ..., ...}
        metrics = t.end_epoch(epoch)        # schedules, learnt-λ trajectories -> dict of floats
    t.step_metrics()                        # per-step metrics since the last call: [(global step, {..})]
    t.write_artifacts(directory)            # extra run files (DRF: lambda_trajectory.png) -> [paths]
    t.certifier()                           # an object with Smooth's certify/predict/certify_many API
    t.state_dict() / t.load_state_dict(sd)  # everything needed to resume (model, optimiser, schedule, λ ...)

Devices (contract C1, trainables/device.py): `device` is resolved once by the caller's rule; the network, every
batch, noise draw, attack iterate and the optimiser's restored state live there (torch's optimiser load casts
its state to the parameters' device; checkpoints are read onto the host first, trainables.checkpoint).

Data parallelism: before each `update` the loop may hand the trainable `BatchKeys` (trainables/batchkeys.py):
where its examples sit in the global batch. `example_noise` draws their noise from those keys, so the noise of
an example does not depend on how many ranks share the batch; trainables that combine examples across the batch
(DRF's distance buffer, GLEAN's per-environment terms) use trainables/distributed.py's collectives.

`self.net` is always the bare network (used for checkpoints and certification); `self.model` is what
training calls forward on, which the orchestrator may replace by a DDP wrapper of `self.net`
(`distribute`). Normalisation is the network's first layer, so noise and radii live in [0,1] pixel space.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from trainables.batchkeys import BatchKeys
from trainables.data import DataInfo
from trainables.device import HOST, resolve_device
from trainables.hparams import HParam, resolve


class Trainable:
    NAME: ClassVar[str] = ""
    HPARAMS: ClassVar[dict[str, HParam]] = {}
    DEFAULT_DATASET: ClassVar[str] = "mnist"
    #: datasets this method is defined on; others are rejected with a clear message at construction
    DATASETS: ClassVar[tuple[str, ...]] = ("mnist", "cmnist", "cifar10", "celeba", "domainnet")

    def __init__(self, hparams: Mapping[str, Any] | None, info: DataInfo, epochs: int = 1,
                 device: str | torch.device = HOST):
        """`epochs` is the run's total, so schedules (lr decay, ε warm-up) can scale with the budget.
        `device`: a torch.device or a spec for trainables.device.resolve_device ("auto", "cpu", "cuda:K")."""
        self.hparams = self.resolve_hparams(hparams, info.name)
        self.epochs = int(epochs)
        if info.name not in self.DATASETS:
            raise ValueError(f"{self.NAME} is not defined on dataset {info.name!r}; "
                             f"use one of {', '.join(self.DATASETS)}")
        self.info = info
        self.device = resolve_device(device)
        self.net: nn.Module = self.build_net().to(self.device)
        self.model: nn.Module = self.net
        self.optimizer = self.build_optimizer()
        self.step = 0
        self.batch_keys: BatchKeys | None = None

    @classmethod
    def dataset_defaults(cls, dataset: str) -> dict[str, Any]:
        """Values for hyperparameters declared with default None ("the dataset's default"), per dataset."""
        return {}

    @classmethod
    def resolve_hparams(cls, hparams: Mapping[str, Any] | None, dataset: str) -> dict[str, Any]:
        """Every hyperparameter's value for `dataset`: the overrides checked by their rules, the declared
        defaults, then the dataset's defaults for those still None. The drivers log these, and the
        trainable trains with exactly these (one source of truth for what a run used)."""
        full = resolve(cls.HPARAMS, hparams, owner=cls.NAME)
        for key, value in cls.dataset_defaults(dataset).items():
            if full.get(key) is None:
                full[key] = value
        return full

    # --- to override -------------------------------------------------------------------------------
    def build_net(self) -> nn.Module:
        raise NotImplementedError

    def build_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def update(self, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch; returns scalar metrics (at least "loss")."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Called after every epoch (learning-rate schedule, learnt-λ trajectory ...)."""
        return {}

    def step_metrics(self) -> list[tuple[int, dict[str, float]]]:
        """Metrics recorded per optimiser step since the last call, keyed by the GLOBAL step, and cleared
        (contract C3; default: none). The training loop reports them as report["step_metrics"]."""
        return []

    def write_artifacts(self, directory: Path) -> list[Path]:
        """Write extra files of the run (e.g. DRF's lambda_trajectory.png) into `directory`; return their paths
        (contract C3; default: none). The loop calls it with the final checkpoint directory."""
        return []

    @property
    def sigma(self) -> float:
        return float(self.hparams["sigma"])

    def certifier(self, sigma: float | None = None):
        """The smoothed classifier that certification uses (input-space Gaussian smoothing by default)."""
        from trainables.smoothing import Smooth
        return Smooth(self.net, self.info.num_classes, self.sigma if sigma is None else sigma)

    # --- shared --------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the base classifier, [B, C] for x of shape [B, *input_shape]."""
        self.net.eval()
        return self.net(x.to(self.device))

    def set_batch_keys(self, keys: BatchKeys | None) -> None:
        """Where the next `update`'s examples sit in the global batch (None: draw from torch's global RNG)."""
        self.batch_keys = keys

    def example_noise(self, like: torch.Tensor, shape: tuple[int, ...] | None = None, copies: int | None = None,
                      stream: int = 0) -> torch.Tensor:
        """Standard normal noise for the len(like) examples of the current batch, on like's device and dtype:
        [b, *shape] (shape default: like's example shape), or [copies, b, *shape]. Keyed by `batch_keys` when
        the loop set them for this many examples (trainables/batchkeys.py), else torch's global generator."""
        shape = tuple(like.shape[1:]) if shape is None else tuple(shape)
        per_example = shape if copies is None else (copies, *shape)
        keys = self.batch_keys
        if keys is not None and len(keys.rows) == len(like):
            z = keys.normal(per_example, like.device, like.dtype, stream)
            return z if copies is None else z.transpose(0, 1).contiguous()
        # no keys (a trainable driven directly): the released code's draw, copies first
        size = (len(like), *shape) if copies is None else (copies, len(like), *shape)
        return torch.randn(size, device=like.device, dtype=like.dtype)

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Let the orchestrator wrap the network (e.g. `ray.train.torch.prepare_model` -> DDP)."""
        self.model = wrap(self.net)

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state.get("step", 0))
