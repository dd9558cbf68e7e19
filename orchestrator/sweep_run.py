"""What `orchestrator.sweep` runs on Ray: the trial function, the Tuner around it, and closing the trial runs.

A trial never touches MLflow (C4): it trains through the one training loop and reports every epoch; the
driver's MLflowTrialCallback (orchestrator/mlflow_callback.py) logs the reports. Every epoch is reported but
only evaluation epochs carry the objective, so Tune's strict metric check is off and `EvaluationsOnly` hands
the searcher only the reports that carry it (ASHA already ignores the others).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.budgets import Budget


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
    resources_per_worker: dict
    sweep_id: str
    storage: str                     # storage URI (orchestrator.storage)
    max_failures: int


def trial(config: dict[str, Any], setup: SweepSetup, data) -> None:
    """One Tune trial: train `config` through the one training loop (reports reach the driver's callback).
    `data`: the LoopData's ObjectRef, put once by the driver (Tune resolves it in this process)."""
    from ray import tune

    from orchestrator.train_loop import LoopConfig, TuneSession, run_training

    space, budget = setup.space, setup.budget
    name = space.trainable_for(config)
    epochs = budget.epochs_for(name, setup.dataset)
    cfg = LoopConfig(trainable=name, hparams=space.hparams_for(config), epochs=epochs,
                     eval_epochs=budget.eval_epochs(epochs, name), seed=setup.seed, selection=setup.selection,
                     n0=budget.search_n0, n=budget.search_n, alpha=budget.alpha, cert_batch=budget.cert_batch,
                     device="auto")   # trainables.device.session_device: Ray's GPU or the CPU
    if setup.workers == 1:
        run_training(cfg, _resolve(data), TuneSession())
        return
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.trainer import build_torch_trainer

    ref = data if isinstance(data, ray.ObjectRef) else ray.put(data)
    # a stable name per trial: a restarted trial's trainer finds its own checkpoints
    build_torch_trainer(cfg, ref, workers=setup.workers, use_gpu=setup.use_gpu,
                        resources_per_worker=setup.resources_per_worker, storage=setup.storage,
                        name=f"{setup.sweep_id}-train-{tune.get_context().get_trial_id()}",
                        max_failures=setup.max_failures, callbacks=[TuneReportCallback()]).fit()


def _resolve(data):
    import ray

    return ray.get(data) if isinstance(data, ray.ObjectRef) else data


try:
    from ray.tune.search import ConcurrencyLimiter as _Limiter
except ImportError:  # pragma: no cover
    _Limiter = object


class EvaluationsOnly(_Limiter):
    """A ConcurrencyLimiter that passes the searcher only the results carrying its metric (evaluation epochs):
    Ray's OptunaSearch indexes result[metric] in every on_trial_result."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metric = self.searcher.metric
        metrics = metric if isinstance(metric, list) else [metric]
        if all(m in result for m in metrics if m):
            self.searcher.on_trial_result(trial_id, result)


def build_tuner(*, trainable, space, objectives, searcher, trials: int, concurrency: int,
                max_epochs: int, rungs: tuple[int, ...], sweep_uri: str, storage_uri: str, name: str,
                max_failures: int, callbacks: list, restore: bool):
    """A new Tuner for the sweep, or Tuner.restore of the one stored at `sweep_uri` (resume_errored).
    `searcher`: the sweep's OptunaSearch (orchestrator.search.build_searcher, C6); on a restore Tune restores
    the searcher's own state from the experiment."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator import storage as st

    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"   # non-evaluation epochs carry no objective
    fs, path = st.filesystem(sweep_uri)
    if restore and tune.Tuner.can_restore(path, storage_filesystem=fs):
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    searcher = EvaluationsOnly(searcher, concurrency)
    if len(objectives) == 1:
        scheduler = ASHAScheduler(time_attr=tracking.EPOCH, max_t=max_epochs, grace_period=rungs[0],
                                  reduction_factor=2, stop_last_trials=False) if len(rungs) > 1 else FIFOScheduler()
        tune_config = tune.TuneConfig(metric=objectives[0], mode="max", search_alg=searcher, scheduler=scheduler,
                                      num_samples=trials, reuse_actors=True)
    else:  # ASHA stops on one metric: a two-objective search runs every trial to the end
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=trials, reuse_actors=True)
    return tune.Tuner(trainable, param_space=space.param_space(), tune_config=tune_config,
                      run_config=tune.RunConfig(
                          name=name, checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                          failure_config=tune.FailureConfig(max_failures=max_failures), callbacks=callbacks,
                          verbose=1, **st.run_config_kwargs(storage_uri)))


def close_sweep_runs(cl, experiment_id: str, parent: str, results) -> dict[str, str]:
    """After Tuner.fit: the safety net behind MLflowTrialCallback. Every trial run still RUNNING is closed
    (FAILED for an errored result, else FINISHED); a run whose trial Tune never saved (started, even finished,
    by a driver killed before Tune's state was written: Tune reruns that work under a new trial id after
    --resume) is tagged orphaned and deleted so no trial counts twice. Returns Tune trial id -> MLflow run id
    of the kept runs."""
    from orchestrator import mlflow_utils

    runs = mlflow_utils.trial_runs(cl, experiment_id, parent)
    known = {str((r.metrics or {}).get("trial_id", "")) for r in results} | {Path(r.path).name for r in results
                                                                              if r.path}
    errored = {str((r.metrics or {}).get("trial_id", "")): r for r in results if r.error is not None}
    kept = {}
    for tune_id, run in runs.items():
        if not any(tune_id and (tune_id == k or tune_id in k) for k in known):
            # whatever its status: a killed driver may even have finished it before Tune saved the trial
            mlflow_utils.set_tags(cl, run.info.run_id, {tracking.TAG_ERROR: "orphaned by an interrupted sweep"})
            if run.info.status == "RUNNING":
                mlflow_utils.close_run(cl, run.info.run_id, "KILLED")
            cl.delete_run(run.info.run_id)
            continue
        kept[tune_id] = run.info.run_id
        if run.info.status != "RUNNING":
            continue
        if tune_id in errored:
            mlflow_utils.close_run(cl, run.info.run_id, "FAILED",
                                   str(errored[tune_id].error).strip().splitlines()[-1][:500])
        else:
            mlflow_utils.close_run(cl, run.info.run_id, "FINISHED")
    return kept


def checkpoint_file(result, local_dir: str) -> str:
    """model.pt of a result's last checkpoint, downloaded from the storage into `local_dir`."""
    from ray.train import Checkpoint

    from orchestrator.train_loop import CHECKPOINT_FILE

    ckpt = result.checkpoint
    if ckpt is None and result.metrics.get("checkpoint_path"):   # TorchTrainer inside the trial
        ckpt = Checkpoint(result.metrics["checkpoint_path"], filesystem=result.filesystem)
    if ckpt is None:
        raise RuntimeError(f"the selected trial {result.path} has no checkpoint")
    return str(Path(ckpt.to_directory(local_dir)) / CHECKPOINT_FILE)


def describe_trial(setup: SweepSetup, data_source: str, search_examples: int, commit: str):
    """config -> (run name, tags, params) of a trial's MLflow run (called by the driver's callback; Tune pickles
    it with the experiment, so it holds no data)."""
    budget = setup.budget

    def describe(config: dict) -> tuple[str, dict, dict]:
        from trainables.registry import get_trainable

        name = setup.space.trainable_for(config)
        hparams = setup.space.hparams_for(config)
        tags = {tracking.TAG_ROLE: "trial", tracking.TAG_TRAINABLE: name, tracking.TAG_DATASET: setup.dataset,
                tracking.TAG_SIGMA: hparams.get("sigma", ""), tracking.TAG_BUDGET: budget.name,
                tracking.TAG_SELECTION: setup.selection, tracking.TAG_DATA_SOURCE: data_source,
                tracking.TAG_GIT_COMMIT: commit, tracking.TAG_SEED: setup.seed, tracking.TAG_SWEEP: setup.sweep_id}
        try:
            full = get_trainable(name).resolve_hparams(hparams, setup.dataset)
        except ValueError:   # the trial itself fails on it and the callback records the error
            full = dict(hparams)
        params = {**full, "trainable": name, "dataset": setup.dataset, "budget": budget.name,
                  "epochs": budget.epochs_for(name, setup.dataset), "workers": setup.workers,
                  "data_source": data_source, "selection": setup.selection, "search_n0": budget.search_n0,
                  "search_n": budget.search_n, "search_examples": search_examples, "seed": setup.seed}
        return name, tags, params

    return describe


def planned_epochs(budget: Budget, dataset: str, space, config: dict) -> int:
    """Epochs a trial with `config` is planned to train (search.SweepSearch tells trials stopped before PRUNED)."""
    return budget.epochs_for(space.trainable_for(config), dataset)
