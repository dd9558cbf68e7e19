"""1-Lipschitz building blocks and the Lipschitz constant of a network, computed from its layers.

- `orthogonal_linear(in, out)`: an `nn.Linear` whose weight is kept orthogonal by torch's Cayley-map
  parametrization (Trockman & Kolter 2021). A rectangular weight gets orthonormal rows (out < in) or columns
  (out > in): its spectral norm is 1 either way.
- `CayleyConv2d`: Trockman & Kolter's FFT-based orthogonal convolution. The convolution is circular; in the
  Fourier domain it is one `cout x cin` matrix per frequency, and the Cayley transform makes each of them
  orthogonal, so the whole operator is orthogonal (norm exactly 1). A stride s is done, as in their code, by an
  orthogonal pixel-unshuffle (s x s blocks -> channels) before a stride-1 orthogonal convolution.
- `MaxMin`: GroupSort with groups of 2 (Anil, Lucas & Grosse 2019): each pair (a, b) -> (max, min), a
  permutation of its input, hence 1-Lipschitz and gradient-norm preserving.
- `GlobalAvgPool`: the mean over H x W; by Cauchy-Schwarz it is exactly (1/sqrt(HW))-Lipschitz.
- `lipschitz_constant(seq, input_shape)`: the product of the per-layer l2 Lipschitz constants of a
  sequential network -- an upper bound of its Lipschitz constant (composition). Each layer's constant is
  computed from its current weights, never assumed: spectral norms of (orthogonal or free) linear weights,
  the per-frequency spectral norms of a Cayley convolution, 1/min std of a normaliser. An unconstrained
  `nn.Conv2d` gets the valid but loose bound sum over kernel taps of ||W[:, :, i, j]||_2 (a zero-padded,
  strided convolution is a sum of shifted 1x1 convolutions, each shift a contraction). A layer without a
  known bound is an error.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import orthogonal

from trainables.device import HOST
from trainables.models import Normalize


class _MaxMinFunction(torch.autograd.Function):
    """(a, b, rest) -> (max(a, b), min(a, b), rest) along dim 1, with a backward that routes each output's
    gradient to the input it came from by one saved mask. Why not torch.maximum/minimum: their backward
    builds tie masks, zero-filled slices and a concatenation per call, and measured 0.62 s of a 1.8 s GLEAN
    step on 45,000 CMNIST examples (one core); this backward is two `where`s and one `cat`. At exact ties
    (a == b) the gradient goes to `a` instead of half to each: both are subgradients of max/min, and the
    function (hence every certificate) is the same. The backward is built from differentiable ops, so double
    backward works (IRM's penalty differentiates through the network)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1] // 2
        a, b, rest = x[:, :k], x[:, k:2 * k], x[:, 2 * k:]
        mask = a >= b
        ctx.save_for_backward(mask)
        return torch.cat([torch.where(mask, a, b), torch.where(mask, b, a), rest], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (mask,) = ctx.saved_tensors
        k = mask.shape[1]
        hi, lo, rest = grad[:, :k], grad[:, k:2 * k], grad[:, 2 * k:]
        return torch.cat([torch.where(mask, hi, lo), torch.where(mask, lo, hi), rest], dim=1)


class MaxMin(nn.Module):
    """GroupSort of group size 2 along dim 1: features (a, b) of the two halves -> (max(a,b), min(a,b)).

    With an odd number of features the last one passes through unchanged (still 1-Lipschitz)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaxMinFunction.apply(x)


class GlobalAvgPool(nn.Module):
    """[B, C, H, W] -> [B, C], the spatial mean: (1/sqrt(HW))-Lipschitz in l2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalNormPool(nn.Module):
    """[B, C, H, W] -> [B, C], the spatial sum divided by sqrt(HW) (= the mean times sqrt(HW)): exactly
    1-Lipschitz in l2 (Cauchy-Schwarz, tight on spatially constant inputs). GLEAN's conv encoder pools with it so
    that its L is 1, as the MLP's: the mean's 1/sqrt(HW) (1/32 at 64 px) would otherwise divide every radius
    by 1/32, i.e. turn the latent sigma = 0.12 into an input-space sigma of 3.84, and no radius on the paper's
    grid (0-0.45) would mean what it means on CMNIST."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(2, 3)) / math.sqrt(x.shape[2] * x.shape[3])


def orthogonal_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """`nn.Linear` with a Cayley-parametrized orthogonal weight (spectral norm 1, also when rectangular)."""
    return orthogonal(nn.Linear(in_features, out_features, bias=bias), orthogonal_map="cayley")


def _cayley(w: torch.Tensor) -> torch.Tensor:
    """Cayley transform of a batch of complex `[F, cout, cin]` matrices -> orthonormal columns (cout >= cin)
    or rows (cout < cin). Trockman & Kolter 2021, Eq. (3) with their rectangular extension."""
    cout, cin = w.shape[-2:]
    if cin > cout:
        return _cayley(w.transpose(-1, -2)).transpose(-1, -2)
    u, v = w[:, :cin], w[:, cin:]
    eye = torch.eye(cin, dtype=w.dtype, device=w.device)
    a = u - u.conj().transpose(-1, -2) + v.conj().transpose(-1, -2) @ v
    inv = torch.linalg.inv(eye + a)
    return torch.cat([inv @ (eye - a), -2 * v @ inv], dim=-2)


class CayleyConv2d(nn.Module):
    """Orthogonal circular convolution (Trockman & Kolter 2021), for square inputs of side `size`.

    `stride` s > 1 first pixel-unshuffles (an orthogonal permutation) so the convolution sees cin*s^2 channels.
    The operator norm equals max over frequencies of the spectral norm of `fft_matrices()` (= 1 up to rounding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, size: int, stride: int = 1,
                 bias: bool = True):
        super().__init__()
        if size % stride:
            raise ValueError(f"CayleyConv2d: input side {size} is not divisible by stride {stride}")
        self.stride, self.n = stride, size // stride
        cin = in_channels * stride * stride
        self.weight = nn.Parameter(torch.empty(out_channels, cin, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # the weight's scale is free (the Cayley map is not scale invariant): learnt, initialised to ||W||
        self.alpha = nn.Parameter(self.weight.detach().norm().reshape(()))
        n, s = self.n, (kernel_size - 1) // 2
        idx = torch.arange(n)
        shift = torch.exp(-2j * math.pi * s * (idx[:, None] + idx[None, :]) / n)[:, : n // 2 + 1]
        self.register_buffer("shift", shift.reshape(n * (n // 2 + 1), 1, 1), persistent=False)

    def fft_matrices(self) -> torch.Tensor:
        """The orthogonal per-frequency matrices, complex `[n*(n//2+1), cout, cin]`."""
        cout, cin = self.weight.shape[:2]
        n = self.n
        wfft = torch.fft.rfft2(self.weight, (n, n)).reshape(cout, cin, -1).permute(2, 0, 1).conj()
        wfft = self.shift * wfft
        return _cayley(self.alpha * wfft / wfft.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        b, cin, n, _ = x.shape
        if n != self.n:
            raise ValueError(f"CayleyConv2d built for side {self.n}, got {n}")
        q = self.fft_matrices()
        xfft = torch.fft.rfft2(x).permute(2, 3, 1, 0).reshape(n * (n // 2 + 1), cin, b)
        yfft = (q @ xfft).reshape(n, n // 2 + 1, -1, b).permute(3, 2, 0, 1)
        y = torch.fft.irfft2(yfft, (n, n))
        return y if self.bias is None else y + self.bias[:, None, None]


# ------------------------------------------------------------------------------------------------------
#: relative margin added per weighted layer to the computed constant: the network runs in float32, whose
#: rounding can make an orthogonal layer's realised gain exceed its float64 spectral norm by ~1e-7 * sqrt(width);
#: 1e-5 per layer covers that with room (it shortens radii by 0.001% per layer)
ROUNDING_MARGIN = 1e-5


def spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value of a matrix (or the largest over a batch of matrices), computed in float64
    (complex128 for Fourier-domain matrices) from the weights as stored."""
    w = weight.detach()
    w = w.to(torch.complex128) if w.is_complex() else w.double()
    return float(torch.linalg.matrix_norm(w, ord=2).max())


def orthogonal_layers(module: nn.Module) -> list[nn.Module]:
    """The layers that claim to be orthogonal (Cayley linear and convolutional)."""
    return [m for m in module.modules()
            if isinstance(m, CayleyConv2d) or (isinstance(m, nn.Linear) and hasattr(m, "parametrizations"))]


def largest_singular_value(layer: nn.Module) -> float:
    """The operator norm of an orthogonal layer, computed from its weights (used by tests and reports)."""
    if isinstance(layer, CayleyConv2d):
        return spectral_norm(layer.fft_matrices())
    return spectral_norm(layer.weight)


_ONE_LIPSCHITZ = (nn.Flatten, nn.ReLU, MaxMin, nn.Identity, nn.PixelUnshuffle, GlobalNormPool)


@torch.no_grad()
def layer_lipschitz(layer: nn.Module, in_shape: Sequence[int]) -> float:
    """An upper bound of the l2 Lipschitz constant of one layer, for inputs of shape `in_shape` (no batch)."""
    if isinstance(layer, Normalize):
        return layer.lipschitz
    if isinstance(layer, _ONE_LIPSCHITZ):
        return 1.0
    margin = 1.0 + ROUNDING_MARGIN
    if isinstance(layer, nn.Linear):
        return spectral_norm(layer.weight) * margin
    if isinstance(layer, CayleyConv2d):
        return spectral_norm(layer.fft_matrices()) * margin
    if isinstance(layer, nn.Conv2d):
        w = layer.weight
        return float(sum(spectral_norm(w[:, :, i, j]) for i in range(w.shape[2]) for j in range(w.shape[3]))) * margin
    if isinstance(layer, GlobalAvgPool):
        return 1.0 / math.sqrt(in_shape[-1] * in_shape[-2])
    if isinstance(layer, nn.Sequential):
        return lipschitz_constant(layer, in_shape)
    raise ValueError(f"no Lipschitz bound is known for layer {type(layer).__name__}; "
                     "add one to trainables.lipschitz.layer_lipschitz")


@torch.no_grad()
def lipschitz_constant(seq: nn.Sequential, input_shape: Sequence[int]) -> float:
    """Product of the layers' Lipschitz constants (an upper bound for the composition), for one input of
    shape `input_shape`; shapes are traced with a zero input so shape-dependent layers (pooling) are exact.
    Every factor is a Python float (float64), each weighted layer's with ROUNDING_MARGIN added."""
    x = torch.zeros(1, *input_shape, device=next((p.device for p in seq.parameters()), HOST))
    total = 1.0
    was_training = seq.training
    seq.eval()
    try:
        for layer in seq:
            total *= layer_lipschitz(layer, x.shape[1:])
            x = layer(x)
    finally:
        seq.train(was_training)
    return total


def jacobian_norm(module: nn.Module, x: torch.Tensor) -> float:
    """The spectral norm of module's Jacobian at one input x (no batch dimension), computed in float64 on a
    float64 copy of the module: a lower bound of its Lipschitz constant that tests hold the computed L against
    (a layer whose L is understated shows up here)."""
    import copy

    m = copy.deepcopy(module).double().eval()
    xd = x.detach().double().unsqueeze(0)
    jac = torch.autograd.functional.jacobian(lambda v: m(v).flatten(), xd).reshape(-1, xd.numel())
    return float(torch.linalg.matrix_norm(jac, ord=2))
