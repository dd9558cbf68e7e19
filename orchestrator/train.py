"""`python -m orchestrator.train NAME`: train one configuration, certify it on the test split, log it to MLflow.

    python -m orchestrator.train NAME [--dataset D] [--set key=value ...] [--workers N] [--budget B] [--seed S]
        [--select train-domain|oracle] [--data-root P] [--tracking-uri URI] [--experiment NAME]
        [--address ADDR] [--storage DIR] [--device auto|cpu|cuda]

- `--workers 1` (default): the training loop (orchestrator/train_loop.py) runs in this process, no Ray: a
  TorchTrainer start-up costs 10-20 s on a 2-core machine and one process is all one CPU worker needs.
- `--workers N >= 2`: Ray Train's `TorchTrainer` with N DDP workers (gloo on CPU, NCCL with GPUs); checkpoints
  go through `ray.train.report(..., checkpoint=...)`, and a worker failure restarts from the last one
  (`ray.train.get_checkpoint()`, FailureConfig(max_failures=1)).
- Validation ACR (search settings of the budget) is computed and logged at the budget's evaluation epochs; after
  training the model is certified on the test split with the budget's FINAL settings (cli_common.certify_split).
- MLflow (orchestrator/tracking.py): one run (role "train") with every hyperparameter, per-epoch metrics,
  val_acr per evaluation, the final checkpoint at tracking.CHECKPOINT_ARTIFACT (trainables.checkpoint format:
  `orchestrator.certify --run-id` loads it), the validation and test TSVs and plots, and test_* metrics.
  The run is FINISHED, or FAILED with the error; never left RUNNING.
Prints a summary and, on the last line, the MLflow run id. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from orchestrator import tracking
from orchestrator.budgets import BUDGETS, DEFAULT_BUDGET, get_budget
from orchestrator.cli_common import (UsageError, certify_split, format_table, init_ray, load_splits, loop_data,
                                     make_selection, parse_sets, run_main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.train", allow_abbrev=False,
                                description="Train one configuration, certify it on the test split, log to MLflow.")
    p.add_argument("name", help="registered trainable (glean, gaussian, drf-smoothadv, ...)")
    p.add_argument("--dataset", help="dataset (default: the trainable's DEFAULT_DATASET)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a hyperparameter")
    p.add_argument("--workers", type=int, default=1, help="DDP workers (>= 2: Ray Train TorchTrainer)")
    p.add_argument("--budget", choices=tuple(BUDGETS), default=DEFAULT_BUDGET, help="orchestrator/budgets.py")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batch order and noise")
    p.add_argument("--select", choices=("train-domain", "oracle"), default="train-domain",
                   help="which examples the logged validation ACR uses (see orchestrator.sweep)")
    p.add_argument("--data-root", help="data root (default $SMOOTHING_DATA_ROOT, download, or the MNIST sample)")
    p.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the dataset's name)")
    p.add_argument("--address", help="Ray cluster for --workers >= 2 (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage", help="Ray Train storage for --workers >= 2 (default ~/ray_results)")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when there is one), cpu, cuda or cuda:K; with --workers >= 2 Ray Train "
                        "gives each worker its GPU (trainables.device)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator import mlflow_utils
    from orchestrator.train_loop import LocalSession, LoopConfig, describe_exception, run_training
    from trainables.hparams import resolve
    from trainables.registry import UnknownTrainableError, get_trainable

    # check everything first: nothing is written on bad input
    try:
        cls = get_trainable(args.name)
    except UnknownTrainableError as exc:
        raise UsageError(str(exc)) from None
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    dataset = args.dataset or cls.DEFAULT_DATASET
    if dataset not in cls.DATASETS:
        raise UsageError(f"{args.name} is not defined on dataset {dataset!r}; use one of {', '.join(cls.DATASETS)}")
    try:
        hparams = resolve(cls.HPARAMS, parse_sets(args.set), owner=args.name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from trainables.device import check_spec, is_host, resolve_device
    try:   # one process: this machine must have the device; Ray workers: the cluster's GPUs, checked below
        resolve_device(args.device) if args.workers == 1 else check_spec(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    budget = get_budget(args.budget)
    epochs = budget.epochs_for(args.name, dataset)
    tracking_uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri)
    splits = load_splits(dataset, args.data_root, budget)
    selection = make_selection(splits, args.select, budget.search_examples, budget.final_examples)
    data = loop_data(splits, selection)
    if args.workers > 1 and int(hparams.get("batch_size", 1)) < len(data.train):
        from orchestrator.train_loop import check_world
        try:
            check_world(int(hparams["batch_size"]), args.workers)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    started = init_ray(args.address) if args.workers > 1 else False
    if args.workers > 1:
        from orchestrator.cli_common import cluster_cpus_gpus
        cpus, gpus = cluster_cpus_gpus()
        wants_gpu = args.device != "auto" and not is_host(args.device)
        short = (gpus < args.workers) if wants_gpu else (gpus < args.workers and cpus < args.workers)
        if short:
            if started:
                import ray
                ray.shutdown()
            kind, have = ("GPUs", gpus) if wants_gpu else ("CPUs", cpus)
            raise UsageError(f"--workers {args.workers} needs {args.workers} {kind}; the cluster has {int(have)}")

    cl = mlflow_utils.client(tracking_uri)
    experiment = args.experiment or dataset
    experiment_id = mlflow_utils.ensure_experiment(cl, experiment, tracking_uri)
    run_id = mlflow_utils.create_run(cl, experiment_id, f"{args.name}-train", {
        tracking.TAG_ROLE: "train", tracking.TAG_TRAINABLE: args.name, tracking.TAG_DATASET: dataset,
        tracking.TAG_SIGMA: hparams.get("sigma", ""), tracking.TAG_BUDGET: budget.name,
        tracking.TAG_SELECTION: args.select, tracking.TAG_DATA_SOURCE: splits.info.source,
        tracking.TAG_GIT_COMMIT: mlflow_utils.git_commit(), tracking.TAG_SEED: args.seed})
    try:
        mlflow_utils.log_params(cl, run_id, {**hparams, "trainable": args.name, "dataset": dataset,
                                             "budget": budget.name, "epochs": epochs, "workers": args.workers,
                                             "data_source": splits.info.source, "selection": args.select,
                                             "search_n0": budget.search_n0, "search_n": budget.search_n,
                                             "search_examples": len(selection.sel_indices), "seed": args.seed})
        cfg = LoopConfig(trainable=args.name, hparams=hparams, epochs=epochs, eval_epochs=budget.eval_epochs(epochs),
                         seed=args.seed, selection=args.select, n0=budget.search_n0, n=budget.search_n,
                         alpha=budget.alpha, cert_batch=budget.cert_batch, tracking_uri=tracking_uri, run_id=run_id,
                         device=args.device)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="train-") as tmp:
            if args.workers == 1:
                session = LocalSession(tmp)
                last = run_training(cfg, data, session)
                checkpoint_file = str(Path(tmp) / "model.pt")
                rows = _certify(checkpoint_file, splits, selection, budget, args.seed, args.device)
            else:
                last, checkpoint_dir = _fit_torch_trainer(cfg, data, args, run_id)
                with checkpoint_dir.as_directory() as d:
                    rows = _certify(str(Path(d) / "model.pt"), splits, selection, budget, args.seed)
        train_s = time.perf_counter() - t0
        from trainables.metrics import RADII_BY_DATASET

        radii = RADII_BY_DATASET[dataset]
        test = mlflow_utils.log_certification(cl, run_id, rows, "test", radii, prefix=tracking.TEST_PREFIX,
                                              title=f"{args.name} (test)")
        mlflow_utils.log_metrics(cl, run_id, {"wall_time_s": train_s})
        mlflow_utils.set_tags(cl, run_id, {"test_examples": selection.test_label})
    except BaseException as exc:
        mlflow_utils.close_run(cl, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                               describe_exception(exc))
        raise
    finally:
        if started:
            import ray
            ray.shutdown()
    mlflow_utils.close_run(cl, run_id, "FINISHED")
    print(format_table([
        ("trained", f"{args.name} on {dataset}, {epochs} epochs, {args.workers} worker(s), budget {budget.name}"),
        ("validation ACR", f"{last.get(tracking.VAL_ACR, float('nan')):.4f}   [{len(selection.sel_indices)} "
                           f"{selection.sel_split} examples, n={budget.search_n}]"),
        ("test ACR", f"{test[tracking.TEST_PREFIX + 'acr']:.4f}   [{len(selection.test_indices)} "
                     f"{selection.test_label} examples, n={budget.final_n}]"),
        ("data source", splits.info.source),
        ("MLflow UI", mlflow_utils.ui_command(tracking_uri)),
    ]))
    print(run_id)
    return 0


def _certify(checkpoint_file: str, splits, selection, budget, seed: int, device: str = "auto"):
    return certify_split(checkpoint_file, splits.test, selection.test_indices, split="test", n0=budget.final_n0,
                         n=budget.final_n, alpha=budget.alpha, batch=budget.cert_batch, seed=seed, device=device)


def _fit_torch_trainer(cfg, data, args, run_id: str):
    """Data-parallel training under Ray Train. Returns (last rank-0 metrics, the final Checkpoint)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.cli_common import cluster_cpus_gpus
    from orchestrator.train_loop import train_worker

    from trainables.device import is_host
    on_host = args.device != "auto" and is_host(args.device)
    use_gpu = not on_host and cluster_cpus_gpus()[1] >= args.workers   # each worker: one whole GPU
    storage = Path(args.storage or os.environ.get("RAY_STORAGE") or Path.home() / "ray_results").expanduser().resolve()
    trainer = TorchTrainer(
        train_worker, train_loop_config={"cfg": cfg, "data": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"train-{run_id}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=1)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train returned no checkpoint")
    return dict(result.metrics or {}), result.checkpoint


if __name__ == "__main__":
    sys.exit(run_main(main))
