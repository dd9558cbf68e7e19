"""`python -m orchestrator.sweep NAME`: search hyperparameters with Ray Tune + Optuna, maximising validation ACR.

    python -m orchestrator.sweep NAME [--dataset D] [--trials N] [--concurrency C] [--sampler tpe|cmaes|nsga2]
        [--seed S] [--select train-domain|oracle] [--objectives acr|acr,clean_acc] [--budget smoke|quick|paper]
        [--workers W] [--set key=value ...] [--space key=LOW:HIGH|key=a,b,c ...] [--resume]
        [--address auto|HOST:PORT|ray://HOST:PORT] [--tracking-uri URI] [--experiment NAME] [--data-root P]
        [--storage DIR]

NAME is a search space (search_spaces/: glean, drf, gaussian, ...) or a registered trainable swept with one
(drf-smoothadv = the drf space with the variant pinned); see search_spaces/__init__.py.

What happens:
1. Everything the user typed is checked first (name, ranges, pinned values, dataset, data, cluster address):
   bad input is one line on stderr and exit code 2, with nothing written.
2. A Ray Tune `Tuner` runs a function trainable (`trial`) over the search space: OptunaSearch with a seeded
   Optuna sampler (TPE by default; CMA-ES; NSGA-II), ASHA early stopping on the validation ACR reported at the
   budget's evaluation epochs (time_attr = the reported `epoch`: Tune's own iteration counter restarts after
   a restore), at most as many concurrent trials as the cluster can run. A trial trains directly in its
   process (1 CPU, or 1 GPU where the cluster has them), or, with `--workers W >= 2`, launches a
   `TorchTrainer` with W DDP workers (the trial itself then holds {"cpu": 0, "memory": 1}: with one CPU a
   trial on a 2-CPU machine starves its own workers; see ../shared/notes/ray-2.60-on-2-cpus.md).
3. The objective is the ACR of the smoothed classifier on the selection examples, certified with the budget's
   SEARCH settings (smaller n: a validation number, never a test number). `--select train-domain` (default)
   selects on the validation split of the training domains; `--select oracle` on a fixed 20% hold-out of the
   test split (DomainBed's oracle), and then reports on the remaining 80%.
4. The selected trial (highest final validation ACR among trials that ran to the end; for two objectives, the
   highest ACR on the Pareto front) is re-certified on the test split with the budget's FINAL settings
   (cli_common.certify_split), and a table is printed.

MLflow (names: orchestrator/tracking.py): a parent run per sweep (the search space, sampler, seed, budget,
data source, git commit; at the end the selected parameters, validation and test metrics) and a nested run per
trial (all parameters, per-epoch metrics, validation ACR per rung, final checkpoint, the validation TSV and
plot; the selected trial also its test TSV, plot and test_* metrics). Trial runs are tagged by Tune's trial id
and reused when a trial restarts, so `--resume` duplicates none. The driver closes every trial run at the end:
FINISHED (tagged stopped_early when ASHA stopped it), or FAILED with the error; a crashing trial is recorded
and the sweep goes on.

Resume: a sweep lives in <storage>/<NAME>-<hash of its settings>-<time>/ (Tune's experiment, Optuna's state
inside it, and sweep.json with the MLflow run ids and, when done, the summary). `--resume` with the same
settings continues the newest such sweep (Tuner.restore, errored trials retried); a sweep already done just
prints its table again.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from orchestrator import tracking
from orchestrator.budgets import BUDGETS, DEFAULT_BUDGET, Budget, get_budget
from orchestrator.cli_common import (UsageError, certify_split, cluster_cpus_gpus, format_table, init_ray,
                                     load_splits, loop_data, make_selection, parse_sets, run_main)

from orchestrator.search import SAMPLERS  # noqa: E402  (issue 16: "random" is the benchmark baseline)
OBJECTIVES = {"acr": (tracking.VAL_ACR,), "acr,clean_acc": (tracking.VAL_ACR, tracking.VAL_CLEAN_ACC)}
SWEEP_FILE = "sweep.json"
RUN_ID_KEY = "mlflow_run_id"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep", allow_abbrev=False,
                                description="Search hyperparameters (Ray Tune + Optuna) maximising validation ACR, "
                                            "then certify the selected model on the test split.")
    p.add_argument("name", help="search space or trainable (glean, drf, drf-smoothadv, gaussian, ...)")
    p.add_argument("--dataset", help="dataset (default: the trainable's DEFAULT_DATASET)")
    p.add_argument("--trials", type=int, help="number of trials (default: the budget's)")
    p.add_argument("--concurrency", type=int, help="concurrent trials (default and cap: what the cluster can run)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (nsga2 for two objectives)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, the model initialisation and noise")
    p.add_argument("--select", choices=("train-domain", "oracle"), default="train-domain",
                   help="model selection: validation split of the training domains, or a test-domain hold-out")
    p.add_argument("--objectives", choices=tuple(OBJECTIVES), default="acr",
                   help="acr, or acr,clean_acc for a two-objective search reporting the Pareto front")
    p.add_argument("--budget", choices=tuple(BUDGETS), default=DEFAULT_BUDGET, help="orchestrator/budgets.py")
    p.add_argument("--workers", type=int, default=1, help="DDP workers per trial (>= 2: Ray Train TorchTrainer)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="pin a hyperparameter for every trial")
    p.add_argument("--space", action="append", metavar="KEY=LOW:HIGH|KEY=a,b",
                   help="override a declared search range for this sweep")
    p.add_argument("--resume", action="store_true", help="continue the newest sweep with the same settings")
    p.add_argument("--address", help="Ray cluster (auto, HOST:PORT, ray://HOST:PORT; default RAY_ADDRESS, else "
                                     "a private local Ray)")
    p.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the dataset's name)")
    p.add_argument("--data-root", help="data root (default $SMOOTHING_DATA_ROOT, download, or the MNIST sample)")
    p.add_argument("--storage", help="Tune storage (default ~/ray_results; shared on a multi-node cluster)")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="Optuna RDB storage of the study (default: optuna.db beside an sqlite MLflow store, else in "
                        "the sweep's folder); open it with `optuna-dashboard URL`")
    return p


@dataclass
class SweepSetup:
    """What every trial needs besides its sampled config (pickled to the trials once)."""

    space: Any                       # search_spaces.Space
    budget: Budget
    dataset: str
    selection: str
    seed: int
    workers: int
    use_gpu: bool
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    storage: str
    data_source: str
    git_commit: str


# --- the trial ------------------------------------------------------------------------------------------------
def trial(config: dict[str, Any], setup: SweepSetup, data) -> None:
    """One Tune trial: train `config` through the one training loop, reporting validation ACR per rung."""
    from ray import tune

    from orchestrator import mlflow_utils
    from orchestrator.train_loop import LoopConfig, TuneSession, describe_exception, run_training

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    space, budget = setup.space, setup.budget
    name = space.trainable_for(config)
    hparams = space.hparams_for(config)
    epochs = budget.epochs_for(name, setup.dataset)
    cl = mlflow_utils.client(setup.tracking_uri)
    run_id = mlflow_utils.find_or_create_trial_run(
        cl, setup.experiment_id, setup.parent_run_id, trial_id, f"{name}-{trial_id}",
        {tracking.TAG_ROLE: "trial", tracking.TAG_TRAINABLE: name, tracking.TAG_DATASET: setup.dataset,
         tracking.TAG_SIGMA: hparams.get("sigma", ""), tracking.TAG_BUDGET: budget.name,
         tracking.TAG_SELECTION: setup.selection, tracking.TAG_DATA_SOURCE: setup.data_source,
         tracking.TAG_GIT_COMMIT: setup.git_commit, tracking.TAG_SEED: setup.seed, tracking.TAG_SWEEP: setup.sweep_id})
    try:
        from trainables.hparams import resolve
        from trainables.registry import get_trainable

        full = resolve(get_trainable(name).HPARAMS, hparams, owner=name)
        mlflow_utils.log_params(cl, run_id, {**full, "trainable": name, "dataset": setup.dataset,
                                             "budget": budget.name, "epochs": epochs, "workers": setup.workers,
                                             "data_source": setup.data_source, "selection": setup.selection,
                                             "search_n0": budget.search_n0, "search_n": budget.search_n,
                                             "search_examples": len(data.sel_idx), "seed": setup.seed})
        cfg = LoopConfig(trainable=name, hparams=hparams, epochs=epochs, eval_epochs=budget.eval_epochs(epochs),
                         seed=setup.seed, selection=setup.selection, n0=budget.search_n0, n=budget.search_n,
                         alpha=budget.alpha, cert_batch=budget.cert_batch, tracking_uri=setup.tracking_uri,
                         run_id=run_id, device="cuda" if setup.use_gpu and setup.workers == 1 else "cpu",
                         report_extra={RUN_ID_KEY: run_id})   # the driver maps Tune results to runs with it
        if setup.workers == 1:
            run_training(cfg, data, TuneSession())
        else:
            _fit_torch_trainer(cfg, data, setup, trial_id, run_id)
    except Exception as exc:
        mlflow_utils.close_run(cl, run_id, "FAILED", describe_exception(exc))
        raise


def _fit_torch_trainer(cfg, data, setup: SweepSetup, trial_id: str, run_id: str) -> None:
    """Data-parallel training of one trial: a TorchTrainer whose reports reach Tune via TuneReportCallback."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train_loop import train_worker

    trainer = TorchTrainer(
        train_worker, train_loop_config={"cfg": cfg, "data": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=setup.workers, use_gpu=setup.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        # a stable name per trial: a restarted trial's trainer finds its own checkpoints
        run_config=RunConfig(name=f"{setup.sweep_id}-train-{trial_id}", storage_path=setup.storage,
                             callbacks=[TuneReportCallback()]))
    trainer.fit()


# --- the driver -----------------------------------------------------------------------------------------------
def _sweep_key(args, space, dataset: str, trials: int) -> dict[str, Any]:
    """The settings that define a sweep (its directory name hashes them; --resume matches on them)."""
    return {"name": args.name, "dataset": dataset, "budget": args.budget, "trials": trials, "sampler": args.sampler,
            "seed": args.seed, "select": args.select, "objectives": args.objectives, "workers": args.workers,
            "space": space.describe()}


def _find_sweep(storage: Path, prefix: str) -> Path | None:
    found = sorted((p for p in storage.glob(prefix + "*") if (p / SWEEP_FILE).exists()),
                   key=lambda p: p.name)
    return found[-1] if found else None


def _reachable_trainables(space) -> list[str]:
    names = {space.trainable_for({})}
    for key in space.extra_names:
        hp = space.searched.get(key)
        if hp is not None and hp.choices is not None:
            names |= {space.trainable_for({key: c}) for c in hp.choices}
    return sorted(names)


def _make_sampler(kind: str, seed: int, objectives: int):
    from orchestrator.search import make_sampler

    try:
        return make_sampler(kind, seed, 1, 1, objectives)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def pareto_front(points: list[tuple[Any, tuple[float, ...]]]) -> list[tuple[Any, tuple[float, ...]]]:
    """The non-dominated (maximised) points, sorted by the first objective, best first."""
    front = [(k, p) for k, p in points
             if not any(all(q[i] >= p[i] for i in range(len(p))) and q != p for _, q in points)]
    return sorted(front, key=lambda kp: -kp[1][0])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python -m orchestrator.sweep", *(sys.argv[1:] if argv is None else argv)])
    from search_spaces import SearchSpaceError, get_space
    from trainables.registry import get_trainable

    # 1. check everything the user typed, before writing anything
    budget = get_budget(args.budget)
    trials = budget.trials if args.trials is None else args.trials
    if trials < 1:
        raise UsageError(f"--trials must be >= 1, got {trials}")
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    objectives = OBJECTIVES[args.objectives]
    try:
        space = get_space(args.name, parse_sets(args.space, "--space"), parse_sets(args.set))
    except SearchSpaceError as exc:
        raise UsageError(str(exc)) from None
    names = _reachable_trainables(space)
    classes = [get_trainable(n) for n in names]
    dataset = args.dataset or classes[0].DEFAULT_DATASET
    for cls in classes:
        if dataset not in cls.DATASETS:
            raise UsageError(f"{cls.NAME} is not defined on dataset {dataset!r}; use one of {', '.join(cls.DATASETS)}")
    _make_sampler(args.sampler, args.seed, len(objectives))
    from orchestrator.search import check_storage_url
    try:
        check_storage_url(args.optuna_storage)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from orchestrator import mlflow_utils

    tracking_uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri)
    storage = Path(args.storage or os.environ.get("RAY_STORAGE") or Path.home() / "ray_results").expanduser().resolve()
    key = _sweep_key(args, space, dataset, trials)
    prefix = f"{args.name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}-"
    previous = _find_sweep(storage, prefix) if args.resume else None
    if args.resume and previous is None:
        raise UsageError(f"nothing to resume: no sweep with these settings under {storage} ({prefix}*); "
                         "run without --resume to start one")
    if previous is not None:
        state = json.loads((previous / SWEEP_FILE).read_text())
        if state.get("status") == "done":
            print(f"sweep {previous.name} is already complete (nothing recomputed):\n")
            print(state["table"])
            return 0
    splits = load_splits(dataset, args.data_root, budget)
    selection = make_selection(splits, args.select, budget.search_examples, budget.final_examples)
    data = loop_data(splits, selection)

    # 2. Ray, MLflow, the Tuner
    started = init_ray(args.address)
    try:
        return _run(args, budget, trials, objectives, space, names, dataset, splits, selection, data,
                    tracking_uri, storage, prefix, previous, key)
    finally:
        if started:
            import ray
            ray.shutdown()


def _run(args, budget: Budget, trials: int, objectives, space, names, dataset, splits, selection, data,
         tracking_uri: str, storage: Path, prefix: str, previous: Path | None, key: dict) -> int:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator import mlflow_utils

    cpus, gpus = cluster_cpus_gpus()
    use_gpu = gpus >= 1
    if args.workers == 1:
        resources = {"cpu": 1, "gpu": 1} if use_gpu else {"cpu": 1}
        capacity = int(gpus) if use_gpu else int(cpus)
    else:  # the trial only launches the trainer: it must not hold a CPU its workers need
        resources = {"cpu": 0, "memory": 1}
        capacity = int((gpus if use_gpu else cpus) // args.workers)
    if capacity < 1:
        raise UsageError(f"--workers {args.workers} needs {args.workers} {'GPUs' if use_gpu else 'CPUs'}; "
                         f"the cluster has {int(gpus if use_gpu else cpus)}")
    concurrency = max(1, min(args.concurrency or capacity, capacity, trials))

    cl = mlflow_utils.client(tracking_uri)
    experiment = args.experiment or dataset
    if previous is None:
        sweep_dir = storage / (prefix + time.strftime("%Y%m%d-%H%M%S"))
        experiment_id = mlflow_utils.ensure_experiment(cl, experiment, tracking_uri)
        commit = mlflow_utils.git_commit()
        parent = mlflow_utils.create_run(cl, experiment_id, sweep_dir.name, {
            tracking.TAG_ROLE: "sweep", tracking.TAG_TRAINABLE: args.name, tracking.TAG_DATASET: dataset,
            tracking.TAG_BUDGET: budget.name, tracking.TAG_SELECTION: args.select,
            tracking.TAG_DATA_SOURCE: splits.info.source, tracking.TAG_GIT_COMMIT: commit,
            tracking.TAG_SEED: args.seed, tracking.TAG_SWEEP: sweep_dir.name})
        mlflow_utils.log_params(cl, parent, {
            **{f"space.{k}": v for k, v in space.describe().items()}, "sampler": args.sampler, "seed": args.seed,
            "trials": trials, "concurrency": concurrency, "objectives": args.objectives, "selection": args.select,
            "budget": budget.name, "dataset": dataset, "data_source": splits.info.source,
            "trainables": ",".join(names), "workers": args.workers,
            "search": f"n0={budget.search_n0} n={budget.search_n} alpha={budget.alpha} "
                      f"examples={len(selection.sel_indices)} of {selection.sel_split}",
            "final": f"n0={budget.final_n0} n={budget.final_n} alpha={budget.alpha} "
                     f"examples={len(selection.test_indices)} of {selection.test_label}",
            "epochs": ",".join(f"{n}:{budget.epochs_for(n, dataset)}" for n in names),
            "data_notes": " | ".join(getattr(splits, "notes", ()) or ())})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from orchestrator.search import default_storage_url
        state = {"status": "running", "key": key, "tracking_uri": tracking_uri, "experiment": experiment,
                 "experiment_id": experiment_id, "parent_run_id": parent, "git_commit": commit,
                 "optuna_storage": args.optuna_storage or default_storage_url(tracking_uri, sweep_dir),
                 "optuna_study": sweep_dir.name}
        mlflow_utils.log_params(cl, parent, {"optuna_storage": state["optuna_storage"],
                                             "optuna_study": state["optuna_study"]})
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(state, indent=2))
    else:
        sweep_dir = previous
        state = json.loads((sweep_dir / SWEEP_FILE).read_text())
        if state["tracking_uri"] != tracking_uri:
            raise UsageError(f"this sweep logs to {state['tracking_uri']}; resume it with --tracking-uri "
                             f"{state['tracking_uri']}")
        experiment, experiment_id, parent = state["experiment"], state["experiment_id"], state["parent_run_id"]
        commit = state["git_commit"]
        from orchestrator.search import default_storage_url   # issue 16: a sweep from before the stored study
        state.setdefault("optuna_storage", args.optuna_storage or default_storage_url(tracking_uri, sweep_dir))
        state.setdefault("optuna_study", sweep_dir.name)
        cl.update_run(parent, status="RUNNING")
    print(f"sweep {sweep_dir}\nMLflow: experiment {experiment!r}, parent run {parent} ({tracking_uri})", flush=True)
    if state.get("optuna_storage"):   # issue 16
        print(f"Optuna: study {state['optuna_study']!r}; watch it with optuna-dashboard {state['optuna_storage']}",
              flush=True)

    setup = SweepSetup(space=space, budget=budget, dataset=dataset, selection=args.select, seed=args.seed,
                       workers=args.workers, use_gpu=use_gpu, tracking_uri=tracking_uri,
                       experiment_id=experiment_id, parent_run_id=parent, sweep_id=sweep_dir.name,
                       storage=str(storage), data_source=splits.info.source, git_commit=commit)
    trainable = tune.with_resources(tune.with_parameters(trial, setup=setup, data=data), resources)
    max_epochs = max(budget.epochs_for(n, dataset) for n in names)
    try:
        if previous is not None and tune.Tuner.can_restore(str(sweep_dir)):
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
        else:
            import functools

            from orchestrator.search import build_searcher
            searcher = build_searcher(
                args.sampler, args.seed, trials, concurrency, objectives, state["optuna_storage"],
                state["optuna_study"], planned_epochs=functools.partial(_planned_epochs, budget, dataset, space),
                user_attrs={"command": args.command,
                            "dataset": dataset, "selection": args.select, "budget": budget.name,
                            "mlflow_parent_run_id": parent, "tracking_uri": tracking_uri})
            if len(objectives) == 1:
                rungs = budget.eval_epochs(max_epochs)
                scheduler = ASHAScheduler(time_attr=tracking.EPOCH, max_t=max_epochs, grace_period=rungs[0],
                                          reduction_factor=2, stop_last_trials=False) if len(rungs) > 1 \
                    else FIFOScheduler()
                tune_config = tune.TuneConfig(metric=objectives[0], mode="max", search_alg=searcher,
                                              scheduler=scheduler, num_samples=trials,
                                              max_concurrent_trials=concurrency, reuse_actors=True)
            else:  # ASHA stops on one metric: a two-objective search runs every trial to the end
                tune_config = tune.TuneConfig(search_alg=searcher, num_samples=trials,
                                              max_concurrent_trials=concurrency, reuse_actors=True)
            tuner = tune.Tuner(trainable, param_space=space.param_space(), tune_config=tune_config,
                               run_config=tune.RunConfig(
                                   name=sweep_dir.name, storage_path=str(storage),
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                   failure_config=tune.FailureConfig(max_failures=0), verbose=1))
        grid = tuner.fit()
        if grid.num_terminated + grid.num_errors < trials:  # Ctrl-C: Tune saved its state and returned early
            for run in mlflow_utils.trial_runs(cl, experiment_id, parent).values():
                if run.info.status == "RUNNING":
                    mlflow_utils.close_run(cl, run.info.run_id, "KILLED")
            mlflow_utils.close_run(cl, parent, "KILLED", "interrupted; continue with --resume")
            print(f"sweep interrupted ({grid.num_terminated + grid.num_errors} of {trials} trials done); continue "
                  f"it with the same command and --resume", file=sys.stderr)
            return 130
        results = [grid[i] for i in range(len(grid))]
        completed = _close_trial_runs(cl, experiment_id, parent, results, max_epochs)
        if not completed:
            raise RuntimeError(f"every trial failed; see the FAILED trial runs under parent run {parent} and "
                               f"Tune's logs in {sweep_dir}")
        table = _finish(cl, args, budget, objectives, space, dataset, splits, selection, completed, parent,
                        tracking_uri, experiment, sweep_dir)
    except BaseException as exc:
        from orchestrator.train_loop import describe_exception
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        mlflow_utils.close_run(cl, parent, status, describe_exception(exc))
        raise
    mlflow_utils.close_run(cl, parent, "FINISHED")
    from orchestrator.report import try_sweep_report   # issue 16: report.html / report.md, logged to the sweep run
    report = try_sweep_report(tracking_uri, parent, sweep_dir / "report", args.command)
    table += f"  report: {report}\n" if report else ""
    state.update(status="done", table=table)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(state, indent=2))
    print(table)
    return 0


def _close_trial_runs(cl, experiment_id: str, parent: str, results, max_epochs: int) -> list:
    """Close every trial run (FINISHED / FAILED, stopped_early tagged); return the usable results."""
    from orchestrator import mlflow_utils

    completed, seen = [], set()
    for r in results:
        run_id = (r.metrics or {}).get(RUN_ID_KEY)
        if run_id:
            seen.add(run_id)
        if r.error is not None:
            if run_id:
                mlflow_utils.close_run(cl, run_id, "FAILED", str(r.error).strip().splitlines()[-1][:500])
            continue
        if not run_id or r.metrics.get(tracking.VAL_ACR) is None:
            continue
        epoch = int(r.metrics.get(tracking.EPOCH, 0))
        mlflow_utils.set_tags(cl, run_id, {tracking.TAG_STOPPED_EARLY: str(epoch < max_epochs).lower()})
        mlflow_utils.close_run(cl, run_id, "FINISHED")
        completed.append(r)
    known = {str((r.metrics or {}).get("trial_id", "")) for r in results} | {Path(r.path).name for r in results
                                                                              if r.path}
    for tune_id, run in mlflow_utils.trial_runs(cl, experiment_id, parent).items():
        if run.info.status != "RUNNING" or run.info.run_id in seen:
            continue
        if not any(tune_id and (tune_id == k or tune_id in k) for k in known):
            # started by a driver that was killed before Tune saved the trial: Tune reruns that work under a new
            # trial id after --resume, so this run would count one trial twice. Delete it (MLflow keeps it in
            # its trash, `mlflow gc` removes it).
            mlflow_utils.set_tags(cl, run.info.run_id, {tracking.TAG_ERROR: "orphaned by an interrupted sweep"})
            mlflow_utils.close_run(cl, run.info.run_id, "KILLED")
            cl.delete_run(run.info.run_id)
            continue
        mlflow_utils.close_run(cl, run.info.run_id, "FAILED", "the trial ended without reporting")
    return completed


def _checkpoint_file(result) -> str:
    from ray.tune import Checkpoint

    from orchestrator.train_loop import CHECKPOINT_FILE

    ckpt = result.checkpoint or (Checkpoint(result.metrics["checkpoint_path"])
                                 if result.metrics.get("checkpoint_path") else None)
    if ckpt is None:
        raise RuntimeError(f"the selected trial {result.path} has no checkpoint")
    return str(Path(ckpt.to_directory()) / CHECKPOINT_FILE)


def _finish(cl, args, budget: Budget, objectives, space, dataset, splits, selection, completed, parent: str,
            tracking_uri: str, experiment: str, sweep_dir: Path) -> str:
    """Select, certify on the test split with the final settings, log, and return the summary table."""
    from orchestrator import mlflow_utils
    from trainables.metrics import RADII_BY_DATASET, certacc_key

    full = [r for r in completed if not _stopped_early(r, budget, dataset, space)] or completed
    front = None
    if len(objectives) > 1:
        front = pareto_front([(r, tuple(float(r.metrics[o]) for o in objectives)) for r in full])
        best = front[0][0]
    else:
        best = max(full, key=lambda r: float(r.metrics[tracking.VAL_ACR]))
    best_run = best.metrics[RUN_ID_KEY]
    params = {k: v for k, v in best.config.items()}
    name = space.trainable_for(params)
    print(f"certifying the selected trial ({name}, run {best_run}) on {len(selection.test_indices)} "
          f"{selection.test_label} examples with n={budget.final_n} ...", flush=True)
    t0 = time.perf_counter()
    rows = certify_split(_checkpoint_file(best), splits.test, selection.test_indices, split="test",
                         n0=budget.final_n0, n=budget.final_n, alpha=budget.alpha, batch=budget.cert_batch,
                         seed=args.seed, out_dir=sweep_dir / "final_certification")
    cert_s = time.perf_counter() - t0
    radii = RADII_BY_DATASET[dataset]
    cl.update_run(best_run, status="RUNNING")
    test = mlflow_utils.log_certification(cl, best_run, rows, "test", radii, prefix=tracking.TEST_PREFIX,
                                          title=f"{name} (test)")
    mlflow_utils.set_tags(cl, best_run, {tracking.TAG_SELECTED: "true", "test_examples": selection.test_label})
    mlflow_utils.close_run(cl, best_run, "FINISHED")
    mlflow_utils.log_params(cl, parent, {**{f"best.{k}": v for k, v in params.items()},
                                         **{f"best.{k}": v for k, v in space.fixed.items()},
                                         "best.trainable": name})
    val = {f"selected_{o}": float(best.metrics[o]) for o in objectives}
    mlflow_utils.log_metrics(cl, parent, {**val, **test, "final_certification_s": cert_s})
    mlflow_utils.set_tags(cl, parent, {"selected_run_id": best_run})
    from orchestrator import models   # issue 16: trial models in MLflow, the selected one registered
    version = models.publish_sweep(
        tracking_uri, [(r.metrics[RUN_ID_KEY], _checkpoint_file(r)) for r in completed], best_run, name, dataset,
        tags={**val, **test, **{models.CERT_PREFIX + k: v for k, v in {
            "split": "test", "n0": budget.final_n0, "n": budget.final_n, "alpha": budget.alpha,
            "batch": budget.cert_batch, "seed": args.seed, "selection": selection.method,
            "final_examples": budget.final_examples}.items()}, "sweep": sweep_dir.name, "sweep_run_id": parent},
        input_example=splits.test[selection.test_indices[0]][0].numpy()[None])
    model_uri = f"models:/{version.name}@{models.ALIAS}"
    mlflow_utils.set_tags(cl, parent, {"registered_model": f"{model_uri} (version {version.version})"})
    if front is not None:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pareto_front.tsv"
            lines = ["run_id\t" + "\t".join(objectives)]
            lines += [f"{r.metrics[RUN_ID_KEY]}\t" + "\t".join(f"{v:.4f}" for v in p) for r, p in front]
            path.write_text("\n".join(lines) + "\n")
            mlflow_utils.log_file(cl, parent, path, "pareto_front.tsv")

    sel = (f"{selection.method} selection: {len(selection.sel_indices)} examples of the "
           f"{'validation split' if selection.sel_split == 'val' else 'test-domain hold-out (oracle)'}, "
           f"SEARCH certification n0={budget.search_n0} n={budget.search_n} alpha={budget.alpha}")
    fin = (f"{len(selection.test_indices)} examples of the {selection.test_label.replace('_', ' ')} split, "
           f"FINAL certification n0={budget.final_n0} n={budget.final_n} alpha={budget.alpha}")
    acc = "  ".join(f"{r:g}:{test.get(tracking.TEST_PREFIX + certacc_key(r), float('nan')):.3f}" for r in radii)
    rows_out = [
        ("trainable / dataset", f"{name} on {dataset} (budget {budget.name}, {len(completed)} usable trials)"),
        ("best parameters", ", ".join(f"{k}={_fmt(v)}" for k, v in {**params, **space.fixed}.items())),
        ("validation ACR", f"{float(best.metrics[tracking.VAL_ACR]):.4f}   [{sel}]"),
    ]
    if len(objectives) > 1:
        rows_out.append(("validation clean acc", f"{float(best.metrics[tracking.VAL_CLEAN_ACC]):.4f}"))
        rows_out.append(("Pareto front (acr, clean_acc)",
                         "  ".join(f"({p[0]:.3f}, {p[1]:.3f})" for _, p in front)))
    rows_out += [
        ("test ACR", f"{test[f'{tracking.TEST_PREFIX}acr']:.4f}   [{fin}; model chosen by {selection.method}]"),
        ("test certified accuracy", f"radius:accuracy  {acc}"),
        ("data source", splits.info.source),
        ("MLflow", f"sweep run {parent}, selected trial run {best_run}, experiment {experiment!r}"),
        ("MLflow UI", mlflow_utils.ui_command(tracking_uri)),
        ("MLflow model", f"{model_uri} (version {version.version}); certify it with "
                         f"python -m orchestrator.certify --model {model_uri}"),
        ("Tune experiment", str(sweep_dir)),
    ]
    return "\n" + format_table(rows_out) + "\n"


def _planned_epochs(budget: Budget, dataset: str, space, config: dict) -> int:
    """Epochs a trial with `config` is planned to train (search.SweepSearch tells trials stopped before PRUNED)."""
    return budget.epochs_for(space.trainable_for(config), dataset)


def _stopped_early(result, budget: Budget, dataset: str, space) -> bool:
    epochs = budget.epochs_for(space.trainable_for(result.config), dataset)
    return int(result.metrics.get(tracking.EPOCH, 0)) < epochs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


if __name__ == "__main__":
    sys.exit(run_main(main))
