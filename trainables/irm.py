"""The IRMv1 invariance penalty (Arjovsky et al. 2019): ||grad_{w|w=1.0} R^d(w * f)||^2 for one environment.

Two estimators:
- "full_batch": the square of the gradient on the whole batch of that environment, as the IRM reference code
  (facebookresearch/InvariantRiskMinimization, code/colored_mnist/main.py). Biased: E[g]^2 + Var[g].
- "two_half": DomainBed's unbiased estimate, the product of the gradients on the even- and odd-indexed halves.

For cross-entropy the gradient has the closed form  mean_i sum_c (softmax(l_i)_c - onehot(y_i)_c) * l_ic
(`penalty_gradient_closed_form`, used by the tests); the trainable uses autograd as the reference does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import autograd

ESTIMATORS = ("full_batch", "two_half")


def penalty_gradient(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """d/dw CE(w * logits, y) at w = 1, differentiable w.r.t. the logits. logits [B, C], y [B] -> scalar.
    reduction "sum": the sum of the per-example derivatives (data-parallel ranks add theirs up)."""
    scale = torch.ones((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    loss = F.cross_entropy(logits * scale, y, reduction=reduction)
    return autograd.grad(loss, [scale], create_graph=True)[0]


def penalty_gradient_closed_form(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same derivative written out: mean_i sum_c (p_ic - y_ic) l_ic."""
    p = logits.softmax(dim=1)
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return ((p - onehot) * logits).sum(dim=1).mean()


def irm_penalty(logits: torch.Tensor, y: torch.Tensor, estimator: str = "full_batch") -> torch.Tensor:
    """The IRMv1 penalty of one environment's logits [B, C] and labels [B] (scalar, differentiable)."""
    if estimator == "full_batch":
        return penalty_gradient(logits, y) ** 2
    if estimator == "two_half":
        if len(y) < 2:
            raise ValueError("the two-half IRM penalty needs >= 2 examples per environment in a batch; "
                             "raise batch_size or use penalty_estimator=full_batch")
        return penalty_gradient(logits[0::2], y[0::2]) * penalty_gradient(logits[1::2], y[1::2])
    raise ValueError(f"unknown IRM penalty estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
