"""`python -m orchestrator.train NAME`: train one configuration, certify it on the test split, log it to MLflow.

    python -m orchestrator.train NAME [--dataset D] [--set key=value ...] [--workers N] [--budget B] [--seed S]
        [--select train-domain|oracle] [--data-root P] [--tracking-uri URI] [--experiment NAME]
        [--address ADDR] [--storage URI] [--cpus-per-trial C] [--gpus-per-trial G] [--memory-per-trial M]
        [--max-failures F] [--device auto|cpu|cuda] [--certify-n N] [--certify-examples K] [--tag KEY=VALUE ...]
    python -m orchestrator.train --resume RUN_ID [same store flags]

- `--workers 1` (default): the training loop (orchestrator/train_loop.py) runs in this process, no Ray: a
  TorchTrainer start-up costs 10-20 s on a 2-core machine and one process is all one CPU worker needs.
- `--workers N >= 2`: Ray Train's `TorchTrainer` (orchestrator/trainer.py, the same builder as the sweep's) with
  N DDP workers; a worker failure restarts the group from the last checkpoint (`--max-failures`, default 2).
  The per-worker request is --cpus-per-trial / --gpus-per-trial / --memory-per-trial.
- MLflow (orchestrator/tracking.py): one run (role "train"); this process is its only writer
  (orchestrator/mlflow_callback.py): every epoch's report, each checkpoint (tracking.CHECKPOINT_ARTIFACT,
  replaced at every evaluation epoch, so an interrupted run can continue), the validation and test TSVs and
  plots, test_* metrics. The run is FINISHED, or FAILED/KILLED with the error; never left RUNNING.
- `--resume RUN_ID` continues an interrupted run (FAILED or KILLED) from its last checkpoint artifact, with the
  settings logged in the run, into the same run; epochs already logged are not logged again.
- `--certify-n` / `--certify-examples` replace the budget's final test certification (n, and how many examples
  spread evenly over the reported test set), so that runs of different methods are certified alike (the GLEAN
  paper's Table 2 certifies every method Monte-Carlo at one n on one set of examples); the settings used are
  tagged test_cert_n0 / test_cert_n / test_cert_alpha (as orchestrator.certify tags them), read by compare.
- `--tag KEY=VALUE` adds tags to the run (orchestrator.reproduce names its runs by a hash of their command).
Prints a summary and, on the last line, the MLflow run id. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from orchestrator import cli_common, cluster, defaults, tracking
from orchestrator import storage as st
from orchestrator.budgets import BUDGETS, DEFAULT_BUDGET, get_budget
from orchestrator.cli_common import (UsageError, certify_split, format_table, load_splits, loop_data,
                                     make_selection, parse_sets, run_main)
from orchestrator.train_loop import CHECKPOINT_FILE

#: params of a train run that are not hyperparameters (everything --resume reads back)
META_PARAMS = ("trainable", "dataset", "budget", "epochs", "workers", "data_source", "selection", "search_n0",
               "search_n", "search_examples", "seed", "final_n", "final_examples")


def build_parser() -> argparse.ArgumentParser:
    p = cli_common.ArgumentParser(prog="python -m orchestrator.train", allow_abbrev=False,
                                description="Train one configuration, certify it on the test split, log to MLflow.")
    p.add_argument("name", nargs="?", help="registered trainable (glean, gaussian, drf-smoothadv, ...)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this interrupted train run from its last checkpoint")
    p.add_argument("--dataset", help="dataset (default: the trainable's DEFAULT_DATASET)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a hyperparameter")
    p.add_argument("--workers", type=int, default=1, help="DDP workers (>= 2: Ray Train TorchTrainer)")
    p.add_argument("--budget", choices=tuple(BUDGETS), default=DEFAULT_BUDGET, help="orchestrator/budgets.py")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batch order and noise")
    p.add_argument("--select", choices=("train-domain", "oracle"), default=None,
                   help="which examples the logged validation ACR uses (see orchestrator.sweep)")
    p.add_argument("--data-root", help="data root (default $SMOOTHING_DATA_ROOT, download, or the MNIST sample)")
    p.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else ./mlflow.db; in a Ray "
                                          "job ~/.smoothing-orchestrator/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the dataset's name)")
    p.add_argument("--address", help="Ray cluster for --workers >= 2 (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage", help="Ray Train storage for --workers >= 2: path or URI (default ~/ray_results; in a Ray job ~/.smoothing-orchestrator/ray_results)")
    cluster.add_resource_flags(p)
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when there is one), cpu, cuda or cuda:K; with --workers >= 2 Ray Train "
                        "gives each worker its GPU (trainables.device)")
    p.add_argument("--certify-n", type=int, help="n of the final test certification (default: the budget's)")
    p.add_argument("--certify-examples", type=int,
                   help="test examples certified, spread evenly (default: the budget's; GLEAN: all)")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a tag of the MLflow run")
    return p


def _resumed_settings(uri: str, args) -> tuple[str, dict]:
    """(trainable, hparams) of the run to resume; args.dataset/budget/seed/select/workers set from it."""
    from orchestrator import mlflow_utils

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UsageError(f"--resume {args.resume}: there is no MLflow store at {uri}")
    cl = mlflow_utils.client(uri)   # (an MlflowClient creates an sqlite store: only after the check above)
    try:
        run = cl.get_run(args.resume)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types
        raise UsageError(f"--resume {args.resume}: no such run in this store") from None
    if run.data.tags.get(tracking.TAG_ROLE) != "train":
        raise UsageError(f"--resume {args.resume}: not a run of orchestrator.train")
    if run.info.status == "FINISHED":
        raise UsageError(f"--resume {args.resume}: the run already FINISHED")
    p = run.data.params
    if args.name and args.name != p["trainable"]:
        raise UsageError(f"--resume {args.resume} is a {p['trainable']} run, not {args.name}")
    args.dataset, args.budget, args.seed = p["dataset"], p["budget"], int(p["seed"])
    args.select, args.workers = p["selection"], int(p["workers"])
    args.certify_n = int(p["final_n"]) if p.get("final_n") else None
    args.certify_examples = int(p["final_examples"]) if p.get("final_examples") not in (None, "", "None") else None
    return p["trainable"], {k: v for k, v in p.items() if k not in META_PARAMS}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator import mlflow_utils
    from orchestrator.mlflow_callback import MLflowTrainCallback, log_checkpoint_dir, log_report, logged_epochs
    from orchestrator.train_loop import LocalSession, LoopConfig, describe_exception, run_training
    from trainables.registry import UnknownTrainableError, get_trainable

    # check everything first: nothing is written on bad input
    tracking_uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri)
    overrides = parse_sets(args.set)
    name = args.name
    if args.resume:
        name, overrides = _resumed_settings(tracking_uri, args)
    if not name:
        raise UsageError("name a trainable (or --resume RUN_ID)")
    try:
        cls = get_trainable(name)
    except UnknownTrainableError as exc:
        raise UsageError(str(exc)) from None
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    cluster.check_resource_flags(args)
    dataset = args.dataset or cls.DEFAULT_DATASET
    if dataset not in cls.DATASETS:
        raise UsageError(f"{name} is not defined on dataset {dataset!r}; use one of {', '.join(cls.DATASETS)}")
    try:
        hparams = cls.resolve_hparams(overrides, dataset)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from trainables.device import check_spec, is_host, resolve_device
    try:   # one process: this machine must have the device; Ray workers: the cluster's GPUs, checked below
        resolve_device(args.device) if args.workers == 1 else check_spec(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    budget = get_budget(args.budget)
    epochs = budget.epochs_for(name, dataset)
    for flag, value in (("--certify-n", args.certify_n), ("--certify-examples", args.certify_examples)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    final_n = args.certify_n or budget.final_n_for(name)
    final_examples = args.certify_examples or budget.final_examples_for(name)
    tags = parse_sets(args.tag, "--tag")
    storage_uri = st.normalize(args.storage)
    try:
        st.filesystem(storage_uri)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    splits = load_splits(dataset, args.data_root, budget, name)
    selection = make_selection(splits, args.select, budget.search_examples, final_examples)
    args.select = selection.method      # resolved default (orchestrator/selection.py)
    data = loop_data(splits, selection)
    if args.workers > 1 and int(hparams.get("batch_size") or 1) < len(data.train):
        from orchestrator.train_loop import check_world
        try:
            check_world(int(hparams["batch_size"]), args.workers)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    started, resources = False, None
    if args.workers > 1:
        started = cluster.connect(args.address)
        try:
            explicit = args.device != "auto"
            gpus_wanted = 0.0 if explicit and is_host(args.device) else args.gpus_per_trial
            resources = cluster.trial_resources(1, args.cpus_per_trial, gpus_wanted, args.memory_per_trial)
            if explicit and not is_host(args.device) and not resources.use_gpu:
                raise UsageError(f"--device {args.device}: the cluster has no GPU for the workers (on an "
                                 "autoscaling cluster pass --gpus-per-trial 1)")
            cpus, gpus = cluster.cluster_cpus_gpus()
            # what one worker asks for (cluster.trial_resources' defaults: 1 GPU where there are GPUs, 1 CPU)
            per = (args.gpus_per_trial or 1.0) if resources.use_gpu else (args.cpus_per_trial or 1.0)
            if per and (gpus if resources.use_gpu else cpus) < per * args.workers and not args.address:
                raise UsageError(f"--workers {args.workers} needs {per * args.workers:g} "
                                 f"{'GPUs' if resources.use_gpu else 'CPUs'}; this machine has "
                                 f"{int(gpus if resources.use_gpu else cpus)}")
            cluster.preflight(storage_uri, cluster.data_paths(splits))
        except BaseException:
            if started:
                import ray
                ray.shutdown()
            raise

    cl = mlflow_utils.client(tracking_uri)
    experiment = args.experiment or dataset
    if args.resume:
        run_id = args.resume
        cl.update_run(run_id, status="RUNNING")
    else:
        experiment_id = mlflow_utils.ensure_experiment(cl, experiment, tracking_uri)
        run_id = mlflow_utils.create_run(cl, experiment_id, f"{name}-train", {
            tracking.TAG_ROLE: "train", tracking.TAG_TRAINABLE: name, tracking.TAG_DATASET: dataset,
            tracking.TAG_SIGMA: hparams.get("sigma", ""), tracking.TAG_BUDGET: budget.name,
            tracking.TAG_SELECTION: args.select, tracking.TAG_DATA_SOURCE: splits.info.source,
            tracking.TAG_GIT_COMMIT: mlflow_utils.git_commit(), tracking.TAG_SEED: args.seed,
            **{k: str(v) for k, v in tags.items()}})
    try:
        mlflow_utils.log_params(cl, run_id, {**hparams, "trainable": name, "dataset": dataset,
                                             "budget": budget.name, "epochs": epochs, "workers": args.workers,
                                             "data_source": splits.info.source, "selection": args.select,
                                             "search_n0": budget.search_n0, "search_n": budget.search_n,
                                             "search_examples": len(selection.sel_indices), "seed": args.seed,
                                             "final_n": final_n, "final_examples": final_examples})
        cfg = LoopConfig(trainable=name, hparams=hparams, epochs=epochs, eval_epochs=budget.eval_epochs(epochs, name),
                         seed=args.seed, selection=args.select, n0=budget.search_n0, n=budget.search_n,
                         alpha=budget.alpha, cert_batch=budget.cert_batch, device=args.device)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="train-") as tmp:
            resume_dir = _last_checkpoint(cl, run_id, Path(tmp) / "resume") if args.resume else None
            if args.workers == 1:
                ckpt_dir = resume_dir or Path(tmp) / "ckpt"
                logged = logged_epochs(cl, run_id)

                def on_report(report, checkpoint_dir):
                    log_report(cl, run_id, report, logged)
                    if checkpoint_dir:   # every checkpoint becomes the run's artifact: --resume finds it
                        log_checkpoint_dir(cl, run_id, checkpoint_dir)

                last = run_training(cfg, data, LocalSession(ckpt_dir, resume=resume_dir is not None,
                                                            on_report=on_report))
                rows = _certify(str(ckpt_dir / CHECKPOINT_FILE), splits, selection, budget, args.seed, final_n,
                                args.device)
            else:
                last, rows = _fit_torch_trainer(cfg, data, args, run_id, tracking_uri, storage_uri, resources,
                                                resume_dir, splits, selection, budget, final_n, MLflowTrainCallback)
        train_s = time.perf_counter() - t0
        from trainables.metrics import RADII_BY_DATASET

        radii = RADII_BY_DATASET[dataset]
        test = mlflow_utils.log_certification(cl, run_id, rows, "test", radii, prefix=tracking.TEST_PREFIX,
                                              title=f"{name} (test)")
        mlflow_utils.log_metrics(cl, run_id, {"wall_time_s": train_s})
        mlflow_utils.set_tags(cl, run_id, {"test_examples": selection.test_label,
                                           **{f"test_cert_{k}": v for k, v in (("n0", budget.final_n0),
                                                                               ("n", final_n), ("alpha", budget.alpha))}})
    except BaseException as exc:
        mlflow_utils.close_run(cl, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                               describe_exception(exc))
        raise
    finally:
        if started:
            import ray
            ray.shutdown()
    mlflow_utils.close_run(cl, run_id, "FINISHED")
    val = last.get(tracking.VAL_ACR, cl.get_run(run_id).data.metrics.get(tracking.VAL_ACR, float("nan")))
    print(format_table([
        ("trained", f"{name} on {dataset}, {epochs} epochs, {args.workers} worker(s), budget {budget.name}"
                    + (f", resumed run {run_id}" if args.resume else "")),
        ("validation ACR", f"{val:.4f}   [{len(selection.sel_indices)} {selection.sel_split} examples, "
                           f"n={budget.search_n}]"),
        ("test ACR", f"{test[tracking.TEST_PREFIX + 'acr']:.4f}   [{len(selection.test_indices)} "
                     f"{selection.test_label} examples, n={final_n}]"),
        ("data source", splits.info.source),
        ("MLflow UI", mlflow_utils.ui_command(tracking_uri)),
    ]))
    print(run_id)
    return 0


def _last_checkpoint(cl, run_id: str, dst: Path) -> Path | None:
    """The run's last checkpoint artifact downloaded into `dst` (None when it has none: start from epoch 0)."""
    dst.mkdir(parents=True, exist_ok=True)
    try:
        path = cl.download_artifacts(run_id, tracking.CHECKPOINT_ARTIFACT, str(dst))
    except Exception:  # noqa: BLE001 - no checkpoint logged yet
        return None
    return Path(path).parent


def _certify(checkpoint_file: str, splits, selection, budget, seed: int, n: int, device: str = "auto"):
    return certify_split(checkpoint_file, splits.test, selection.test_indices, split="test", n0=budget.final_n0,
                         n=n, alpha=budget.alpha, batch=budget.cert_batch, seed=seed,
                         device=device)


def _fit_torch_trainer(cfg, data, args, run_id: str, tracking_uri: str, storage_uri: str, resources,
                       resume_dir: Path | None, splits, selection, budget, final_n: int, callback_cls):
    """Data-parallel training under Ray Train; returns (last rank-0 report, test certification rows)."""
    import ray
    from ray.train import Checkpoint

    from orchestrator.trainer import build_torch_trainer

    resume = None
    if resume_dir is not None:   # through the storage: every worker node must read it
        uri = st.join(storage_uri, f"train-{run_id}-resume")
        st.upload_dir(resume_dir, uri)
        fs, path = st.filesystem(uri)
        resume = Checkpoint(path, filesystem=fs)
    trainer = build_torch_trainer(cfg, ray.put(data), workers=args.workers, use_gpu=resources.use_gpu,
                                  resources_per_worker={k.upper() if k != "memory" else k: v
                                                        for k, v in resources.trial.items()},
                                  storage=storage_uri, name=f"train-{run_id}", max_failures=args.max_failures,
                                  callbacks=[callback_cls(tracking_uri, run_id)], resume_from=resume)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train returned no checkpoint")
    with result.checkpoint.as_directory() as d:
        rows = _certify(str(Path(d) / CHECKPOINT_FILE), splits, selection, budget, args.seed, final_n)
    return dict(result.metrics or {}), rows


if __name__ == "__main__":
    sys.exit(run_main(defaults.with_locations(main, build_parser)))
