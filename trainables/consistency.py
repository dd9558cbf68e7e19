"""Consistency regularisation (Jeong & Shin 2020), Gaussian and adversarial (SmoothAdv-based) forms.

Loss on m noisy copies of x_in (x itself, or SmoothAdv's x̂ when `adversarial`), p_j = softmax F(x_in + δ_j),
p̄ = (1/m) Σ_j p_j (all per example; averaged over the chunk):

    (1/m) Σ_j CE(F(x_in + δ_j), y)  +  lbd · (1/m) Σ_j KL(p̄ ‖ p_j)  +  eta · H(p̄)

as the released `consistency_loss(loss='default')`: p̄ is *not* detached (gradients flow through the target),
H uses log(clamp(p̄, 1e-20)). `lbd` is λ_c of the Consistency paper, a parameter of its own: DRF's λ is
`lam0` in trainables/drf.py.

Defaults are the DRF paper's Consistency rows, which are the adversarial form (released EXPERIMENTS.MD
"SmoothAdv + Consistency", MNIST): adversarial = True, m = 4, lbd = 1, eta = 0.5, ε = 255/256, T = 10, ε warm-up
over the first 10 of 90 epochs (scaled to the run, see trainables/smoothadv.py). The released Gaussian-form MNIST
configs are m = 2 with lbd = 10 (σ = 0.25) or 5 (σ = 0.5, 1.0): set adversarial=false num_noise_vec=2 lbd=10.
The batch is split into m chunks with one SGD step each (both released forms do this; `split_batch`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.attacks import PROB_FLOOR, noisy_logits
from trainables.gaussian import SGD_HPARAMS, SIGMA
from trainables.hparams import HParam
from trainables.smoothadv import ATTACK_HPARAMS, MULTI_NOISE_HPARAMS, MultiNoiseTrainable

CONSISTENCY_HPARAMS: dict[str, HParam] = {
    "lbd": HParam(1.0, 0.1, 20.0, log=True, check=">= 0",
                  doc="lambda_c, weight of the KL consistency term (adversarial MNIST: 1; Gaussian MNIST: 5-10)"),
    "eta": HParam(0.5, 0.05, 2.0, log=True, check=">= 0", doc="weight of the entropy of the mean prediction (0.5)"),
}


def consistency_loss(logits: torch.Tensor, y: torch.Tensor, lbd: float, eta: float) -> tuple[torch.Tensor, ...]:
    """(total, cross-entropy, consistency) for logits [m, B, C] of m noisy copies and labels [B]."""
    m = logits.shape[0]
    xent = F.cross_entropy(logits.flatten(0, 1), y.repeat(m))
    log_p = F.log_softmax(logits, dim=-1)                                   # [m, B, C]
    p_bar = log_p.exp().mean(0)                                             # [B, C]
    kl = (p_bar * (p_bar.clamp(min=PROB_FLOOR).log() - log_p)).sum(-1).mean(0)   # mean_j KL(p̄ ‖ p_j): [B]
    entropy = -(p_bar * p_bar.clamp(min=PROB_FLOOR).log()).sum(-1)          # H(p̄): [B]
    reg = (lbd * kl + eta * entropy).mean()
    return xent + reg, xent, reg


class Consistency(MultiNoiseTrainable):
    NAME = "consistency"
    HPARAMS = {
        "sigma": SIGMA,
        "adversarial": HParam(True, choices=(True, False),
                              doc="attack the smoothed classifier first (SmoothAdv + Consistency; the DRF rows)"),
        **CONSISTENCY_HPARAMS, **MULTI_NOISE_HPARAMS, **ATTACK_HPARAMS, **SGD_HPARAMS,
    }

    def perturb(self, x, y, noises):
        return self.ball_attack(x, y, noises) if self.hparams["adversarial"] else x

    def loss(self, x_in, y, noises):
        total, xent, reg = consistency_loss(noisy_logits(self.model, x_in, noises), y,
                                            float(self.hparams["lbd"]), float(self.hparams["eta"]))
        return total, {"xent": xent.item(), "consistency": reg.item()}
