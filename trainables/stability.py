"""Stability training (Li et al. 2019), in the released form the DRF paper's baseline uses.

Per step on a batch (x [B, *S], y [B]), δ ~ N(0, σ²I):

    CE(F(x), y)  +  lbd · soft-CE(softmax F(x), F(x + δ))

soft-CE(p, q_logits) = -Σ_c p_c log softmax(q_logits)_c, averaged over the batch. As released (Jeong & Shin's
`train_stab.py`): the classification term is on the *clean* x, and the target softmax F(x) is not detached, so
the stability term also moves the clean prediction towards the noisy one. MNIST default lbd = 2 (released
EXPERIMENTS.MD, all σ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.gaussian import SGD_HPARAMS, SIGMA, SgdTrainable
from trainables.hparams import HParam


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -Σ_c softmax(target_logits)_c · log softmax(logits)_c; both [B, C]."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


class Stability(SgdTrainable):
    NAME = "stability"
    HPARAMS = {
        "sigma": SIGMA,
        "lbd": HParam(2.0, 0.25, 16.0, log=True, check=">= 0", doc="weight of the stability term (released: 2)"),
        **SGD_HPARAMS,
    }

    def update(self, x, y, d):
        self.model.train()
        x, y = self.augment(x.to(self.device)), y.to(self.device)
        b = len(x)
        logits = self.model(torch.cat([x, x + self.example_noise(x) * self.sigma]))  # one pass: clean, noisy
        clean, noisy = logits[:b], logits[b:]
        xent = F.cross_entropy(clean, y)
        stab = soft_cross_entropy(noisy, clean)
        loss = xent + float(self.hparams["lbd"]) * stab
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "xent": xent.item(), "stability": stab.item()}
