"""The ℓ2 attack on the soft smoothed classifier, written once for SmoothAdv, Consistency, SmoothMix and DRF.

Salman et al. (2019) attack the *soft* smoothed classifier F̂(x) = E_δ[softmax F(x + δ)], estimated with m
fixed noise draws δ_1..δ_m, by gradient ascent on its cross-entropy, per example i:

    CE_i(x') = -log( (1/m) Σ_j softmax(F(x' + δ_j))[y_i] )                                         (DRF Eq. 8)

Every step moves along the *normalised* gradient: x' <- clip(x' + α g/‖g‖₂, 0, 1). The variants differ only in
what constrains x':
- SmoothAdv / adversarial Consistency: projection onto the ε-ball around x (α = 2ε/T), `smoothed_pgd(eps=...)`;
- SmoothMix: none (its step size α is fixed, 1.0 on MNIST), `smoothed_pgd`;
- DRF (Eq. 14): no ε-ball; the objective is CE_i(x') - λ‖x' - x‖₂ ("soft ball"), maximised by selecting the
  best point on Eq. 14 along a path of growing-ball PGD iterates, `soft_ball_ascent` (its docstring says why).

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
                 step_size: float, eps: float | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised-gradient ascent on Σ_i CE_i(x'_i) for `steps` steps of `step_size` (SmoothAdv, SmoothMix).

    eps: project x' onto the ε-ball around x after each step (None: no projection).
    start: where the ascent starts (default x, as the released SmoothAdv_PGD).
    Returns the detached x' in [0,1]^d, shape of x. The caller chooses train/eval mode (the papers: eval).
    DRF's penalised objective (Eq. 14) has its own maximiser, `soft_ball_ascent`.
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
            grad = grad / (grad.flatten(1).norm(dim=1).view(view) + 1e-8)
            adv = adv + step_size * grad
            if eps is not None:
                adv = x + _project(adv - x, eps)
            adv = adv.clamp(0.0, 1.0)
    return adv.detach()


def drf_objective(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, noises: torch.Tensor,
                  lam: float) -> torch.Tensor:
    """DRF's Eq. 14 per example, CE_i(x'_i) - λ ‖x'_i - x_i‖₂ with CE estimated on the given noises: [B]."""
    return smoothed_ce(model, x_adv, y, noises) - lam * l2_distance(x_adv, x)


#: DRF attack: a step's length in units of the growing ball's radius increment α. After its first step the
#: iterate sits on the growing sphere, so a step longer than α slides it along the sphere toward the constrained
#: maximiser (SmoothAdv's 2ε/T steps in its ε-ball do the same). Measured against the reference of
#: tests/test_drf.py at λ = 0 (the hardest case): x2 reaches 95%, x3 98.5% of its objective.
SLIDE = 3.0


def feasible_direction(grad: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """The ascent direction with the components that would leave [0,1] zeroed (pixels at 0 that the gradient
    pushes down, at 1 pushed up): the projection of `grad` onto the box's tangent cone at `point`. A
    normalised step along it spends its whole length inside the box instead of losing it to the clip."""
    blocked = ((point <= 0) & (grad < 0)) | ((point >= 1) & (grad > 0))
    return grad.masked_fill(blocked, 0.0)


def soft_ball_ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noises: torch.Tensor, steps: int,
                     step_size: float, lam: float) -> torch.Tensor:
    """DRF's inner maximiser (Eq. 14): per example, x̂_i ≈ argmax_x' CE_i(x') - λ ‖x' - x_i‖₂ over [0,1]^d.

    Eq. 14 is the Lagrangian of  max CE_i(x') s.t. ‖x' - x_i‖ <= r : its maximiser is the ball-constrained
    maximiser x*(r) at the radius r where one more unit of radius gains λ of cross-entropy (Eq. 3's duality, on
    which DRF rests). So we (1) trace that path of constrained maximisers with T PGD steps on a growing ball,
    α = `step_size` (DRF: 2ε/T), from x⁽⁰⁾ = x (Algorithm 1 line 3):

        x⁽ᵗ⁺¹⁾ = clip(x + Π_{(t+1)α}(x⁽ᵗ⁾ + 3α d_t/‖d_t‖ - x), 0, 1)      (lines 5 and 7)

    (d_t = ∇CE_i at x⁽ᵗ⁾ with the components that would leave [0,1] zeroed, `feasible_direction`; Π_r = the
    projection onto the r-ball; the step is `SLIDE` = 3 radius increments, so the iterate, on the growing sphere
    after its first step, slides along it toward the constrained maximiser),
    and (2) return, per example, the iterate t ∈ {0..T} that maximises Eq. 14 itself, CE_i(x⁽ᵗ⁾) - λ‖x⁽ᵗ⁾ - x‖,
    scored with the SAME noises (the forward pass that gives the next gradient gives the score: one extra
    forward pass in all). This is our reading of line 6 ("pull x̂ back toward x by λ"), which as printed
    subtracts the scalar λ‖x̂ - x‖ from every pixel and is not a step on Eq. 14.

    Properties (tests/test_drf.py): x̂ is never worse than x on Eq. 14 (t = 0 is a candidate); the path does not
    depend on λ, so a larger λ never selects a farther point (for λ₁ < λ₂ the selected distances satisfy
    d(λ₂) <= d(λ₁), per example); T + 1 steps of the same α are never worse than T (no parity effect); the
    reachable set is the Tα-ball, as SmoothAdv's, at SmoothAdv's cost. λ acts on the scale of the CE gained
    per unit distance (O(0.1-1) on MNIST), the scale of the paper's λ₀ = 1, 2 and ζ = 0.02.
    Why not proximal-gradient ascent (a CE step, then shrinking x̂ - x by step·λ, the other principled reading
    of lines 5-6)? Measured on a briefly trained MNIST LeNet (benchmarks/RESULTS.md): x itself is a fixed point
    whenever ‖∇CE(x)‖ <= λ (median ‖∇CE(x)‖ = 0.001 there, so every λ >= 0.01 leaves most examples at x even
    where CE grows by more than λ per unit distance further out), and the shrink eats each step: it reached
    61-93% of a 60-step reference's objective for λ in [0, 0.1], this path selection 99.7-117% (at λ = 1: 135%).

    x [B, *S] in [0,1], y [B], noises [m, B, *S]; λ >= 0 (λ = 0: the best point of the path on CE alone).
    Input gradients only (`torch.autograd.grad`), as `smoothed_pgd`. Returns the detached x̂.
    """
    if steps < 0 or step_size < 0 or lam < 0:
        raise ValueError(f"steps, step_size and lam must be >= 0, got {steps}, {step_size} and {lam}")
    x = x.detach()
    adv = x.clone()
    best, best_value = x.clone(), None
    view = (-1,) + (1,) * (x.dim() - 1)
    for t in range(steps + 1):
        last = t == steps
        adv.requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            ce = smoothed_ce(model, adv, y, noises)
        with torch.no_grad():
            value = ce.detach() - lam * l2_distance(adv.detach(), x)
            if best_value is None:
                best_value = value
            else:
                better = value > best_value       # strict: ties keep the earlier, closer point
                best[better] = adv.detach()[better]
                best_value = torch.where(better, value, best_value)
        if last:
            break
        grad = torch.autograd.grad(ce.sum(), adv)[0]
        with torch.no_grad():
            grad = feasible_direction(grad, adv.detach())
            grad = grad / (grad.flatten(1).norm(dim=1).view(view) + 1e-12)
            adv = adv.detach() + SLIDE * step_size * grad
            adv = (x + _project(adv - x, (t + 1) * step_size)).clamp(0.0, 1.0)
    return best.detach()
