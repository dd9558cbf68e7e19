"""SmoothAdv (Salman et al. 2019): adversarial training of the soft smoothed classifier.

Per optimisation step on a chunk (x [b, *S], y [b]):
1. draw m noises δ_1..δ_m per example (`Trainable.example_noise`: keyed by the example's place in the global
   batch, so data-parallel ranks draw the noise one process draws);
2. in eval mode, find x̂ by T steps of ℓ2 PGD on the smoothed cross-entropy -log((1/m) Σ_j softmax F(x̂ + δ_j))_y,
   step 2ε_t/T along the normalised gradient, projected onto the ε_t-ball and clipped to [0,1]
   (`trainables.attacks.smoothed_pgd`);
3. in train mode, minimise the mean cross-entropy of F(x̂ + δ_j) over the m *same* noises and the chunk.

ε warm-up: ε_t = ε · min(1, (epoch + 1)/W) (the released loop, W = 10 of 90 epochs); here W = round(warmup ·
epochs) with warmup = 10/90 by default, so the warm-up keeps its share of a shorter run (`gaussian.ramp`; a run
of fewer than 14 epochs has W <= 1: full ε from the first epoch). The step size follows ε_t (2ε_t/T), as released.

Batch splitting (`split_batch`, default True, as released): Salman's and Jeong's loops split each batch of 256
into m chunks of 256/m examples and take one SGD step per chunk on the chunk's m noisy copies (256 forward
samples per step). We mirror it, so one `update` call makes m optimiser steps; chunks come from
`torch.tensor_split`, so no example is dropped when m does not divide the batch (the released loop drops the
remainder). With split_batch=False a call makes one step on all B examples × m noises (m times the compute).
The attack runs on `self.net` (the bare network), never through a DDP wrapper.

MNIST defaults (released EXPERIMENTS.MD, DRF paper's appendix): ε = 255/256, T = 10, m = 4, warm-up 10 epochs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainables.attacks import l2_distance, noisy_logits, smoothed_pgd
from trainables.gaussian import SGD_HPARAMS, SIGMA, SgdTrainable, ramp
from trainables.hparams import HParam

#: the m-noise-copies machinery shared by SmoothAdv, Consistency, SmoothMix and DRF
MULTI_NOISE_HPARAMS: dict[str, HParam] = {
    "num_noise_vec": HParam(4, 1, 8, integer=True, check=">= 1",
                            doc="m, noise samples per example in the attack and the loss (MNIST: 4)"),
    "split_batch": HParam(True, choices=(True, False),
                          doc="split each batch into m chunks, one SGD step each (the released loops)"),
}

#: the ε-ball attack (SmoothAdv, adversarial Consistency; DRF keeps ε as the target of its λ update)
ATTACK_HPARAMS: dict[str, HParam] = {
    "epsilon": HParam(255 / 256, 0.25, 2.0, log=True, check="> 0",
                      doc="l2 attack radius in [0,1] pixel units (MNIST: 255/256)"),
    "num_steps": HParam(10, 1, 20, integer=True, check=">= 1", doc="T, attack steps (MNIST: 10)"),
    "warmup": HParam(10 / 90, check="in [0, 1]",
                     doc="fraction of the epochs over which epsilon ramps up linearly (released: 10 of 90)"),
}


class MultiNoiseTrainable(SgdTrainable):
    """Base of the methods that train on m noisy copies of (possibly perturbed) inputs.

    Subclasses implement `perturb(x, y, noises) -> x_in` (called with the network in eval mode; input
    gradients only) and `loss(x_in, y, noises) -> (loss, metrics)`; `after_step(x, x_in)` runs after each
    optimiser step. `end_epoch` adds the epoch's ε_t (where declared) and the mean ‖x_in - x‖₂ over the epoch's
    perturbed examples (`adv_distance`).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._distance_sum, self._distance_count = 0.0, 0

    def update(self, x, y, d):
        x, y = self.augment(x.to(self.device)), y.to(self.device)
        m = int(self.hparams["num_noise_vec"])
        parts = m if self.hparams["split_batch"] else 1
        keys = self.batch_keys
        # each chunk keeps its examples' global-batch keys (with W ranks and W*m dividing B, the union of the
        # ranks' chunk c is one process's chunk c)
        chunk_keys = keys.split(parts) if keys is not None and len(keys.rows) == len(x) else [None] * parts
        chunks = [c for c in zip(torch.tensor_split(x, parts), torch.tensor_split(y, parts), chunk_keys)
                  if len(c[1])]
        totals: dict[str, float] = {}
        try:
            for xc, yc, kc in chunks:
                self.batch_keys = kc
                for key, value in self.train_chunk(xc, yc).items():
                    totals[key] = totals.get(key, 0.0) + value / len(chunks)
        finally:
            self.batch_keys = keys
        return totals

    def train_chunk(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        noises = self.example_noise(x, copies=int(self.hparams["num_noise_vec"])) * self.sigma
        self.net.eval()
        x_in = self.perturb(x, y, noises)
        self.model.train()
        loss, metrics = self.loss(x_in, y, noises)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        if x_in is not x:
            dist = l2_distance(x_in, x)
            self._distance_sum += dist.sum().item()
            self._distance_count += len(dist)
        self.after_step(x, x_in)
        return {"loss": loss.item(), **metrics}

    def perturb(self, x, y, noises) -> torch.Tensor:
        return x

    def loss(self, x_in, y, noises) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, x: torch.Tensor, x_in: torch.Tensor) -> None:
        pass

    @property
    def epsilon_now(self) -> float:
        """ε_t: the warmed-up attack radius of the current epoch."""
        h = self.hparams
        return float(h["epsilon"]) * ramp(self.epoch, self.epochs, float(h["warmup"]))

    def ball_attack(self, x, y, noises) -> torch.Tensor:
        """SmoothAdv's PGD: T steps of 2ε_t/T, projected onto the ε_t-ball, clipped to [0,1]."""
        eps, steps = self.epsilon_now, int(self.hparams["num_steps"])
        return smoothed_pgd(self.net, x, y, noises, steps=steps, step_size=2 * eps / steps, eps=eps)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if "epsilon" in self.hparams:
            out["epsilon"] = self.epsilon_now  # before super() advances self.epoch
        if self._distance_count:
            out["adv_distance"] = self._distance_sum / self._distance_count
        self._distance_sum, self._distance_count = 0.0, 0
        return {**super().end_epoch(epoch), **out}


class SmoothAdv(MultiNoiseTrainable):
    NAME = "smoothadv"
    HPARAMS = {"sigma": SIGMA, **MULTI_NOISE_HPARAMS, **ATTACK_HPARAMS, **SGD_HPARAMS}

    def perturb(self, x, y, noises):
        return self.ball_attack(x, y, noises)

    def loss(self, x_in, y, noises):
        logits = noisy_logits(self.model, x_in, noises)             # [m, b, C]
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(len(noises))), {}
