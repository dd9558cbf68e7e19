"""MACER (Zhai et al. 2020): attack-free training that maximises a soft approximation of the certified radius.

Per step on a batch (x [B, *S], y [B]) with k noisy copies x + δ_j, logits z_j = F(x + δ_j):

    classification  -log( (1/k) Σ_j softmax(z_j) )_y                          summed over the batch
    robustness      Σ_{i ∈ I} (σ/2) (γ - [Φ⁻¹(p̂_top1) - Φ⁻¹(p̂_top2)]),   p̂ = (1/k) Σ_j softmax(β z_j)
    loss = (classification + lbd · robustness) / B

I = the examples whose β-smoothed top-1 class is y and whose margin Φ⁻¹(p̂_1) - Φ⁻¹(p̂_2) is finite and at
most γ (the hinge), as the released `macer_train` (it adds 1e-10 inside the classification log).

Schedule ("deferred", released `--deferred`): lbd = 0 during the first `deferred` fraction of the epochs
(released: `epoch <= lr_step_size`, i.e. epochs 0-30 of 90, one more than the "first 30 epochs" it is described
as; we take 30, the first lr step), then lbd. Scaled to the run's epochs: round(deferred · epochs) epochs
without the robustness term.

`lbd` defaults to None = by σ, the DRF paper's MNIST settings (released EXPERIMENTS.MD): 16 for σ ≤ 0.5, 6 for
σ = 1.0 (`LBD_BY_SIGMA`; σ = 0.12, not in the paper, takes 16). Other MNIST settings: k = 16, β = 16, γ = 8.
(k = 16, lbd = 12, γ = 8, β = 16 are the MACER repository's CIFAR-10 defaults.) No batch splitting: each step
runs B·k forward samples, as released.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainables.attacks import noisy_logits
from trainables.gaussian import SGD_HPARAMS, SIGMA, SgdTrainable
from trainables.hparams import HParam

#: MNIST robustness weight by training σ (released EXPERIMENTS.MD / the DRF paper's MACER rows)
LBD_BY_SIGMA = {0.12: 16.0, 0.25: 16.0, 0.5: 16.0, 1.0: 6.0}


def lbd_for_sigma(sigma: float) -> float:
    """LBD_BY_SIGMA at the nearest tabulated σ (a σ between table entries takes the closer one)."""
    return LBD_BY_SIGMA[min(LBD_BY_SIGMA, key=lambda s: abs(s - sigma))]


def macer_loss(logits: torch.Tensor, y: torch.Tensor, sigma: float, lbd: float, beta: float,
               gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, classification sum, robustness sum) for logits [k, B, C] of k noisy copies and labels [B]."""
    b = logits.shape[1]
    p = F.softmax(logits, dim=-1).mean(0)
    classification = F.nll_loss((p + 1e-10).log(), y, reduction="sum")
    robustness = logits.new_zeros(())
    if lbd:
        p_beta = F.softmax(beta * logits, dim=-1).mean(0)
        top2, idx = p_beta.topk(2, dim=1)
        with torch.no_grad():  # select first, then differentiate only the kept entries: Φ⁻¹'(0 or 1) = inf
            margin = torch.special.ndtri(top2[:, 0]) - torch.special.ndtri(top2[:, 1])
            keep = (idx[:, 0] == y) & torch.isfinite(margin) & (margin <= gamma)
        kept = top2[keep]
        robustness = (gamma - (torch.special.ndtri(kept[:, 0]) - torch.special.ndtri(kept[:, 1]))).sum() * sigma / 2
    return (classification + lbd * robustness) / b, classification, robustness


class Macer(SgdTrainable):
    NAME = "macer"
    HPARAMS = {
        "sigma": SIGMA,
        "lbd": HParam(None, 1.0, 32.0, log=True, check=">= 0 or None",
                      doc="robustness weight; None = by sigma (MNIST: 16 for sigma <= 0.5, 6 for 1.0)"),
        "num_noise_vec": HParam(16, 4, 32, log=True, integer=True, check=">= 1", doc="k, noisy copies (16)"),
        "beta": HParam(16.0, 1.0, 32.0, log=True, check="> 0", doc="inverse temperature of the soft margin (16)"),
        "gamma": HParam(8.0, 1.0, 16.0, log=True, check="> 0", doc="hinge on the margin (8)"),
        "deferred": HParam(1 / 3, check="in [0, 1]",
                           doc="fraction of the epochs trained with lbd = 0 first (released: 30 of 90)"),
        **SGD_HPARAMS,
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.hparams["lbd"] is None:
            self.hparams["lbd"] = lbd_for_sigma(self.sigma)

    @property
    def lbd_now(self) -> float:
        """lbd, or 0 during the deferred first epochs."""
        return 0.0 if self.epoch < round(float(self.hparams["deferred"]) * self.epochs) else float(self.hparams["lbd"])

    def update(self, x, y, d):
        self.model.train()
        x, y = self.augment(x.to(self.device)), y.to(self.device)
        h = self.hparams
        logits = noisy_logits(self.model, x, self.example_noise(x, copies=int(h["num_noise_vec"])) * self.sigma)
        loss, cls, rob = macer_loss(logits, y, self.sigma, self.lbd_now, float(h["beta"]), float(h["gamma"]))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "classification": cls.item() / len(y), "robustness": rob.item() / len(y)}

    def end_epoch(self, epoch):
        lbd = self.lbd_now  # the weight this epoch trained with, before super() advances self.epoch
        return {**super().end_epoch(epoch), "macer_lbd": lbd}
