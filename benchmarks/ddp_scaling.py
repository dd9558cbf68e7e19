"""Data-parallel training throughput: W DDP ranks vs one process on the same global batch.

    python benchmarks/ddp_scaling.py [--model lenet-gaussian|resnet110-smoothadv] [--workers 1,2]
        [--batch 256] [--steps 20] [--warmup 3] [--threads 1] [--device cpu|cuda] [--image-size 32]

For each W in --workers, W processes (torch.multiprocessing, a torch.distributed group over a free port: gloo on
CPUs, NCCL on GPUs, one GPU per rank) each with --threads torch threads train the trainable through its own
`update` with the loop's data-parallel set-up (orchestrator.train_loop: global batch --batch cut into rows r::W,
BatchKeys noise, DDP wrapper) on random images. Timed: --steps optimisation steps after --warmup untimed ones,
between two barriers (process start-up, imports and the group's set-up are excluded), device synchronised.
Reported per W: seconds per global step, images/s (global batch / step time), and the speed-up over W = 1.

`lenet-gaussian`: Gaussian augmentation on MNIST-shaped 28x28 images (LeNet). `resnet110-smoothadv`: SmoothAdv
(m = 2 noises, T = 2 attack steps: a reduced attack so CPU runs finish) on CIFAR-shaped images (ResNet-110;
--image-size shrinks them for tiny CPU runs). Each step's compute is what the recipe does; the data is random
because only time is measured. One JSON line per W, then a summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MODELS = {
    "lenet-gaussian": ("gaussian", "mnist", {}),
    "resnet110-smoothadv": ("smoothadv", "cifar10", {"num_noise_vec": 2, "num_steps": 2}),
}


def _info(dataset: str, size: int):
    from trainables.data import DataInfo
    if dataset == "mnist":
        return DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
    return DataInfo("cifar10", 10, (3, size, size), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist

    from orchestrator.train_loop import ddp_wrap, epoch_steps
    from trainables.device import ddp_backend, is_host, resolve_device, synchronize
    from trainables.registry import get_trainable

    torch.set_num_threads(args["threads"])
    device = resolve_device(args["device"])
    if not is_host(device):   # one GPU per rank
        device = torch.device(device.type, rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(ddp_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    name, dataset, hparams = MODELS[args["model"]]
    info = _info(dataset, args["image_size"])
    torch.manual_seed(0)
    t = get_trainable(name)({**hparams, "batch_size": args["batch"]}, info, epochs=1, device=device)
    if world > 1:
        t.distribute(ddp_wrap)
    n = args["batch"] * (args["steps"] + args["warmup"])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, *info.input_shape, generator=g)
    y = torch.randint(0, info.num_classes, (n,), generator=g)
    steps = list(epoch_steps(n, args["batch"], seed=0, epoch=0, rank=rank, world=world))

    def run(batch_steps):
        for idx, keys in batch_steps:
            t.set_batch_keys(keys)
            t.update(x[idx].to(device), y[idx].to(device), torch.zeros(len(idx), dtype=torch.long))
        synchronize(device)

    run(steps[:args["warmup"]])
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    run(steps[args["warmup"]:])
    if world > 1:
        dist.barrier()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": elapsed, "steps": len(steps) - args["warmup"]}))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: str, world: int, batch: int, steps: int, warmup: int = 3, threads: int = 1,
            device: str = "auto", image_size: int = 32) -> dict:
    """Seconds per global step and images/s of `model` with `world` ranks (module docstring)."""
    import torch.multiprocessing as mp

    if batch % world:
        raise ValueError(f"--batch {batch} is not divisible by {world} workers")
    args = dict(model=model, batch=batch, steps=steps, warmup=warmup, threads=threads, device=device,
                image_size=image_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_rank, args=(world, _free_port(), args, out), nprocs=world, join=True)
        r = json.loads(Path(out).read_text())
    step_s = r["seconds"] / r["steps"]
    return {"model": model, "workers": world, "threads_per_worker": threads, "device": device,
            "global_batch": batch, "steps": r["steps"], "step_s": step_s, "images_per_s": batch / step_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(MODELS), default="lenet-gaussian")
    p.add_argument("--workers", default="1,2", help="comma-separated world sizes")
    p.add_argument("--batch", type=int, default=256, help="GLOBAL batch (the recipe's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (one GPU per worker)")
    p.add_argument("--image-size", type=int, default=32, help="side of the CIFAR-shaped images (resnet110)")
    args = p.parse_args(argv)
    from trainables.device import is_host, resolve_device
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"ddp_scaling: error: {exc}", file=sys.stderr)
        return 2
    worlds = [int(w) for w in args.workers.split(",")]
    if not is_host(device) and max(worlds) > torch.cuda.device_count():
        print(f"ddp_scaling: error: {max(worlds)} workers need {max(worlds)} GPUs; this machine has "
              f"{torch.cuda.device_count()}", file=sys.stderr)
        return 2
    results = []
    for w in worlds:
        r = measure(args.model, w, args.batch, args.steps, args.warmup, args.threads, args.device, args.image_size)
        results.append(r)
        print(json.dumps(r), flush=True)
    base = results[0]["step_s"]
    print("summary: " + ", ".join(f"W={r['workers']}: {r['step_s'] * 1000:.1f} ms/step, "
                                  f"{r['images_per_s']:.0f} img/s, speed-up {base / r['step_s']:.2f}x"
                                  for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
