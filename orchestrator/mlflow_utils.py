"""Small MLflow helpers used by train and sweep (the names themselves live in orchestrator.tracking).

Everything goes through `mlflow.MlflowClient(uri)` with an explicit absolute tracking URI: Ray workers run in
other working directories, and a relative or implicit URI would silently write to another store.
"""
from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

from orchestrator import tracking

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


#: seconds a tracking server or database gets to answer the start-up probe (issue 15: <= 10 s, never a hang)
PROBE_TIMEOUT_S = 5.0
#: schemes MLflow's tracking stores accept (mlflow.tracking._tracking_service.utils registers these)
KNOWN_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks", "uc",
                 "databricks-uc")
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "http": 80, "https": 443}


def resolve_tracking_uri(uri: str | None = None, *, create: bool = True, probe: bool = True) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///<cwd>/mlflow.db in MLflow 3), made
    absolute: a `sqlite:///relative.db`, `file:relative` or bare path becomes an absolute one.

    probe: check the store up front (check_tracking_uri) so that a wrong URI is one line and exit code 2, never
    a hang. create=False for read-only commands (certify --run-id, compare): the store must already exist.
    The default store comes from orchestrator.defaults.default_tracking_uri (inside a Ray job
    ~/.smoothing-orchestrator/mlflow.db)."""
    from orchestrator import defaults

    chosen = bool(uri or os.environ.get("MLFLOW_TRACKING_URI"))
    uri = uri or defaults.default_tracking_uri()
    if not chosen and create and defaults.in_ray_job():
        defaults.ensure_sqlite_parent(uri)   # the job's stable folder is ours to make; a typed path is not
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        uri = uri if path.startswith("/") or path == ":memory:" else f"sqlite:///{Path(path).resolve()}"
    elif uri.startswith("file:"):
        uri = Path(uri[len("file:"):].removeprefix("//")).resolve().as_uri()
    elif "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    if probe:
        check_tracking_uri(uri, create=create)
    return uri


def redact(text: str) -> str:
    """`text` with credentials removed: the `user:password@` of a URI and the values of token/secret/password/
    key/signature query parameters. Everything the tool prints or logs about a URI goes through this."""
    text = re.sub(r"(?<=://)[^/\s]*@", "***@", str(text))      # up to the last @ of the authority
    return re.sub(r"(?i)([?&;](?:[a-z_-]*(?:token|secret|password|passwd|key|signature|credential)[a-z_-]*)=)"
                  r"[^&;\s]+", r"\1***", text)


def _usage(msg: str) -> Exception:
    from orchestrator.cli_common import UsageError

    return UsageError(msg)


def check_tracking_uri(uri: str, *, create: bool = True, timeout: float | None = None) -> None:
    """Raise UsageError (one line, credentials redacted) unless the tracking store at `uri` is usable.

    sqlite / file: the folder exists (a mistyped folder is never created) and, when `create`, is writable (a
    read-only filesystem makes sqlite retry for minutes); without `create` the store itself must exist.
    http(s): the server answers within `timeout` (any HTTP status counts: it is there). postgresql / mysql /
    mssql: the port accepts a connection within `timeout`. Another scheme: refused (MLflow would fail later,
    after a run may have been created)."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    shown = redact(uri)
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    base = scheme.split("+", 1)[0]
    if base not in KNOWN_SCHEMES:
        raise _usage(f"--tracking-uri {shown}: unsupported scheme {scheme!r}; use sqlite:///PATH/mlflow.db, "
                     "http(s)://HOST:PORT of an MLflow server, or postgresql/mysql://...")
    if base in ("sqlite", "file"):
        path = Path(uri[len("sqlite:///"):]) if base == "sqlite" else Path(urllib.parse.urlparse(uri).path)
        if str(path) == ":memory:":
            return
        _check_local_store(path, shown, create, is_dir=base == "file")
    elif base in ("http", "https"):
        _probe_http(uri, shown, timeout)
    elif base in _DEFAULT_PORTS:
        parsed = urllib.parse.urlparse(uri)
        try:
            port = parsed.port or _DEFAULT_PORTS[base]
        except ValueError:
            raise _usage(f"--tracking-uri {shown}: invalid port") from None
        try:
            with socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=timeout):
                pass
        except OSError as exc:
            raise _usage(f"cannot reach the tracking database at {shown} within {timeout:g} s "
                         f"({exc.strerror or exc}); check --tracking-uri") from None


def _check_local_store(path: Path, shown: str, create: bool, is_dir: bool) -> None:
    folder = path.parent          # the store itself (an sqlite file, a file-store folder) may be created
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and existing != path and not existing.is_dir():
        raise _usage(f"--tracking-uri {shown}: {existing} is a file, not a folder")
    if not create:
        if not path.exists():
            raise _usage(f"no MLflow store at {shown} (this command only reads: it creates none); check "
                         "--tracking-uri or $MLFLOW_TRACKING_URI")
        return
    if not folder.is_dir():
        raise _usage(f"--tracking-uri {shown}: the folder {folder} does not exist (mistyped?); create it first")
    if path.exists() and path.is_dir() != is_dir:
        raise _usage(f"--tracking-uri {shown}: {path} is a {'folder' if path.is_dir() else 'file'}, not "
                     f"{'a file store folder' if is_dir else 'an sqlite file'}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _usage(f"--tracking-uri {shown}: {path if path.exists() else folder} is not writable "
                     "(read-only filesystem or permissions); choose a writable store")


def _probe_http(uri: str, shown: str, timeout: float) -> None:
    parsed = urllib.parse.urlparse(uri)
    netloc = parsed.hostname or ""
    try:
        if parsed.port:
            netloc += f":{parsed.port}"
    except ValueError:
        raise _usage(f"--tracking-uri {shown}: invalid port") from None
    url = urllib.parse.urlunparse((parsed.scheme, netloc, parsed.path.rstrip("/") + "/health", "", "", ""))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return          # the server answered (401/403/404 behind a proxy still means it is there)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _usage(f"the MLflow tracking server at {shown} did not answer ({reason}; time-out {timeout:g} s); "
                     "start it or fix --tracking-uri / $MLFLOW_TRACKING_URI") from None


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
    tags = {k: redact(str(v)) for k, v in tags.items()}
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


def close_running_children(cl, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> None:
    """End every nested run of `parent_run_id` still RUNNING (a sweep stopped by a signal or an error)."""
    for run in trial_runs(cl, experiment_id, parent_run_id).values():
        if run.info.status == "RUNNING":
            close_run(cl, run.info.run_id, status, "the sweep was stopped")


def log_params(cl, run_id: str, params: Mapping[str, Any]) -> None:
    """Log parameters (values stringified, capped at MLflow's length limit). Re-logging an equal value is a
    no-op, so a resumed trial can call this again."""
    from mlflow.entities import Param

    existing = cl.get_run(run_id).data.params
    values = {k: redact(str(v))[:MAX_PARAM_CHARS] for k, v in params.items()}   # never a credential
    todo = [Param(k, v) for k, v in values.items() if existing.get(k) != v]
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

    cl.log_batch(run_id, tags=[RunTag(k, redact(str(v))[:5000]) for k, v in tags.items()])


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
    """The command that opens the MLflow UI on this store, bound to this machine only (the UI has no
    authentication), credentials redacted."""
    return f"mlflow ui --backend-store-uri {redact(uri)} --host 127.0.0.1"
