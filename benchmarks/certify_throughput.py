"""Certification throughput: noise-sample forwards per second of `Smooth.certify_many` against a loop in the
style of Cohen et al.'s reference (`code/core.py`), in the same run, on the MNIST LeNet.

    python benchmarks/certify_throughput.py [--n 10000] [--n0 100] [--examples 4] [--batch 1000]
                                            [--ref-batch 1000] [--threads 1] [--repeats 3] [--device cpu|cuda]
                                            [--ablation]

Reference-style loop (what researchers run today): one example per call; per pass, noise batches of
--ref-batch (1,000) built as `x.repeat(...)` + `torch.randn_like(batch) * sigma`, predictions moved to numpy
every batch and counted in a Python loop; the Clopper-Pearson bound as in the reference. `certify_many`
certifies the same examples (same n0, n, alpha; batch_size --batch: on a GPU, where a batch of 1,000 LeNet
samples takes microseconds, use a larger one, e.g. --batch 20000). A forward = one noise sample through the
network; every example costs n0 + n.

The network is an untrained LeNet (seeded) and the inputs uniform random images: CERTIFY always draws n0 + n
samples and LeNet has no data-dependent branches, so the cost does not depend on the weights or the digits.
The two contenders alternate --repeats times (a shared machine's load hits both alike); the best and the
median rate of each are printed. The matrix-multiply peak is the best torch.mm of 2048x2048 fp32 matrices with
the same threads, measured after every round; LeNet's FLOPs per forward are counted from its layers (2 x the
multiply-adds of the convolutions and linear layers; ReLU, pooling and biases not counted).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import beta, norm  # noqa: E402
from torch import nn  # noqa: E402

from trainables.data import DataInfo  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.device import DEVICE_CHOICES, is_cuda, resolve_device, synchronize  # noqa: E402
from trainables.smoothing import Smooth  # noqa: E402

MNIST = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
SIGMA = 0.25


def _sync(device: torch.device) -> None:
    synchronize(device)


def reference_certify(model: nn.Module, x: torch.Tensor, n0: int, n: int, alpha: float, batch: int,
                      num_classes: int = 10, sigma: float = SIGMA) -> tuple[int, float]:
    """Cohen et al.'s Smooth.certify (code/core.py), the device taken from x instead of hard-coded cuda."""

    def sample_noise(num: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(num_classes, dtype=int)
            for _ in range(math.ceil(num / batch)):
                this_batch_size = min(batch, num)
                num -= this_batch_size
                b = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(b, device=x.device) * sigma
                predictions = model(b + noise).argmax(1)
                for idx in predictions.cpu().numpy():  # the reference's _count_arr
                    counts[idx] += 1
            return counts

    model.eval()
    c_hat = int(sample_noise(n0).argmax())
    n_a = int(sample_noise(n)[c_hat])
    p_lower = 0.0 if n_a == 0 else beta.ppf(alpha, n_a, n - n_a + 1)
    return (-1, 0.0) if p_lower < 0.5 else (c_hat, sigma * norm.ppf(p_lower))


def flops_per_forward(model: nn.Module, example_shape: tuple[int, ...], device: torch.device) -> int:
    """2 x multiply-adds of every Conv2d and Linear for one example."""
    macs = 0

    def hook(m, inp, out):
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            macs += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.inference_mode():
        model(torch.zeros((1, *example_shape), device=device))
    for h in handles:
        h.remove()
    return 2 * macs


def matmul_peak(device: torch.device, size: int = 2048, tries: int = 5) -> float:
    """Best fp32 FLOP/s of torch.mm(size x size) over `tries`."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    best = math.inf
    for _ in range(tries):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="estimation samples per example (default 10,000)")
    p.add_argument("--n0", type=int, default=100, help="selection samples per example (default 100)")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--examples", type=int, default=4, help="examples certified per timing (default 4)")
    p.add_argument("--batch", type=int, default=1000,
                   help="certify_many's batch_size: noise samples drawn at once (default 1000)")
    p.add_argument("--ref-batch", type=int, default=1000,
                   help="the reference-style loop's noise batch (default 1000, Cohen et al.'s --batch)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timings of each contender (default 3)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="auto (a GPU when there is one), cpu or cuda (trainables.device)")
    p.add_argument("--ablation", action="store_true",
                   help="also time certify_many without channels-last and without forward slicing")
    args = p.parse_args(argv)
    for name in ("n", "n0", "examples", "batch", "ref_batch", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        p.error(str(exc))

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("lenet", MNIST).to(device).eval()
    xs = torch.rand((args.examples, *MNIST.input_shape), generator=torch.Generator().manual_seed(1))
    xs = xs.to(device)
    labels, indices = [0] * args.examples, list(range(args.examples))
    samples = args.examples * (args.n0 + args.n)
    cert = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch)

    def run_reference() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for x in xs:
            reference_certify(model, x, args.n0, args.n, args.alpha, args.ref_batch)
        _sync(device)
        return samples / (time.perf_counter() - t0)

    def run_ours(**smooth_kw) -> float:
        smooth = Smooth(model, MNIST.num_classes, SIGMA, **smooth_kw)
        _sync(device)
        t0 = time.perf_counter()
        smooth.certify_many(xs, labels, indices, seed=0, **cert)
        _sync(device)
        return samples / (time.perf_counter() - t0)

    contenders = {"reference-style loop": run_reference, "certify_many": run_ours}
    if args.ablation:
        contenders["certify_many, contiguous"] = lambda: run_ours(channels_last=False)
        contenders["certify_many, contiguous, unsliced"] = lambda: run_ours(channels_last=False,
                                                                             forward_batch=args.batch)
    run_ours(), run_reference()  # warm-up: allocator, oneDNN primitive caches
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    peak = 0.0
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            rates[name].append(fn())
        peak = max(peak, matmul_peak(device))  # measured between rounds, under the same load
    load_after = os.getloadavg()
    flops = flops_per_forward(model, MNIST.input_shape, device)

    print(f"device {device} ({torch.cuda.get_device_name(device) if is_cuda(device) else 'CPU'}), "
          f"torch threads {args.threads}, torch {torch.__version__}; "
          f"load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1-min)")
    print(f"MNIST LeNet, sigma {SIGMA}, {args.examples} examples x (n0 {args.n0} + n {args.n}) samples, "
          f"alpha {args.alpha}, batch {args.batch} (reference-style: {args.ref_batch}), "
          f"{args.repeats} alternating repeats")
    print(f"LeNet forward: {flops / 1e6:.2f} MFLOP per sample; "
          f"torch.mm 2048^2 fp32 peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'contender':38s} {'best/s':>10s} {'median/s':>10s} {'% of mm peak':>13s}")
    for name, r in rates.items():
        print(f"{name:38s} {max(r):10.0f} {statistics.median(r):10.0f} {100 * max(r) * flops / peak:12.1f}%")
    ref = rates["reference-style loop"]
    ours = rates["certify_many"]
    print(f"speed-up certify_many / reference-style: best {max(ours) / max(ref):.2f}x, "
          f"median {statistics.median(ours) / statistics.median(ref):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
