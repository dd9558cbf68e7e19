"""What the orchestration costs, in seconds (results: benchmarks/RESULTS.md, "Orchestration overhead").

    python benchmarks/orchestration_overhead.py [--part sweep|trainer|all] [--trials K]

sweep:   the same configuration (gaussian on mnist, the smoke budget, every searched parameter given one value
         with --space so every trial trains the same thing) through
           (a) the training function called directly (orchestrator.train_loop.run_training, no Ray, no MLflow),
           (b) `orchestrator.sweep` with 1 trial and with K trials, one at a time, on an already running Ray
               (after one warm-up sweep that pays the driver's imports; best of 2 each).
         Per-trial overhead = (wall(K trials) - wall(1 trial)) / (K - 1) - direct: the fixed costs (Tuner set-up,
         final certification, MLflow parent run) cancel, what remains is what one more trial costs beyond its
         training (actor, MLflow trial run, checkpoints, reports).
trainer: a TorchTrainer whose loop does nothing (Ray Train's start-up + tear-down), then the same training loop
         (gaussian on mnist, ~4,000 examples, 1 epoch) directly, under a TorchTrainer with 1 worker, and with 2
         DDP workers (gloo) on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from orchestrator.budgets import get_budget  # noqa: E402
from orchestrator.cli_common import load_splits, loop_data, make_selection  # noqa: E402
from orchestrator.train_loop import LocalSession, LoopConfig, run_training, train_worker  # noqa: E402

NAME, DATASET = "gaussian", "mnist"
PINNED = ["--space", "sigma=0.25", "--space", "lr=0.01"]


def _data(budget_name: str):
    budget = get_budget(budget_name)
    splits = load_splits(DATASET, None, budget)
    sel = make_selection(splits, "train-domain", budget.search_examples, budget.final_examples)
    return budget, loop_data(splits, sel)


def _cfg(budget, epochs: int) -> LoopConfig:
    return LoopConfig(NAME, {"sigma": 0.25, "lr": 0.01}, epochs, budget.eval_epochs(epochs), n0=budget.search_n0,
                      n=budget.search_n, alpha=budget.alpha, cert_batch=budget.cert_batch)


def direct(budget, data, epochs: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_training(_cfg(budget, epochs), data, LocalSession())
        times.append(time.perf_counter() - t0)
    return min(times)


def part_sweep(trials: int) -> None:
    import ray

    from orchestrator import sweep

    budget, data = _data("smoke")
    torch.set_num_threads(1)  # a trial has one CPU: compare like with like
    d = direct(budget, data, budget.epochs_for(NAME, DATASET))
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, configure_logging=False, log_to_driver=False)
    ray_init = time.perf_counter() - t0
    walls: dict[int, list[float]] = {1: [], trials: []}
    with tempfile.TemporaryDirectory() as tmp:
        # the first sweep pays the driver's one-time imports (Tune, Optuna, MLflow, matplotlib): not counted
        for i, k in enumerate((1, 1, trials, 1, trials)):
            t0 = time.perf_counter()
            rc = sweep.main([NAME, "--budget", "smoke", "--trials", str(k), "--concurrency", "1", *PINNED,
                             "--tracking-uri", f"sqlite:///{tmp}/mlflow-{i}.db", "--storage", f"{tmp}/ray-{i}"])
            assert rc == 0
            if i:
                walls[k].append(time.perf_counter() - t0)
    ray.shutdown()
    walls = {k: min(v) for k, v in walls.items()}
    per_trial = (walls[trials] - walls[1]) / (trials - 1)
    print(f"\n[sweep] {NAME} on {DATASET}, smoke budget, same configuration every trial, concurrency 1")
    print(f"  training function called directly (no Ray, no MLflow), 1 thread: {d:.2f} s")
    print(f"  ray.init (local, 2 CPUs):                                    {ray_init:.2f} s")
    print(f"  sweep with 1 trial (wall, best of 2 after a warm-up sweep):  {walls[1]:.2f} s")
    print(f"  sweep with {trials} trials (wall, best of 2):                       {walls[trials]:.2f} s")
    print(f"  one more trial through the sweep:                            {per_trial:.2f} s")
    print(f"  => orchestration overhead per trial:                         {per_trial - d:.2f} s")
    print(f"  => fixed cost of a sweep (set-up, final certification, logging): {walls[1] - d:.2f} s")


def _noop(config) -> None:
    """A Ray Train loop that does nothing: its TorchTrainer.fit() is pure start-up and tear-down."""


def part_trainer(epochs: int = 1) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    budget, data = _data("quick")
    cfg = _cfg(get_budget("smoke"), epochs)          # tiny validation certification: time goes to training
    cfg.eval_epochs = (epochs,)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_training(cfg, data, LocalSession())
    d1 = time.perf_counter() - t0
    ray.init(address="local", num_cpus=2, configure_logging=False, log_to_driver=False)
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = ray.put(data)
        for key, fn, workers in (("noop", _noop, 1), (1, train_worker, 1), (2, train_worker, 2)):
            t0 = time.perf_counter()
            TorchTrainer(fn, train_loop_config={"cfg": cfg, "data": ref},
                         scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name=f"bench-{key}", storage_path=tmp)).fit()
            walls[key] = time.perf_counter() - t0
    ray.shutdown()
    print(f"\n[trainer] {NAME} on {DATASET}: {len(data.train)} training examples, {epochs} epoch(s), batch 256")
    print(f"  TorchTrainer start-up + tear-down (a loop that does nothing): {walls['noop']:.2f} s")
    print(f"  direct, 1 thread (no Ray):                                  {d1:.2f} s")
    print(f"  TorchTrainer, 1 worker (wall):                              {walls[1]:.2f} s")
    print(f"  TorchTrainer, 2 workers, DDP over gloo (wall):              {walls[2]:.2f} s")
    print(f"  => 2 vs 1 worker: {walls[1] / walls[2]:.2f}x; without start-up: "
          f"{(walls[1] - walls['noop']) / max(walls[2] - walls['noop'], 1e-9):.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("sweep", "trainer", "all"), default="all")
    p.add_argument("--trials", type=int, default=6)
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; torch {torch.__version__}")
    if args.part in ("sweep", "all"):
        part_sweep(args.trials)
    if args.part in ("trainer", "all"):
        part_trainer()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
