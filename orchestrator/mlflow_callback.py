"""The only MLflow writer while training runs: the driver (C4).

Trials, Ray Train workers and certification actors never open the tracking store; they report everything
(orchestrator/train_loop.py) and the driver logs it here. So the default sqlite store works on any cluster
(only the driver touches it) and the tracking URI and its credentials need only be reachable from the driver.

- `log_report(cl, run_id, report, logged)`: one report of the training loop -> MLflow, deduplicated by epoch
  (a restarted trial re-reports the epochs after its last checkpoint; they are logged once). What is logged,
  at step = the report's epoch: every numeric key except Tune's bookkeeping (`train_<m>` as `<m>`, so the
  per-epoch training loss is `loss`), plus the epoch itself as metric `epoch` (its history is the dedupe
  record, so a driver restarted by --resume still knows what is logged); `step_metrics` [[global step,
  {name: value}], ...] at their global steps.
- `log_checkpoint_dir(cl, run_id, directory)`: model.pt as tracking.CHECKPOINT_ARTIFACT, every other file at
  its path relative to the directory (certification/val.tsv, a trainable's extra files).
- `MLflowTrialCallback`: the sweep's driver-side Tune callback (Ray's MLflowLoggerCallback is the pattern). Per
  Tune trial id it creates, or on --resume / retry reuses, the nested run under the sweep's parent run (logging
  the trial's params), logs every result through log_report, logs the last checkpoint's files when the trial
  completes, and closes the run: FINISHED (tagged stopped_early when it ended before its last epoch) or
  FAILED with the error; a trial Tune retries stays RUNNING (tagged with its restart count).
- `MLflowTrainCallback`: the same logging for orchestrator.train's TorchTrainer (a Ray Train callback, run by
  Train's controller, which Ray pins to the driver's node).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from orchestrator import mlflow_utils, tracking

CHECKPOINT_FILE = "model.pt"
STEP_METRICS = "step_metrics"
#: result keys Tune/Train add to every report: bookkeeping, not metrics of the run
NOT_LOGGED = frozenset({
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "experiment_tag", "config", "checkpoint_path", STEP_METRICS})
TRAIN_PREFIX = "train_"


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one report as MLflow names them (see the module docstring)."""
    out: dict[str, float] = {}
    for k, v in report.items():
        if k in NOT_LOGGED or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k[len(TRAIN_PREFIX):] if k.startswith(TRAIN_PREFIX) else k] = float(v)
    return out


def logged_epochs(cl, run_id: str) -> set[int]:
    """Epochs already logged to `run_id` (the steps of its `epoch` metric)."""
    return {int(m.step) for m in cl.get_metric_history(run_id, tracking.EPOCH)}


def log_report(cl, run_id: str, report: Mapping[str, Any], logged: set[int] | None = None) -> bool:
    """Log one training-loop report to `run_id` unless its epoch is in `logged` (updated). Returns whether it
    logged. `logged` None: read from the run (logged_epochs)."""
    if tracking.EPOCH not in report:
        return False
    epoch = int(report[tracking.EPOCH])
    if logged is None:
        logged = logged_epochs(cl, run_id)
    if epoch in logged:
        return False
    history: list[tuple[int, Mapping[str, Any]]] = [(int(s), m) for s, m in report.get(STEP_METRICS) or ()]
    history.append((epoch, report_metrics(report)))   # `epoch` last: it marks the report as logged
    mlflow_utils.log_metric_history(cl, run_id, history)
    logged.add(epoch)
    return True


def log_checkpoint_dir(cl, run_id: str, directory: str | os.PathLike) -> None:
    """model.pt -> tracking.CHECKPOINT_ARTIFACT; every other file at its relative path."""
    directory = Path(directory)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel.startswith(".") or "/." in rel:      # Ray's own hidden files (.metadata.json, ...)
            continue
        mlflow_utils.log_file(cl, run_id, path, tracking.CHECKPOINT_ARTIFACT if rel == CHECKPOINT_FILE else rel)


def log_checkpoint(cl, run_id: str, checkpoint) -> None:
    """Log a Ray Checkpoint's files (downloaded from the storage, wherever it is)."""
    with tempfile.TemporaryDirectory(prefix="ckpt-log-") as tmp:
        log_checkpoint_dir(cl, run_id, checkpoint.to_directory(tmp))


logger = logging.getLogger(__name__)


def _retrying(fn, *args, tries: int = 5, **kwargs):
    """fn(*args) retried with back-off: a busy store (sqlite locked by a reader, a server restarting) must not
    end the sweep; the dedupe by epoch makes a retried report safe. The last failure is raised."""
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types
            if attempt == tries - 1:
                raise
            logger.warning("MLflow write failed (%s); retrying", " ".join(str(exc).split())[:200])
            time.sleep(0.5 * 2 ** attempt)


def _local_error_text(trial) -> str | None:
    """The error Tune has just written beside the driver (`Trial.handle_error` writes error.txt locally before
    it calls the callbacks; the copy in the storage that get_pickled_error/get_error read is synced later, so on
    a fast failure they still find nothing)."""
    try:
        path = trial.error_file
        return Path(path).read_text() if path and Path(path).is_file() else None
    except Exception:  # noqa: BLE001 - older/other Trial objects
        return None


def _error_line(trial) -> str:
    """The last line of the trial's latest error (e.g. "ValueError: mix_step=5 must be <= num_steps=2")."""
    text = _local_error_text(trial)
    if text is None:
        try:
            err = trial.get_pickled_error() or trial.get_error()
        except Exception:  # noqa: BLE001 - older/other Trial objects
            err = None
        text = str(err) if err is not None else (getattr(trial, "error_msg", None) or "the trial failed")
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "the trial failed")[:500]


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray[tune] is a dependency
    _TuneCallback = object


class MLflowTrialCallback(_TuneCallback):
    """The sweep's driver-side MLflow writer (module docstring). `describe(config) -> (run name, tags, params)`
    and `epochs_of(config) -> planned epochs` come from the sweep; both run on the driver only."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 describe: Callable[[dict], tuple[str, dict, dict]], epochs_of: Callable[[dict], int]):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.describe, self.epochs_of = describe, epochs_of
        self._reset()

    def _reset(self) -> None:
        self._client = None
        self.run_ids: dict[str, str] = {}
        self._logged: dict[str, set[int]] = {}
        self._last_checkpoint: dict[str, Any] = {}
        self._last_epoch: dict[str, int] = {}

    # Tune pickles its callbacks with the experiment (Tuner.restore): no client, no caches
    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_client", "run_ids", "_logged", "_last_checkpoint", "_last_epoch"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_utils.client(self.tracking_uri)
        return self._client

    def run_id(self, trial) -> str:
        """The trial's run, created (or found, on resume and retry) once per driver."""
        tid = trial.trial_id
        if tid not in self.run_ids:
            name, tags, params = self.describe(dict(trial.config))
            rid = mlflow_utils.find_or_create_trial_run(self.client, self.experiment_id, self.parent_run_id,
                                                        tid, f"{name}-{tid}", tags)
            mlflow_utils.log_params(self.client, rid, params)
            self.run_ids[tid] = rid
            self._logged[tid] = logged_epochs(self.client, rid)
        return self.run_ids[tid]

    def on_trial_start(self, iteration, trials, trial, **info):
        _retrying(self.run_id, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = _retrying(self.run_id, trial)
        _retrying(log_report, self.client, rid, result, self._logged[trial.trial_id])
        if tracking.EPOCH in result:
            self._last_epoch[trial.trial_id] = int(result[tracking.EPOCH])
        if result.get("checkpoint_path"):   # a TorchTrainer inside the trial (TuneReportCallback)
            self._last_checkpoint[trial.trial_id] = ("path", result["checkpoint_path"], trial)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._last_checkpoint[trial.trial_id] = ("checkpoint", checkpoint, trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        rid = _retrying(self.run_id, trial)
        _retrying(mlflow_utils.set_tags, self.client, rid, {"restarts": getattr(trial, "num_failures", 0),
                                                 "last_failure": _error_line(trial)})

    def on_trial_error(self, iteration, trials, trial, **info):
        rid = _retrying(self.run_id, trial)
        _retrying(mlflow_utils.close_run, self.client, rid, "FAILED", _error_line(trial))

    def on_trial_complete(self, iteration, trials, trial, **info):
        rid = _retrying(self.run_id, trial)
        last = self._last_checkpoint.pop(trial.trial_id, None)
        if last is not None:
            _retrying(self._log_last_checkpoint, rid, last)
        epoch = self._last_epoch.get(trial.trial_id) or int((trial.last_result or {}).get(tracking.EPOCH, 0))
        _retrying(mlflow_utils.set_tags, self.client, rid, {
            tracking.TAG_STOPPED_EARLY: str(epoch < self.epochs_of(dict(trial.config))).lower()})
        _retrying(mlflow_utils.close_run, self.client, rid, "FINISHED")

    def _log_last_checkpoint(self, rid: str, last) -> None:
        kind, ckpt, trial = last
        if kind == "path":
            from ray.train import Checkpoint

            fs = getattr(getattr(trial, "storage", None), "storage_filesystem", None)
            ckpt = Checkpoint(ckpt, filesystem=fs)
        log_checkpoint(self.client, rid, ckpt)


try:
    from ray.train import UserCallback as _TrainCallback
except ImportError:  # pragma: no cover
    _TrainCallback = object


class MLflowTrainCallback(_TrainCallback):
    """orchestrator.train's TorchTrainer: log rank 0's reports to one run, and every checkpoint's files (so
    `--resume RUN_ID` finds the last one as an artifact). Runs in Train's controller, on the driver's node."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run = tracking_uri, run_id
        self._logged: set[int] | None = None

    def after_report(self, run_context, metrics, checkpoint):
        cl = mlflow_utils.client(self.tracking_uri)
        if self._logged is None:
            self._logged = logged_epochs(cl, self.run)
        if metrics:
            log_report(cl, self.run, metrics[0], self._logged)
        if checkpoint is not None:
            log_checkpoint(cl, self.run, checkpoint)
