"""Peak memory and time of one GLEAN optimisation step on CelebA / DomainNet-shaped batches on the CPU.

    python benchmarks/glean_memory.py celeba|domainnet [--threads 1] [--steps 2]

Builds GLEAN (declared defaults: 64 px, width 32, the dataset's default mini-batch from BATCH_BY_DATASET, every
training domain present) on a DataInfo of the dataset's shape, runs `update` on random images and prints the
batch, seconds per step, the process's peak RSS (getrusage) and the encoder's L. No data files needed: the
memory of a step depends on the shapes, not the pixels. Issue 14's target: <= 8 GB at the quick budget."""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainables.data import DataInfo  # noqa: E402
from trainables.glean import Glean  # noqa: E402

SHAPES = {"celeba": (2, 2), "domainnet": (345, 5)}    # classes, training domains


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset", choices=tuple(SHAPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    classes, envs = SHAPES[a.dataset]
    info = DataInfo(a.dataset, classes, (3, 64, 64), (0.0,) * 3, (1.0,) * 3,
                    train_domains=tuple(f"d{i}" for i in range(envs)), test_domains=("test",))
    torch.manual_seed(0)
    t = Glean(None, info)
    bs = t.hparams["batch_size"]
    x, y, d = torch.rand(bs, 3, 64, 64), torch.randint(0, classes, (bs,)), torch.arange(bs) % envs
    t0 = time.perf_counter()
    for _ in range(a.steps):
        t.update(x, y, d)
    print(f"{a.dataset}: batch {bs}, {(time.perf_counter() - t0) / a.steps:.2f} s/step, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB, L = {t.net.lipschitz():.6f}")


if __name__ == "__main__":
    main()
