"""`python -m orchestrator.sweep NAME`: search hyperparameters with Ray Tune + Optuna, maximising validation ACR.

    python -m orchestrator.sweep NAME [--dataset D] [--trials N] [--concurrency C] [--sampler tpe|cmaes|nsga2|random|grid]
        [--seed S] [--select train-domain|oracle] [--objectives acr|acr,clean_acc] [--budget smoke|quick|paper]
        [--workers W] [--set key=value ...] [--space key=LOW:HIGH|key=a,b,c ...] [--resume]
        [--address auto|HOST:PORT|ray://HOST:PORT] [--tracking-uri URI] [--experiment NAME] [--data-root P]
        [--storage PATH|URI] [--cpus-per-trial C] [--gpus-per-trial G] [--memory-per-trial M] [--max-failures F]

NAME is a search space (search_spaces/: glean, drf, gaussian, ...) or a registered trainable swept with one
(drf-smoothadv = the drf space with the variant pinned); see search_spaces/__init__.py.

What happens:
1. Everything the user typed is checked first (name, ranges, pinned values, dataset, data, cluster address),
   then the cluster's pre-flight (orchestrator/cluster.py: resources a node can hold, storage reachable and
   shared by every alive node, data files on every node): bad input is one line on stderr and exit code 2,
   with nothing written.
2. A Ray Tune `Tuner` (orchestrator/sweep_run.py) runs a function trainable over the search space: OptunaSearch
   with a seeded Optuna sampler, ASHA early stopping on the validation ACR reported at the budget's evaluation
   epochs (time_attr = the reported `epoch`), trials restarted from their last checkpoint up to --max-failures
   times. A trial trains directly in its process with the resources of --cpus/--gpus/--memory-per-trial, or,
   with `--workers W >= 2`, launches a TorchTrainer (orchestrator/trainer.py) with W DDP workers.
3. The objective is the ACR of the smoothed classifier on the selection examples, certified with the budget's
   SEARCH settings (smaller n: a validation number, never a test number). Selection follows
   orchestrator/selection.py: on datasets with a held-out test domain (cmnist, celeba, domainnet) the default
   is `--select oracle` (a fixed 20% hold-out of the test domain, `oracle_acr`; test figures on the other 80%),
   and every trial also reports `val_acr` (the training domains' validation split, `--select train-domain`,
   the default elsewhere; oracle without a test domain is exit code 2).
4. The selected trial (highest final selection ACR among trials that ran to the end; for two objectives, the
   highest ACR on the Pareto front) is re-certified on the test split with the budget's FINAL settings
   (cli_common.certify_split), and so is the other protocol's pick where there is a test domain; the table
   shows both, labelled.
5. `--sampler grid` is a parameter study (GLEAN's Fig. 5: `--space lam=10,100,...,1000000 --space
   sigma=0.12,0.25,0.5,1.0`): every combination once, nothing stopped early, the other searched parameters at
   their declared defaults, and EVERY setting certified on the test split with the final settings; the table
   adds test ACR per setting and parameter_study.png (certified accuracy vs radius per setting,
   orchestrator/parameter_study.py), both logged to the sweep's run.

MLflow (names: orchestrator/tracking.py): a parent run per sweep and a nested run per trial. The driver is the
only writer (orchestrator/mlflow_callback.py): trials report every epoch, and a driver-side Tune callback logs
params, each epoch once, the final checkpoint's files and the statuses (FINISHED, stopped_early tagged;
FAILED with the error; a crashing trial is recorded and the sweep goes on). Trial runs are tagged by Tune's
trial id and reused when a trial restarts, so `--resume` duplicates none.

Resume: a sweep lives in <storage>/<NAME>-<hash of its settings>-<time>/ (a storage URI, orchestrator/storage.py:
Tune's experiment, Optuna's state inside it, and sweep.json with the MLflow run ids and, when done, the
summary). `--resume` with the same settings continues the newest such sweep (Tuner.restore, errored trials retried); a sweep already done just
prints its table again.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any, Sequence

from orchestrator import cli_common, cluster, defaults, tracking
from orchestrator import storage as st
from orchestrator.budgets import BUDGETS, DEFAULT_BUDGET, Budget, get_budget
from orchestrator.cli_common import UsageError, load_splits, loop_data, make_selection, parse_sets, run_main
from orchestrator.cluster import add_resource_flags, check_resource_flags
from orchestrator.mlflow_callback import MLflowTrialCallback
from orchestrator.provenance import SWEEP_DATA_COMPARED, differences, sweep_data_identity
from orchestrator.sweep_finish import finish, pareto_front
from orchestrator.sweep_run import SweepSetup, build_tuner, close_sweep_runs, describe_trial, planned_epochs, trial

__all__ = ["main", "build_parser", "pareto_front", "trial"]

from orchestrator.search import SAMPLERS, default_point, grid_of, grid_size, reachable_trainables  # noqa: E402  (issue 16: "random" is the benchmark baseline)
OBJECTIVES = {"acr": (tracking.VAL_ACR,), "acr,clean_acc": (tracking.VAL_ACR, tracking.VAL_CLEAN_ACC)}
SWEEP_FILE = "sweep.json"


def build_parser() -> argparse.ArgumentParser:
    p = cli_common.ArgumentParser(prog="python -m orchestrator.sweep", allow_abbrev=False,
                                description="Search hyperparameters (Ray Tune + Optuna) maximising validation ACR, "
                                            "then certify the selected model on the test split.")
    p.add_argument("name", help="search space or trainable (glean, drf, drf-smoothadv, gaussian, ...)")
    p.add_argument("--dataset", help="dataset (default: the trainable's DEFAULT_DATASET)")
    p.add_argument("--trials", type=int, help="number of trials (default: the budget's)")
    p.add_argument("--concurrency", type=int, help="concurrent trials (default: what the cluster can run now)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (nsga2 for two objectives; grid: every combination of the --space KEY=a,b,c lists once, "
                        "the other parameters at their defaults, each setting certified on the test split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, the model initialisation and noise")
    p.add_argument("--select", choices=("train-domain", "oracle"), default=None,
                   help="model selection (orchestrator/selection.py): test-domain hold-out (oracle; the default on "
                        "datasets with a held-out test domain) or the training domains' validation split "
                        "(train-domain; the default elsewhere)")
    p.add_argument("--objectives", choices=tuple(OBJECTIVES), default="acr",
                   help="acr, or acr,clean_acc for a two-objective search reporting the Pareto front")
    p.add_argument("--budget", choices=tuple(BUDGETS), default=DEFAULT_BUDGET, help="orchestrator/budgets.py")
    p.add_argument("--workers", type=int, default=1, help="DDP workers per trial (>= 2: Ray Train TorchTrainer)")
    add_resource_flags(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="pin a hyperparameter for every trial")
    p.add_argument("--space", action="append", metavar="KEY=LOW:HIGH|KEY=a,b",
                   help="override a declared search range for this sweep")
    p.add_argument("--resume", action="store_true", help="continue the newest sweep with the same settings")
    p.add_argument("--address", help="Ray cluster (auto, HOST:PORT, ray://HOST:PORT; default RAY_ADDRESS, else "
                                     "a private local Ray)")
    p.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else ./mlflow.db; in a Ray job "
                                          "~/.smoothing-orchestrator/mlflow.db); only the "
                                          "driver opens it")
    p.add_argument("--experiment", help="MLflow experiment (default: the dataset's name)")
    p.add_argument("--data-root", help="data root (default $SMOOTHING_DATA_ROOT, download, or the MNIST sample)")
    p.add_argument("--storage", help="Tune storage: a path, file://, s3://, gs:// URI (default $RAY_STORAGE, else "
                                     "~/ray_results; in a Ray job ~/.smoothing-orchestrator/ray_results); shared by every node on a multi-node cluster")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="Optuna RDB storage of the study (default: optuna.db beside an sqlite MLflow store, else in "
                        "the sweep's folder); open it with `optuna-dashboard URL`")
    return p


# --- the driver -----------------------------------------------------------------------------------------------
def _sweep_key(args, space, dataset: str, trials: int) -> dict[str, Any]:
    """The settings that define a sweep (its directory name hashes them; --resume matches on them)."""
    return {"name": args.name, "dataset": dataset, "budget": args.budget, "trials": trials, "sampler": args.sampler,
            "seed": args.seed, "select": args.select, "objectives": args.objectives, "workers": args.workers,
            "space": space.describe()}


def _find_sweep(storage_uri: str, prefix: str) -> tuple[str, dict] | None:
    """(name, sweep.json) of the newest sweep under the storage whose name starts with `prefix`."""
    for name in reversed(st.list_dirs(storage_uri, prefix)):
        text = st.read_text(st.join(storage_uri, name, SWEEP_FILE))
        if text is not None:
            return name, json.loads(text)
    return None


def _check_resume_data(previous: tuple[str, dict], identity: dict[str, Any]) -> None:
    """Refuse (one line listing the differences) to resume a sweep on other data than it was started on: its
    finished trials were trained and scored on those, and mixing the two would make its figures meaningless."""
    name, state = previous
    recorded = state.get("data")
    if recorded is None:   # a sweep started before sweep.json recorded its data: nothing to compare against
        print(f"warning: sweep {name} records no data provenance (an older version started it); resuming on "
              f"{identity['source']} unchecked", file=sys.stderr)
        return
    shown = differences(recorded, identity, SWEEP_DATA_COMPARED)
    if shown:
        raise UsageError(f"sweep {name} was started on other data ({shown}); resume it with the data it was "
                         f"started on (--data-root; it read {recorded.get('source')!r}), or run without --resume")


def _protocol_objectives(objectives: tuple[str, ...], protocol: str) -> tuple[str, ...]:
    """The search's metrics for `protocol`: val_* for train-domain, oracle_* for oracle (selection.py)."""
    if protocol != "oracle":
        return objectives
    from orchestrator.selection import ORACLE_ACR, ORACLE_CLEAN_ACC
    return tuple({tracking.VAL_ACR: ORACLE_ACR, tracking.VAL_CLEAN_ACC: ORACLE_CLEAN_ACC}[o] for o in objectives)
def _make_sampler(kind: str, seed: int, objectives: int, grid=None):
    from orchestrator.search import make_sampler

    try:
        return make_sampler(kind, seed, 1, 1, objectives, grid)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _grid_space(args, space):
    """(space, grid) of `--sampler grid`: the parameters given as lists (`--space KEY=a,b,c`, or declared
    choices) are the grid; every other searched range is pinned at its declared default, as in a paper's
    parameter study (GLEAN's Fig. 5 varies λ and σ, the rest fixed). A `--space KEY=LOW:HIGH` range is an error."""
    from search_spaces import SearchSpaceError, get_space
    listed = parse_sets(args.space, "--space")
    pins = {k: hp.default for k, hp in space.searched.items() if hp.choices is None and k not in listed}
    try:
        space = get_space(args.name, listed, {**pins, **parse_sets(args.set)})
        return space, grid_of(space.searched)
    except (SearchSpaceError, ValueError) as exc:
        raise UsageError(str(exc)) from None


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
    check_resource_flags(args)
    objectives = OBJECTIVES[args.objectives]
    try:
        space = get_space(args.name, parse_sets(args.space, "--space"), parse_sets(args.set))
    except SearchSpaceError as exc:
        raise UsageError(str(exc)) from None
    names = reachable_trainables(space)
    if args.trials is None:
        trials = budget.trials_of(names[0])
    args.grid = None                      # the values of --sampler grid (search.grid_of), else None
    if args.sampler == "grid":
        space, args.grid = _grid_space(args, space)
        if args.trials is not None and args.trials != grid_size(args.grid):
            raise UsageError(f"--sampler grid runs each of its {grid_size(args.grid)} settings once; drop --trials "
                             f"or pass --trials {grid_size(args.grid)}")
        trials = grid_size(args.grid)
    classes = [get_trainable(n) for n in names]
    dataset = args.dataset or classes[0].DEFAULT_DATASET
    for cls in classes:
        if dataset not in cls.DATASETS:
            raise UsageError(f"{cls.NAME} is not defined on dataset {dataset!r}; use one of {', '.join(cls.DATASETS)}")
    _make_sampler(args.sampler, args.seed, len(objectives), args.grid)
    from orchestrator.search import check_storage_url
    try:
        check_storage_url(args.optuna_storage)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from orchestrator import mlflow_utils

    tracking_uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri)
    storage_uri = st.normalize(args.storage)
    try:
        st.filesystem(storage_uri)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    key = _sweep_key(args, space, dataset, trials)
    prefix = f"{args.name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}-"
    previous = None
    if args.resume:
        previous = cluster.with_timeout(lambda: _find_sweep(storage_uri, prefix), cluster.STORAGE_TIMEOUT_S,
                                        f"the storage {st.redact(storage_uri)} is not reachable")
        if previous is None:
            raise UsageError(f"nothing to resume: no sweep with these settings under {st.redact(storage_uri)} "
                             f"({prefix}*); "
                             "run without --resume to start one")
        if previous[1].get("status") == "done":
            print(f"sweep {previous[0]} is already complete (nothing recomputed):\n")
            print(previous[1]["table"])
            return 0
    splits = load_splits(dataset, args.data_root, budget, names[0])
    selection = make_selection(splits, args.select, budget.search_examples, budget.final_examples_for(names[0]))
    objectives = _protocol_objectives(objectives, selection.method)
    data_identity = sweep_data_identity(splits, selection)
    if previous is not None:
        _check_resume_data(previous, data_identity)
    data = loop_data(splits, selection)

    # 2. Ray and its pre-flight (resources, storage shared, data on every node), then MLflow and the Tuner
    started = cluster.connect(args.address)
    try:
        resources = cluster.trial_resources(args.workers, args.cpus_per_trial, args.gpus_per_trial,
                                            args.memory_per_trial)
        cluster.preflight(storage_uri, cluster.data_paths(splits))
        return _run(args, budget, trials, objectives, space, names, dataset, splits, selection, data,
                    tracking_uri, storage_uri, prefix, previous, key, resources, data_identity)
    finally:
        if started:
            import ray
            ray.shutdown()


def _run(args, budget: Budget, trials: int, objectives, space, names, dataset, splits, selection, data,
         tracking_uri: str, storage_uri: str, prefix: str, previous, key: dict, resources,
         data_identity: dict[str, Any]) -> int:
    import ray
    from ray import tune

    from orchestrator import mlflow_utils

    concurrency = max(1, min(args.concurrency or resources.capacity or 1, trials))
    cl = mlflow_utils.client(tracking_uri)
    experiment = args.experiment or dataset
    if previous is None:
        sweep_name = prefix + time.strftime("%Y%m%d-%H%M%S")
        experiment_id = mlflow_utils.ensure_experiment(cl, experiment, tracking_uri)
        commit = mlflow_utils.git_commit()
        parent = mlflow_utils.create_run(cl, experiment_id, sweep_name, {
            tracking.TAG_ROLE: "sweep", tracking.TAG_TRAINABLE: args.name, tracking.TAG_DATASET: dataset,
            tracking.TAG_BUDGET: budget.name, tracking.TAG_SELECTION: selection.method,
            tracking.TAG_DATA_SOURCE: splits.info.source, tracking.TAG_GIT_COMMIT: commit,
            tracking.TAG_SEED: args.seed, tracking.TAG_SWEEP: sweep_name})
        mlflow_utils.log_params(cl, parent, {
            **{f"space.{k}": v for k, v in space.describe().items()}, "sampler": args.sampler, "seed": args.seed,
            "trials": trials, "concurrency": concurrency, "objectives": args.objectives, "selection": selection.method,
            "budget": budget.name, "dataset": dataset, "data_source": splits.info.source,
            "trainables": ",".join(names), "workers": args.workers, "storage": st.redact(storage_uri),
            "trial_resources": json.dumps(resources.trial), "max_failures": args.max_failures,
            "search": f"n0={budget.search_n0} n={budget.search_n} alpha={budget.alpha} "
                      f"examples={len(selection.sel_indices)} of {selection.sel_split}",
            "final": f"n0={budget.final_n0} n={budget.final_n_for(names[0])} alpha={budget.alpha} "
                     f"examples={len(selection.test_indices)} of {selection.test_label}",
            "epochs": ",".join(f"{n}:{budget.epochs_for(n, dataset)}" for n in names),
            "data_notes": " | ".join(getattr(splits, "notes", ()) or ())})
        from orchestrator.search import default_storage_url
        state = {"status": "running", "key": key, "tracking_uri": tracking_uri, "experiment": experiment,
                 "experiment_id": experiment_id, "parent_run_id": parent, "git_commit": commit,
                 "optuna_storage": args.optuna_storage or default_storage_url(
                     tracking_uri, st.local_dir(st.join(storage_uri, sweep_name)) or defaults.stable_home()),
                 "optuna_study": sweep_name, "data": data_identity}
        mlflow_utils.log_params(cl, parent, {"optuna_storage": mlflow_utils.redact(state["optuna_storage"]),
                                             "optuna_study": state["optuna_study"]})
        st.write_text(st.join(storage_uri, sweep_name, SWEEP_FILE), json.dumps(state, indent=2))
    else:
        sweep_name, state = previous
        if state["tracking_uri"] != tracking_uri:
            raise UsageError(f"this sweep logs to {state['tracking_uri']}; resume it with --tracking-uri "
                             f"{state['tracking_uri']}")
        experiment, experiment_id, parent = state["experiment"], state["experiment_id"], state["parent_run_id"]
        commit = state["git_commit"]
        from orchestrator.search import default_storage_url   # issue 16: a sweep from before the stored study
        state.setdefault("optuna_storage", args.optuna_storage or default_storage_url(
            tracking_uri, st.local_dir(st.join(storage_uri, sweep_name)) or defaults.stable_home()))
        state.setdefault("optuna_study", sweep_name)
        if "data" not in state:   # an older sweep: record what it resumes on from now on
            state["data"] = data_identity
            st.write_text(st.join(storage_uri, sweep_name, SWEEP_FILE), json.dumps(state, indent=2))
        cl.update_run(parent, status="RUNNING")
    sweep_uri = st.join(storage_uri, sweep_name)
    print(f"sweep {st.redact(sweep_uri)}\nMLflow: experiment {experiment!r}, parent run {parent} ({mlflow_utils.redact(tracking_uri)})",
          flush=True)
    if state.get("optuna_storage"):   # issue 16
        print(f"Optuna: study {state['optuna_study']!r}; watch it with optuna-dashboard "
              f"{mlflow_utils.redact(state['optuna_storage'])}", flush=True)

    setup = SweepSetup(space=space, budget=budget, dataset=dataset, selection=selection.method, seed=args.seed,
                       workers=args.workers, use_gpu=resources.use_gpu, resources_per_worker=resources.per_worker,
                       sweep_id=sweep_name, storage=storage_uri, max_failures=args.max_failures)
    # the data travels once through the object store: every trial (and DDP worker) on any node reads this ref
    data_ref = ray.put(data)
    trainable = tune.with_resources(tune.with_parameters(trial, setup=setup, data=data_ref), resources.trial)
    max_epochs = max(budget.epochs_for(n, dataset) for n in names)
    describe = describe_trial(setup, data.info.source, len(data.sel_idx), commit)
    callback = MLflowTrialCallback(tracking_uri, experiment_id, parent, describe,
                                   lambda config: budget.epochs_for(space.trainable_for(config), dataset))
    try:
        import functools

        from orchestrator.search import build_searcher
        searcher = build_searcher(
            args.sampler, args.seed, trials, concurrency, objectives, state["optuna_storage"],
            state["optuna_study"], planned_epochs=functools.partial(planned_epochs, budget, dataset, space),
            user_attrs={"command": args.command, "dataset": dataset, "selection": selection.method,
                        "budget": budget.name, "mlflow_parent_run_id": parent,
                        "tracking_uri": mlflow_utils.redact(tracking_uri)},
            points_to_evaluate=default_point(space) if len(objectives) == 1 and not args.grid else None,
            grid=args.grid)
        tuner = build_tuner(trainable=trainable, space=space, objectives=objectives, searcher=searcher,
                            trials=trials, concurrency=concurrency, max_epochs=max_epochs,
                            # a grid sweep stops nothing early: every setting is a result
                            rungs=(max_epochs,) if args.grid else budget.eval_epochs(max_epochs, names[0]),
                            sweep_uri=sweep_uri,
                            storage_uri=storage_uri, name=sweep_name, max_failures=args.max_failures,
                            callbacks=[callback], restore=previous is not None)
        grid = tuner.fit()
        cli_common.install_signal_handlers()   # Tune leaves its SIGINT handler behind (C7)
        # Ctrl-C / SIGTERM: Tune saved its state and returned early (trials it stopped may look errored)
        if grid.num_terminated + grid.num_errors < trials or cli_common.received_signal is not None:
            for run in mlflow_utils.trial_runs(cl, experiment_id, parent).values():
                if run.info.status == "RUNNING":
                    mlflow_utils.close_run(cl, run.info.run_id, "KILLED")
            mlflow_utils.close_run(cl, parent, "KILLED", "interrupted; continue with --resume")
            print(f"sweep interrupted ({grid.num_terminated + grid.num_errors} of {trials} trials done); continue "
                  f"it with the same command and --resume", file=sys.stderr)
            return 130
        results = [grid[i] for i in range(len(grid))]
        run_of = close_sweep_runs(cl, experiment_id, parent, results)
        completed = [r for r in results if r.error is None and (r.metrics or {}).get(tracking.VAL_ACR) is not None
                     and str(r.metrics.get("trial_id")) in run_of]
        if not completed:
            raise RuntimeError(f"every trial failed; see the FAILED trial runs under parent run {parent} and "
                               f"Tune's logs in {st.redact(sweep_uri)}")
        table = finish(cl, args, budget, objectives, space, dataset, splits, selection, completed, parent,
                        tracking_uri, experiment, sweep_uri, run_of)
    except BaseException as exc:
        from orchestrator.train_loop import describe_exception
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        mlflow_utils.close_running_children(cl, experiment_id, parent, status)   # C7: none left RUNNING
        mlflow_utils.close_run(cl, parent, status, describe_exception(exc))
        raise
    mlflow_utils.close_run(cl, parent, "FINISHED")
    from orchestrator.report import try_sweep_report   # issue 16: report.html / report.md, logged to the sweep run
    report_dir = st.local_dir(st.join(sweep_uri, "report")) or defaults.stable_home() / "reports" / sweep_name
    report = try_sweep_report(tracking_uri, parent, report_dir, args.command)
    table += f"  report: {report}\n" if report else ""
    state.update(status="done", table=table)
    st.write_text(st.join(sweep_uri, SWEEP_FILE), json.dumps(state, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(defaults.with_locations(main, build_parser)))
