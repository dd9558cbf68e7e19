"""Small MLflow helpers used by train and sweep (the names themselves live in orchestrator.tracking).

Everything goes through `mlflow.MlflowClient(uri)` with an explicit absolute tracking URI: Ray workers run in
other working directories, and a relative or implicit URI would silently write to another store.
"""
from __future__ import annotations

import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from orchestrator import tracking

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else the default store (orchestrator.defaults.default_tracking_uri: MLFLOW_TRACKING_URI, inside
    a Ray job ~/.smoothing-orchestrator/mlflow.db, else MLflow's sqlite:///<cwd>/mlflow.db), made absolute:
    a `sqlite:///relative.db`, `file:relative` or bare path becomes an absolute one."""
    from orchestrator import defaults

    uri = uri or defaults.default_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return uri if path.startswith("/") or path == ":memory:" else f"sqlite:///{Path(path).resolve()}"
    if uri.startswith("file:"):
        return Path(uri[len("file:"):].removeprefix("//")).resolve().as_uri()
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def client(uri: str):
    import mlflow

    from orchestrator.defaults import ensure_sqlite_parent
    ensure_sqlite_parent(uri)   # e.g. ~/.smoothing-orchestrator/ inside a Ray job: sqlite creates no folders
    return mlflow.MlflowClient(tracking_uri=uri)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment's artifacts go: next to an sqlite store (`<db folder>/mlruns/`), so that a store and
    its artifacts stay together; MLflow's own default is `./mlruns` in whatever directory the process runs in.
    None (the server's default) for other stores."""
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    return None


def ensure_experiment(cl, name: str, uri: str | None = None) -> str:
    """The id of experiment `name`, created if needed (restored if it was deleted). `uri`: the store's tracking
    URI, to place a new experiment's artifacts next to an sqlite file (artifact_root)."""
    exp = cl.get_experiment_by_name(name)
    if exp is None:
        try:
            root = artifact_root(uri) if uri else None
            return cl.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
        except Exception:  # created concurrently by another process
            exp = cl.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        cl.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The git commit of the code (with "+dirty" when the tree has changes); "unknown" outside a checkout."""
    cwd = str(path or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def create_run(cl, experiment_id: str, name: str, tags: Mapping[str, Any],
               parent_run_id: str | None = None) -> str:
    tags = {k: str(v) for k, v in tags.items()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return cl.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def find_or_create_trial_run(cl, experiment_id: str, parent_run_id: str, trial_id: str, name: str,
                             tags: Mapping[str, Any]) -> str:
    """The nested run of Tune trial `trial_id` under `parent_run_id`, created once.

    A trial restarted by `--resume` (or retried by Tune) finds and reuses its run instead of creating a
    second one: the idempotence that keeps MLflow free of duplicated trials.
    """
    runs = cl.search_runs([experiment_id],
                          filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                        f"tags.`{tracking.TAG_TUNE_TRIAL}` = '{trial_id}'",
                          max_results=5)
    if runs:
        run_id = runs[0].info.run_id
        if runs[0].info.status != "RUNNING":
            cl.update_run(run_id, status="RUNNING")
        return run_id
    return create_run(cl, experiment_id, name, {**tags, tracking.TAG_TUNE_TRIAL: trial_id}, parent_run_id)


def trial_runs(cl, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """Tune trial id -> MLflow run of a sweep's nested trial runs."""
    runs = cl.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                          max_results=10_000)
    return {r.data.tags.get(tracking.TAG_TUNE_TRIAL, r.info.run_id): r for r in runs}


def log_params(cl, run_id: str, params: Mapping[str, Any]) -> None:
    """Log parameters (values stringified, capped at MLflow's length limit). Re-logging an equal value is a
    no-op, so a resumed trial can call this again."""
    from mlflow.entities import Param

    existing = cl.get_run(run_id).data.params
    todo = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()
            if existing.get(k) != str(v)[:MAX_PARAM_CHARS]]
    for i in range(0, len(todo), 100):
        cl.log_batch(run_id, params=todo[i:i + 100])


def log_metrics(cl, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite float metrics of `metrics` (others are skipped: MLflow rejects them)."""
    log_metric_history(cl, run_id, [(step, metrics)])


def log_metric_history(cl, run_id: str, history: Iterable[tuple[int | None, Mapping[str, Any]]]) -> None:
    """Log many (step, metrics) pairs in few calls (one sqlite transaction per 1000 values)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for step, metrics in history:
        for k, v in metrics.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                batch.append(Metric(tracking.metric_name(k), f, now, int(step or 0)))
    for i in range(0, len(batch), 1000):
        cl.log_batch(run_id, metrics=batch[i:i + 1000])


def log_step_metrics(cl, run_id: str, steps: Iterable[Any]) -> None:
    """Log a report's per-optimiser-step metrics (contract C3: [[global step, {name: value}], ...]) at their
    steps, so e.g. DRF's drf_lambda has one point per SGD step in the run's history."""
    log_metric_history(cl, run_id, [(int(step), metrics) for step, metrics in steps])


def set_tags(cl, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    cl.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def close_run(cl, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    """End a run as FINISHED / FAILED / KILLED (never leave it RUNNING)."""
    if error:
        set_tags(cl, run_id, {tracking.TAG_ERROR: " ".join(str(error).split())[:5000]})
    cl.set_terminated(run_id, status=status)


def log_file(cl, run_id: str, local_path: str | os.PathLike, artifact_path: str) -> None:
    """Log `local_path` as the artifact `artifact_path` (a file path inside the run's artifacts)."""
    parent, _, name = artifact_path.rpartition("/")
    local_path = Path(local_path)
    if local_path.name == name:
        cl.log_artifact(run_id, str(local_path), parent or None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / name
        target.write_bytes(local_path.read_bytes())
        cl.log_artifact(run_id, str(target), parent or None)


def log_certification(cl, run_id: str, rows, split: str, radii, prefix: str, title: str = "",
                      meta: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Log one certification of `split`: the summary metrics (prefixed), Cohen's TSV and the
    certified-accuracy plot at tracking.cert_tsv_artifact / cert_plot_artifact, and with `meta` (σ, n0, n, α,
    fingerprint, seed) its JSON sidecar beside the TSV (trainables.metrics.sidecar_path). Returns the metrics."""
    from trainables import metrics as M

    summary = M.summarize(rows, radii, prefix=prefix)
    log_metrics(cl, run_id, summary)
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / Path(tracking.cert_tsv_artifact(split)).name
        M.write_tsv(rows, tsv, meta=meta)
        log_file(cl, run_id, tsv, tracking.cert_tsv_artifact(split))
        if M.sidecar_path(tsv).exists():
            log_file(cl, run_id, M.sidecar_path(tsv), str(M.sidecar_path(tracking.cert_tsv_artifact(split))))
        png = Path(tmp) / Path(tracking.cert_plot_artifact(split)).name
        M.plot_certified_accuracy({title or split: M.read_tsv(tsv)}, png, radii=radii)
        log_file(cl, run_id, png, tracking.cert_plot_artifact(split))
    return summary


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {uri}"
