"""The ℓ2 attack on the soft smoothed classifier, written once for SmoothAdv, Consistency, SmoothMix and DRF.

Salman et al. (2019) attack the *soft* smoothed classifier F̂(x) = E_δ[softmax F(x + δ)], estimated with m
fixed noise draws δ_1..δ_m, by gradient ascent on its cross-entropy, per example i:

    CE_i(x') = -log( (1/m) Σ_j softmax(F(x' + δ_j))[y_i] )                                         (DRF Eq. 8)

Every step moves along the *normalised* gradient: x' <- clip(x' + α g/‖g‖₂, 0, 1). The variants differ only in
what constrains x':
- SmoothAdv / adversarial Consistency: projection onto the ε-ball around x (α = 2ε/T), `eps=...`;
- DRF (Eq. 14): no projection; the objective is CE_i(x') - λ‖x' - x‖₂ ("soft ball"), `lam=...`;
- SmoothMix: neither (its step size α is fixed, 1.0 on MNIST).

Tensor shapes: x, x' [B, *S] in [0,1]; noises [m, B, *S] (one draw per noise index and example, shared by all
attack steps and reused by the caller's update, as the released code does); labels [B].

Choices (released code, Jeong & Shin's `SmoothAdv_PGD`): the gradient norm is guarded by +1e-8 (a zero gradient
gives a zero step; Salman's original draws a random direction instead); projection is applied before the clip
(renorm, then clamp). The objective is a *sum* of per-example terms so that each example's gradient is its own
(with a batch mean the CE gradient would shrink by 1/B against DRF's penalty, which is per example in Eq. 14).
The attack differentiates with respect to the input only (`torch.autograd.grad`), so it never touches the
parameters' `.grad` and is safe to call between a caller's `zero_grad` and `step`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: floor of the averaged probability before the log (released code: clamp(min=1e-20))
PROB_FLOOR = 1e-20


def sample_noises(x: torch.Tensor, m: int, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """m i.i.d. N(0, σ²I) draws per example: [m, B, *S]."""
    return torch.randn((m, *x.shape), generator=generator, device=x.device, dtype=x.dtype) * sigma


def noisy_logits(model: nn.Module, x: torch.Tensor, noises: torch.Tensor) -> torch.Tensor:
    """Logits of the m noisy copies x + δ_j in one forward pass: [m, B, C] (noise index first)."""
    m, b = noises.shape[:2]
    out = model((x.unsqueeze(0) + noises).flatten(0, 1))
    return out.view(m, b, -1)


def smoothed_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log of the mean softmax over the noise axis: [m, B, C] -> [B, C]."""
    return F.softmax(logits, dim=-1).mean(0).clamp(min=PROB_FLOOR).log()


def smoothed_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noises: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy of the soft smoothed classifier (Eq. 8's objective): [B]."""
    return F.nll_loss(smoothed_log_probs(noisy_logits(model, x, noises)), y, reduction="none")


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example ‖a - b‖₂: [B]."""
    return (a - b).flatten(1).norm(dim=1)


def _project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Each example's perturbation scaled down onto the ε-ball if it lies outside (torch.renorm semantics)."""
    return delta.renorm(p=2, dim=0, maxnorm=eps)


def smoothed_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noises: torch.Tensor, steps: int,
                 step_size: float, eps: float | None = None, lam: float = 0.0,
                 start: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised-gradient ascent on Σ_i [CE_i(x'_i) - lam ‖x'_i - x_i‖₂] for `steps` steps of `step_size`.

    eps: project x' onto the ε-ball around x after each step (None: no projection).
    lam: DRF's distance penalty (0: none). The penalty's gradient is lam (x' - x)/‖x' - x‖ with the
         sub-gradient 0 at x' = x (where ‖·‖ is not differentiable; DRF starts there).
    start: where the ascent starts (default x, as Algorithm 1 line 3 and the released SmoothAdv_PGD).
    Returns the detached x' in [0,1]^d, shape of x. The caller chooses train/eval mode (the papers: eval).
    """
    if steps < 0 or step_size < 0:
        raise ValueError(f"steps and step_size must be >= 0, got {steps} and {step_size}")
    x = x.detach()
    adv = (x if start is None else start).detach().clone()
    view = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        objective = smoothed_ce(model, adv, y, noises).sum()
        grad = torch.autograd.grad(objective, adv)[0]
        with torch.no_grad():
            if lam:
                diff = adv - x
                norm = diff.flatten(1).norm(dim=1).view(view)
                grad = grad - lam * diff / norm.clamp(min=1e-12)  # diff = 0 -> 0: the sub-gradient at x
            grad = grad / (grad.flatten(1).norm(dim=1).view(view) + 1e-8)
            adv = adv + step_size * grad
            if eps is not None:
                adv = x + _project(adv - x, eps)
            adv = adv.clamp(0.0, 1.0)
    return adv.detach()
