"""Where results go when the user names no place: the ONE source of truth for the default MLflow store, the
default Tune/Train storage and the default output folders of the commands.

Outside a Ray job the defaults are the familiar ones: MLflow's own default store (`./mlflow.db` in the
working directory, or MLFLOW_TRACKING_URI), Tune's `~/ray_results` (or RAY_STORAGE), and output folders
relative to the working directory (`certify-out/`, `compare-out/`).

Inside a Ray job (`ray job submit --working-dir .`) the working directory is Ray's temporary copy of the
upload (`<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*`), which Ray deletes: a default
written there is lost. So inside a job every default goes to a stable folder on the node that runs the job's
driver (the head node unless the job asked for entrypoint resources):

    ~/.smoothing-orchestrator/          ($SMOOTHING_ORCHESTRATOR_HOME to choose another)
        mlflow.db                       the MLflow store (its artifacts beside it in mlruns/)
        ray_results/                    Tune and Ray Train storage
        certify-out/, compare-out/      the commands' output folders

and every command prints these locations when it starts and when it ends (`with_locations`), so the job's
log says where to look. Explicit choices (--tracking-uri, MLFLOW_TRACKING_URI, --storage, RAY_STORAGE, --out)
always win; on a multi-node cluster pass shared ones (a tracking server, s3://...; see deploy/).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import socket
from pathlib import Path
from typing import Callable, Sequence

HOME_ENV = "SMOOTHING_ORCHESTRATOR_HOME"
HOME_DIR_NAME = ".smoothing-orchestrator"
#: set by Ray's JobSupervisor for a job's entrypoint only, {"runtime_env": ..., "metadata": {"job_submission_id":
#: ...}}
#: (ray/dashboard/modules/job/job_supervisor.py, Ray 2.60); RAY_JOB_ID is removed from the entrypoint's env
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
#: the working directory of a job submitted with --working-dir lies under this folder of Ray's session
WORKING_DIR_MARK = "/runtime_resources/working_dir_files/"


def ray_job_id() -> str | None:
    """The submission id of the Ray job this process is the entrypoint of (or a child of); None outside a job.
    "unknown" when only the working directory gives the job away."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw:
        try:
            return str(json.loads(raw).get("metadata", {}).get("job_submission_id") or "unknown")
        except (ValueError, AttributeError):
            return "unknown"
    try:
        cwd = os.getcwd()
    except OSError:   # the working directory was already deleted: that is a job's temporary copy too
        return "unknown"
    return "unknown" if WORKING_DIR_MARK in cwd + "/" else None


def in_ray_job() -> bool:
    return ray_job_id() is not None


def stable_home() -> Path:
    """The folder of a job's default results: $SMOOTHING_ORCHESTRATOR_HOME, else ~/.smoothing-orchestrator."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / HOME_DIR_NAME).expanduser().resolve()


def default_tracking_uri() -> str:
    """The MLflow store when --tracking-uri is not given: MLFLOW_TRACKING_URI; else inside a Ray job the
    sqlite file `<stable_home>/mlflow.db`; else MLflow's own default (sqlite:///mlflow.db in the working
    directory)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if in_ray_job():
        return f"sqlite:///{stable_home() / 'mlflow.db'}"
    import mlflow

    return mlflow.get_tracking_uri()


def default_storage() -> str:
    """Tune / Ray Train storage when --storage is not given: RAY_STORAGE; else inside a Ray job
    `<stable_home>/ray_results`; else ~/ray_results (Ray's own default). A path or URI string."""
    env = os.environ.get("RAY_STORAGE")
    if env:
        return env
    return str(stable_home() / "ray_results" if in_ray_job() else Path.home() / "ray_results")


def default_output_dir(name: str = "certify-out") -> Path:
    """A command's default output folder `name` (certify-out, compare-out): inside a Ray job
    `<stable_home>/<name>`; else `name` relative to the working directory."""
    return stable_home() / name if in_ray_job() else Path(name)


def ensure_sqlite_parent(uri: str) -> None:
    """Create the folder of an sqlite store (sqlite does not create folders; ~/.smoothing-orchestrator may not
    exist yet). Other URIs are left alone."""
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


# --- telling the user --------------------------------------------------------------------------------------
def locations(args: argparse.Namespace, output_dir: str | None = None) -> list[tuple[str, str]]:
    """(label, place) for what a parsed command line writes: its MLflow store, storage and output folder,
    each the flag's value or the default above."""
    from orchestrator import mlflow_utils

    rows = []
    if hasattr(args, "tracking_uri") and getattr(args, "run_id", True) is not None:   # certify: with --run-id
        uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri, probe=False)   # printing only
        rows.append(("MLflow store", mlflow_utils.redact(uri)))
        server = uri.startswith(("http://", "https://"))   # a tracking server is its own UI
        rows.append(("MLflow UI", uri if server else mlflow_utils.ui_command(uri)))
    if hasattr(args, "storage"):
        rows.append(("Ray storage", args.storage or default_storage()))
    if output_dir and hasattr(args, "out"):
        rows.append(("output folder", str(args.out or default_output_dir(output_dir))))
    return rows


def locations_banner(args: argparse.Namespace, output_dir: str | None, when: str) -> str:
    rows = locations(args, output_dir)
    head = (f"Ray job {ray_job_id()} on node {socket.gethostname()}, {when}; its results (not in the job's "
            f"temporary working directory, which Ray deletes):")
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([head] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def with_locations(main: Callable[[Sequence[str] | None], int],
                   build_parser: Callable[[], argparse.ArgumentParser],
                   output_dir: str | None = None) -> Callable[[Sequence[str] | None], int]:
    """`main`, which inside a Ray job also prints where its results go before it starts and again when it ends
    (after an error too): a job's log is what its user reads, and the job's working directory is deleted.
    Outside a job, `main` unchanged. `output_dir`: the command's default output folder name, if it has one."""
    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        args = _quiet_parse(build_parser, argv) if in_ray_job() else None
        if args is None:   # outside a job, or a command line main itself will reject (or --help)
            return main(argv)
        print(locations_banner(args, output_dir, "starting"), flush=True)
        try:
            return main(argv)
        finally:
            print(locations_banner(args, output_dir, "ending"), flush=True)

    return wrapped


def _quiet_parse(build_parser, argv) -> argparse.Namespace | None:
    """The parsed command line, or None where argparse would print something itself (bad input, --help):
    main parses again and reports it once."""
    parser = build_parser()

    def fail(*_args, **_kwargs):
        raise ValueError

    parser.error = fail   # type: ignore[method-assign]
    parser.exit = fail    # type: ignore[method-assign]
    parser.print_help = fail  # type: ignore[method-assign]
    try:
        return parser.parse_args(argv)
    except ValueError:
        return None
