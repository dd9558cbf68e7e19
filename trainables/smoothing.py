"""Randomized smoothing: Cohen, Rosenfeld & Kolter 2019 (ICML), PREDICT and CERTIFY.

The only place this math lives.

The smoothed classifier of a base classifier f at noise level sigma is

    g(x) = argmax_c P(f(x + eps) = c),   eps ~ N(0, sigma^2 I),

with x in [0,1] pixel space (every model's first layer normalises), so radii are pixel-space l2 radii.
`Smooth` follows the released `code/core.py` (locuslab/smoothing) exactly, with these departures:

- the device comes from the model's parameters (no hard-coded cuda);
- scipy.stats replaces statsmodels: the Clopper-Pearson bound is `beta.ppf(alpha, nA, n - nA + 1)` (the
  lower end of the two-sided 1 - 2*alpha interval, i.e. a one-sided 1 - alpha bound, as the reference's
  `proportion_confint(nA, n, alpha=2*alpha, method="beta")[0]`); PREDICT's two-sided test is
  `scipy.stats.binomtest`;
- every Monte-Carlo draw takes an optional `torch.Generator`; `certify_many` seeds one per example from
  (seed, idx) (`example_seed`), so an example's result does not depend on the batch or shard it lands in;
- sampling is fast (see `Smooth._sample_counts`): counts are accumulated where the model runs and moved once
  per example, noise is drawn into a preallocated buffer, and on the CPU the forward passes run channels-last
  in slices of `forward_batch` samples (measured: benchmarks/certify_throughput.py, benchmarks/RESULTS.md).

Results depend on (model, sigma, seed, idx, n0, n, alpha, batch_size, device): the noise of one pass is drawn
`batch_size` samples at a time, and CPU and CUDA generators produce different streams.

Subclasses (GLEAN's latent smoother) change *what* is sampled, not the statistics, by overriding hooks:

    _prepare(xs)                      [B, *input_shape] -> per-example objects, indexable by position
                                      (default: xs on the model's device; GLEAN: the latent / logits, the
                                      encoder run once per example)
    _sample_counts(p, num, batch_size, generator)
                                      counts [num_classes] (int64, any device) of the base classifier's
                                      prediction over `num` noisy samples around prepared example p
    _radius(pA_lower)                 certified radius for a lower bound pA_lower >= 0.5
                                      (default sigma * Phi^-1(pA_lower); GLEAN divides by the
                                      encoder's Lipschitz constant)
    _make_row(idx, label, prediction, radius, seconds, p)
                                      the CertRow of one example; override to return a CertRow subclass with
                                      extra fields (e.g. GLEAN's det_radius), computed from p
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from trainables.device import HOST, is_host

ABSTAIN = -1
#: Cohen et al.'s certification settings, used by both papers; the one place these defaults live.
N0 = 100
N = 100_000
ALPHA = 0.001
#: noise samples drawn per generator call (Cohen et al.'s --batch). The CPU forward slices it (forward_batch).
BATCH_SIZE = 1000
#: on the CPU the base classifier sees at most this many noise samples per forward pass: LeNet's activations
#: for 1,000 samples overflow the caches and run ~1.6x slower per sample than slices of 100-400 (measured,
#: 1 thread).
CPU_FORWARD_BATCH = 256


@dataclass
class CertRow:
    """One certified example: Cohen et al.'s TSV columns. `predict` is ABSTAIN (-1) with radius 0 when the
    smoothed classifier abstains; `correct` is int(predict == label); `time` is seconds spent on the example.
    Subclasses add fields with defaults (e.g. GLEAN's det_radius); write_tsv writes them as extra columns."""

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float


def example_seed(seed: int, idx: int) -> int:
    """The 64-bit generator seed of example `idx` under run seed `seed` (numpy SeedSequence: well mixed, no
    Python hash, so it is the same in every process)."""
    if int(seed) < 0 or int(idx) < 0:
        raise ValueError(f"seed and example index must be >= 0, got seed={seed}, idx={idx}")
    return int(np.random.SeedSequence([int(seed), int(idx)]).generate_state(1, np.uint64)[0])


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from n_a successes in n:
    P(bound > p) <= alpha over the draw. 0 when n_a = 0 (the beta quantile is undefined there)."""
    return 0.0 if n_a <= 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))


def min_certify_n(alpha: float) -> int:
    """The smallest n for which CERTIFY can return a class at level alpha: with nA = n the bound is
    alpha**(1/n), which must reach 0.5, so n >= log2(1/alpha)."""
    n = max(1, math.ceil(math.log(alpha) / math.log(0.5)))
    while lower_confidence_bound(n, n, alpha) < 0.5:  # guard the float rounding of the closed form
        n += 1
    return n


def min_predict_n(alpha: float) -> int:
    """The smallest n for which PREDICT can return a class at level alpha: with all n samples on one class the
    two-sided binomial p-value is 2 * 0.5**n, which must be <= alpha, so n >= log2(2/alpha)."""
    n = max(1, math.ceil(math.log(alpha / 2) / math.log(0.5)))
    while binomtest(n, n, 0.5).pvalue > alpha:
        n += 1
    return n


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_count(v: Any) -> bool:
    """An integer >= 1 (ints, numpy integers, and integral floats such as 1e5)."""
    return _is_real(v) and float(v) == int(v) and int(v) >= 1


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return HOST if first is None else first.device


class Smooth:
    """The smoothed classifier g of `base_classifier` at noise level `sigma`.

    base_classifier: maps [B, *input_shape] (inputs in [0,1]) to logits [B, num_classes]; certification puts
        it in eval mode and restores its previous mode afterwards. Its device (parameters) is where sampling
        runs.
    num_classes: the number of classes (>= 2).
    sigma: the standard deviation of the isotropic Gaussian noise (> 0).
    input_shape: optional shape of one example (e.g. (1, 28, 28)); when given, inputs are checked against it.
        Without it, inputs are checked by one forward pass of two examples, which must give [2, num_classes].
    forward_batch: at most this many noise samples per forward pass (default: CPU_FORWARD_BATCH on the CPU,
        unlimited elsewhere). It changes speed only, never results.
    channels_last: run the forwards on a channels-last copy of the network (default: on the CPU when the
        network has a Conv2d). Speed only: outputs equal up to float rounding (~1e-7).
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, *,
                 input_shape: Sequence[int] | None = None, forward_batch: int | None = None,
                 channels_last: bool | None = None):
        if not (_is_real(sigma) and math.isfinite(float(sigma)) and float(sigma) > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if forward_batch is not None and not _is_count(forward_batch):
            raise ValueError(f"forward_batch must be an integer >= 1, got {forward_batch!r}")
        self._forward_batch = None if forward_batch is None else int(forward_batch)
        self._channels_last_choice = channels_last
        self._checked_shapes: set[tuple[int, ...]] = set()
        self._fast_net: nn.Module | None = None  # the channels-last copy, made lazily per call (_forward_net)
        self._channels_last = False

    @property
    def device(self) -> torch.device:
        """Where the base classifier's parameters live (read at every call: the model may have been moved)."""
        return _model_device(self.base_classifier)

    @property
    def forward_batch(self) -> int:
        if self._forward_batch is not None:
            return self._forward_batch
        return CPU_FORWARD_BATCH if is_host(self.device) else 1 << 62

    @property
    def channels_last(self) -> bool:
        if self._channels_last_choice is not None:
            return bool(self._channels_last_choice)
        has_conv = any(isinstance(m, nn.Conv2d) for m in self.base_classifier.modules())
        return is_host(self.device) and has_conv

    # --- the public API -------------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = BATCH_SIZE,
                generator: torch.Generator | None = None) -> int:
        """PREDICT: g's class at x, or ABSTAIN. Guarantee: with probability >= 1 - alpha over the noise, the
        returned class (if not ABSTAIN) is g(x) (Cohen et al. Prop. 1, with Hung & Fithian's test of the
        top class of a multinomial, arXiv:1610.03944: a two-sided binomial test of the top two counts;
        abstain when its p-value > alpha).

        x: one example [*input_shape] (e.g. [C, H, W]) in [0,1]; n: noise samples; batch_size: samples drawn
        at once; generator: the noise source (default: torch's global generator on the model's device).
        """
        n, alpha, batch_size = self._check_counts(n, alpha, batch_size, "predict")
        x = self._check_example(x)
        with self._certifying():
            p = self._prepare(x.unsqueeze(0))[0]
            counts = self._sample_counts(p, n, batch_size, generator).cpu().numpy()
        order = np.argsort(-counts, kind="stable")
        c1, c2 = int(counts[order[0]]), int(counts[order[1]])
        if binomtest(c1, c1 + c2, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(order[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = BATCH_SIZE,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """CERTIFY: (prediction, radius). Guarantee: with probability >= 1 - alpha over the noise, if the
        prediction is not ABSTAIN then g(x + delta) = prediction for every ||delta||_2 < radius (Thm. 1 with
        the one-sided Clopper-Pearson bound pA_lower of P(f(x + eps) = prediction)). The class is chosen on n0
        selection samples; pA_lower comes from n further, independent samples. ABSTAIN with radius 0.0 when
        pA_lower < 0.5; otherwise radius = sigma * Phi^-1(pA_lower) (`_radius`).

        x: one example [*input_shape] (e.g. [C, H, W]) in [0,1]; batch_size: noise samples drawn at once;
        generator: the noise source (default: torch's global generator on the model's device).
        """
        n0, n, alpha, batch_size = self._check_certify_args(n0, n, alpha, batch_size)
        x = self._check_example(x)
        with self._certifying():
            p = self._prepare(x.unsqueeze(0))[0]
            return self._certify_prepared(p, n0, n, alpha, batch_size, generator)

    def certify_many(self, xs: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                     indices: Sequence[int] | torch.Tensor, n0: int = N0, n: int = N, alpha: float = ALPHA,
                     batch_size: int = BATCH_SIZE, seed: int = 0) -> list[CertRow]:
        """CERTIFY every example of a batch: the path the rest of the project uses.

        xs: [B, *input_shape] in [0,1]; labels, indices: B ints each (indices: the examples' positions in
        their split). Example i is certified exactly as `certify(xs[i], ..., generator=g)` with g seeded by
        `example_seed(seed, indices[i])`, so its row does not depend on which other examples share the call:
        certifying [0,k) in one call or as [0,j) + [j,k) gives the same rows (apart from `time`). Each row's
        guarantee is certify's (failure probability alpha per example).

        `time` is the example's own sampling time plus an equal share of the batch's `_prepare`.
        """
        n0, n, alpha, batch_size = self._check_certify_args(n0, n, alpha, batch_size)
        xs, labels, indices = self._check_batch(xs, labels, indices)
        rows: list[CertRow] = []
        with self._certifying():
            t0 = time.perf_counter()
            prepared = self._prepare(xs)
            share = (time.perf_counter() - t0) / max(1, len(indices))
            for i, (idx, label) in enumerate(zip(indices, labels)):
                t0 = time.perf_counter()
                g = self._generator(example_seed(seed, idx))
                prediction, radius = self._certify_prepared(prepared[i], n0, n, alpha, batch_size, g)
                seconds = time.perf_counter() - t0 + share
                rows.append(self._make_row(idx, label, prediction, radius, seconds, prepared[i]))
        return rows

    # --- hooks for subclasses -------------------------------------------------------------------------------
    def _prepare(self, xs: torch.Tensor) -> Any:
        """Per-example state computed once per call, before any noise: anything indexable by the example's
        position. Default: the inputs as float32 on the model's device."""
        xs = xs.to(self.device, torch.float32)
        return xs

    def _sample_counts(self, x: Any, num: int, batch_size: int,
                       generator: torch.Generator | None) -> torch.Tensor:
        """Counts [num_classes] (int64, on the model's device) of f(x + eps), eps ~ N(0, sigma^2 I), over
        `num` draws; x is one prepared example.

        Noise is drawn `batch_size` samples at a time from `generator` into one preallocated buffer, x is
        added in place, the base classifier sees slices of at most `forward_batch` samples, and predictions
        are counted on the device (index_add_: no host synchronisation; the caller moves the counts once)."""
        net, device, step = self._forward_net(), x.device, self.forward_batch
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=device)
        b_max = min(batch_size, num)
        fmt = torch.channels_last if (x.dim() == 3 and self._channels_last) else torch.contiguous_format
        buf = torch.empty((b_max, *x.shape), device=device, memory_format=fmt)
        ones = torch.ones(min(b_max, step), dtype=torch.long, device=device)
        done = 0
        while done < num:
            b = min(b_max, num - done)
            noisy = buf[:b].normal_(0.0, self.sigma, generator=generator).add_(x)
            for s in range(0, b, step):
                pred = net(noisy[s:s + step]).argmax(1)
                counts.index_add_(0, pred, ones[:pred.shape[0]])
            done += b
        return counts

    def _radius(self, pA_lower: float) -> float:
        """The certified l2 radius for pA_lower >= 0.5: sigma * Phi^-1(pA_lower) (Cohen et al. Thm. 1)."""
        return self.sigma * float(norm.ppf(pA_lower))

    def _make_row(self, idx: int, label: int, prediction: int, radius: float, seconds: float,
                  x: Any) -> CertRow:
        """The row of one certified example; `x` is its prepared state (for extra fields in subclasses)."""
        return CertRow(idx=idx, label=label, predict=prediction, radius=radius,
                       correct=int(prediction == label), time=seconds)

    # --- internals ------------------------------------------------------------------------------------------
    def _certify_prepared(self, x: Any, n0: int, n: int, alpha: float, batch_size: int,
                          generator: torch.Generator | None) -> tuple[int, float]:
        counts0 = self._sample_counts(x, n0, batch_size, generator)
        counts = self._sample_counts(x, n, batch_size, generator)
        both = torch.stack([counts0, counts]).cpu().numpy()  # one host transfer per example
        c_hat = int(both[0].argmax())
        pA_lower = lower_confidence_bound(int(both[1][c_hat]), n, alpha)
        if pA_lower < 0.5:
            return ABSTAIN, 0.0
        return c_hat, self._radius(pA_lower)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    @contextmanager
    def _certifying(self) -> Iterator[None]:
        """Eval mode and inference mode for the duration; the model's previous mode is restored afterwards."""
        was_training = self.base_classifier.training
        self.base_classifier.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self._fast_net, self._channels_last = None, False
            self.base_classifier.train(was_training)

    def _forward_net(self) -> nn.Module:
        """The network `_sample_counts` runs: with `channels_last`, a channels-last copy made once per call
        (CPU LeNet: ~2x the samples per second, measured; outputs equal up to float rounding, ~1e-7); the
        caller's network is never modified. Otherwise the network itself."""
        if self._fast_net is None:
            self._fast_net, self._channels_last = self.base_classifier, False
            if self.channels_last:
                try:
                    with torch.inference_mode(False):
                        net = copy.deepcopy(self.base_classifier)
                        self._fast_net = net.to(memory_format=torch.channels_last)
                    self._channels_last = True
                except Exception:  # a network that cannot be copied runs as it is: slower, same function
                    pass
        return self._fast_net

    def _check_counts(self, n: Any, alpha: Any, batch_size: Any, what: str) -> tuple[int, float, int]:
        if not (_is_real(alpha) and 0 < float(alpha) < 1):
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if not _is_count(batch_size):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not _is_count(n):
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        alpha = float(alpha)
        n_min = min_certify_n(alpha) if what == "certify" else min_predict_n(alpha)
        if n < n_min:
            raise ValueError(f"n={n} is too small for alpha={alpha}: {what} could never return a class "
                             f"(needs n >= {n_min})")
        return int(n), alpha, int(batch_size)

    def _check_certify_args(self, n0: Any, n: Any, alpha: Any,
                            batch_size: Any) -> tuple[int, int, float, int]:
        if not _is_count(n0):
            raise ValueError(f"n0 must be an integer >= 1, got {n0!r}")
        n, alpha, batch_size = self._check_counts(n, alpha, batch_size, "certify")
        return int(n0), n, alpha, batch_size

    def _check_example(self, x: torch.Tensor) -> torch.Tensor:
        """One example: a floating tensor of the model's input shape (without the batch dimension)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor in [0,1], got "
                             f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        self._check_shape(tuple(x.shape), "x must be ONE example (use certify_many for a batch)")
        return x

    def _check_batch(self, xs: torch.Tensor, labels, indices) -> tuple[torch.Tensor, list[int], list[int]]:
        if not isinstance(xs, torch.Tensor) or not xs.is_floating_point() or xs.dim() < 2:
            got = f"{xs.dtype} {list(xs.shape)}" if isinstance(xs, torch.Tensor) else type(xs).__name__
            raise ValueError("xs must be a floating-point batch [B, *input_shape] (e.g. [B, C, H, W]) in "
                             f"[0,1], got {got}")
        labels = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
        indices = [int(v) for v in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if not (len(labels) == len(indices) == xs.shape[0]):
            raise ValueError(f"xs, labels and indices must have the same length, got {xs.shape[0]}, "
                             f"{len(labels)}, {len(indices)}")
        if len(set(indices)) != len(indices):
            raise ValueError("indices must be distinct (each example's noise is seeded by its index)")
        if any(i < 0 for i in indices):
            raise ValueError("indices must be >= 0")
        self._check_shape(tuple(xs.shape[1:]), "xs must be a batch [B, *input_shape]")
        return xs, labels, indices

    def _check_shape(self, shape: tuple[int, ...], hint: str) -> None:
        if self.input_shape is not None:
            if shape != self.input_shape:
                raise ValueError(f"{hint}: expected an example of shape {list(self.input_shape)}, "
                                 f"got {list(shape)}")
            return
        if shape in self._checked_shapes:
            return
        # No declared shape: a forward pass of two zero examples must give [2, num_classes] (two, not one: a
        # batch of one can slip through broadcasting, e.g. Normalize turns [1, H, W] into [1, 1, H, W]).
        was_training = self.base_classifier.training
        self.base_classifier.eval()
        try:
            with torch.inference_mode():
                out = self.base_classifier(torch.zeros((2, *shape), device=self.device))
        except RuntimeError as e:
            raise ValueError(f"{hint}: an example of shape {list(shape)} does not fit the base classifier "
                             f"({str(e).splitlines()[0]})") from None
        finally:
            self.base_classifier.train(was_training)
        if tuple(out.shape) != (2, self.num_classes):
            raise ValueError(f"the base classifier maps two examples of shape {list(shape)} to "
                             f"{list(out.shape)}, expected [2, {self.num_classes}]: check "
                             f"num_classes={self.num_classes} and the input shape")
        self._checked_shapes.add(shape)
