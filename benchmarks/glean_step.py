"""One GLEAN full-batch training step on CMNIST's training split: MaxMin's own backward vs torch.maximum/minimum.

    python benchmarks/glean_step.py [--steps 3] [--threads 1] [--data-root DIR]

Builds GLEAN with its declared defaults on the packaged (or given) MNIST, then times `update` on all training
examples with trainables.lipschitz.MaxMin as shipped and with the torch.maximum/minimum formulation it replaced
(same values; the backward differs), alternating so both see the same machine. Prints seconds per step and the
ratio (the default main job runs 250 such steps per trial).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainables import lipschitz  # noqa: E402
from trainables.data import load_dataset  # noqa: E402
from trainables.registry import get_trainable  # noqa: E402


def torch_maxmin(self, x: torch.Tensor) -> torch.Tensor:
    k = x.shape[1] // 2
    a, b, rest = x[:, :k], x[:, k:2 * k], x[:, 2 * k:]
    return torch.cat([torch.maximum(a, b), torch.minimum(a, b), rest], dim=1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_dataset("cmnist", args.data_root, seed=0)
    n = len(splits.train)
    x = torch.stack([torch.as_tensor(splits.train[i][0]) for i in range(n)])
    y = torch.tensor([int(splits.train[i][1]) for i in range(n)])
    d = torch.tensor([int(splits.train[i][2]) for i in range(n)])
    glean = get_trainable("glean")({}, splits.info, epochs=250)
    shipped = lipschitz.MaxMin.forward
    times: dict[str, list[float]] = {"MaxMin (shipped)": [], "torch.maximum/minimum": []}
    glean.update(x, y, d)                                   # warm-up
    for _ in range(args.steps):
        for name, forward in (("MaxMin (shipped)", shipped), ("torch.maximum/minimum", torch_maxmin)):
            lipschitz.MaxMin.forward = forward
            t0 = time.perf_counter()
            glean.update(x, y, d)
            times[name].append(time.perf_counter() - t0)
    lipschitz.MaxMin.forward = shipped
    print(f"GLEAN full-batch step, {n} training examples ({splits.info.source}), {args.threads} thread(s):")
    for name, ts in times.items():
        print(f"  {name:24s} {statistics.median(ts):.3f} s per step (median of {len(ts)})")
    ratio = statistics.median(times["torch.maximum/minimum"]) / statistics.median(times["MaxMin (shipped)"])
    print(f"  speed-up of the shipped MaxMin: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
