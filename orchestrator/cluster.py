"""The one way the commands connect to Ray, the pre-flight they run before any trial, and per-trial resources.

- `connect(address)`: an explicit address (or RAY_ADDRESS) is checked with a short socket time-out (ray.init
  itself retries for minutes); without one, a private local Ray whose dashboard binds 127.0.0.1.
- `preflight(storage, data_paths)`: on a cluster with more than one alive node, a zero-CPU task pinned to every
  other alive node reads a marker the driver wrote to the storage (shared?) and checks the data paths exist
  there. Any failure is a UsageError naming the node: exit 2 before a trial starts.
- `trial_resources(...)`: what a trial asks Ray for, from --cpus/--gpus/--memory-per-trial. Requests go to Ray
  as they are (an autoscaler can add nodes for them); only a request no alive node could ever hold
  (--gpus-per-trial above every node's GPUs) is refused up front.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from orchestrator.cli_common import UsageError, install_signal_handlers

#: seconds the pre-flight waits for the storage and for each node's check
PREFLIGHT_TIMEOUT_S = float(os.environ.get("ORCHESTRATOR_PREFLIGHT_TIMEOUT_S", "60"))
STORAGE_TIMEOUT_S = float(os.environ.get("ORCHESTRATOR_STORAGE_TIMEOUT_S", "20"))


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (UsageError) when `host:port` or `ray://host:port` does not accept connections."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
                         "`ray start --head` or fix --address / RAY_ADDRESS") from None


def connect(address: str | None) -> bool:
    """Connect to `address` (or RAY_ADDRESS), else start a private local Ray (never someone else's cluster by
    accident). Returns True when this call started/connected Ray (and so should shut it down)."""
    import ray

    if address:
        check_reachable(address)  # an explicit address is checked even when Ray already runs in this process
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    check_reachable(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a Ray this tool starts listens on loopback only: nobody else on the network can submit work to it
    local = {"dashboard_host": "127.0.0.1"} if address == "local" else {}
    try:
        ray.init(address=address, configure_logging=True, logging_level=logging.WARNING, **local)
    except ConnectionError as exc:
        raise UsageError(f"cannot connect to Ray at {address}: {exc}") from None
    install_signal_handlers()      # ray.init replaced the SIGTERM handler (C7)
    return True


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def cluster_cpus_gpus() -> tuple[float, float]:
    """CPUs and GPUs of the alive nodes now (a snapshot: a default, never a cap)."""
    nodes = alive_nodes()
    return (sum(float(n["Resources"].get("CPU", 0)) for n in nodes),
            sum(float(n["Resources"].get("GPU", 0)) for n in nodes))


def _node_name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:12]})"


def with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """fn() in a daemon thread; UsageError when it does not return within `timeout` seconds (S3 clients retry
    an unreachable endpoint for minutes)."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # reported below
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise UsageError(f"{what}: no answer within {timeout:g} s")
    if "error" in box:
        exc = box["error"]
        raise UsageError(f"{what}: {' '.join(str(exc).split())[:300] or type(exc).__name__}")
    return box.get("value")


def _check_node(storage_uri: str, marker: str | None, token: str, paths: Sequence[str]) -> str | None:
    """Runs on one node: None when the marker reads back `token` and every path exists, else what is wrong."""
    from orchestrator import storage

    storage_uri = storage.redact(storage_uri) if storage_uri else storage_uri
    for p in paths:
        if not os.path.exists(p):
            return f"data path {p} does not exist on this node; put the data on every node (or shared storage) " \
                   f"and pass --data-root"
    if marker is not None:
        try:
            seen = storage.read_text(marker)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return f"cannot read the storage {storage_uri} ({' '.join(str(exc).split())[:200]})"
        if seen != token:
            return (f"does not see the storage {storage_uri} the driver wrote to; pass shared storage "
                    f"(--storage s3://..., gs://... or a filesystem mounted on every node)")
    return None


def preflight(storage_uri: str | None, data_paths: Sequence[str] = (), timeout: float | None = None) -> None:
    """Check, before any trial, that the storage is reachable (and shared between the alive nodes) and that
    `data_paths` exist on every node. UsageError (exit 2, one line naming the node) otherwise."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator import storage

    timeout = PREFLIGHT_TIMEOUT_S if timeout is None else timeout
    token = uuid.uuid4().hex
    marker = None
    if storage_uri is not None:
        marker = storage.join(storage_uri, f".preflight-{token}")
        with_timeout(lambda: storage.write_text(marker, token), STORAGE_TIMEOUT_S,
                      f"the storage {storage.redact(storage_uri)} is not reachable from the driver")
    try:
        here = ray.get_runtime_context().get_node_id()
        others = [n for n in alive_nodes() if n["NodeID"] != here]
        for p in data_paths:  # the driver's node reads the data too (the final certification)
            if not os.path.exists(p):
                raise UsageError(f"data path {p} does not exist on the driver's node; pass --data-root")
        if not others:
            return
        check = ray.remote(num_cpus=0, max_retries=0)(_check_node)
        refs = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(storage_uri, marker, token, list(data_paths)): n for n in others}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        if pending:
            raise UsageError(f"node {_node_name(refs[pending[0]])} did not answer the pre-flight check within "
                             f"{timeout:g} s")
        for ref in ready:
            try:
                problem = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - e.g. the project is not importable there
                problem = f"the pre-flight task failed ({type(exc).__name__})"
            if problem:
                raise UsageError(f"node {_node_name(refs[ref])}: {problem}")
    finally:
        if marker is not None:
            storage.delete(marker)


def _memory(text: str) -> float:
    """Bytes of '8G', '512M', '1.5e9' (K/M/G/T: powers of 1024)."""
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    factor = units.get(text[-1:], 1)
    try:
        value = float(text[:-1] if text[-1:] in units else text) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes such as 8G or 512M, got {text!r}") from None
    return value


def add_resource_flags(p: argparse.ArgumentParser) -> None:
    """--cpus-per-trial, --gpus-per-trial, --memory-per-trial, --max-failures (sweep and train)."""
    from orchestrator.trainer import DEFAULT_MAX_FAILURES

    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial, or per DDP worker with --workers >= 2 "
                                                        "(default 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (or per DDP worker), fractions allowed "
                                                        "(default: 1 when the cluster has GPUs now, else 0)")
    p.add_argument("--memory-per-trial", type=_memory, help="memory Ray reserves per trial / DDP worker (8G, 512M)")
    p.add_argument("--max-failures", type=int, default=DEFAULT_MAX_FAILURES,
                   help="restarts of a failed trial / DDP worker group from its last checkpoint (default "
                        f"{DEFAULT_MAX_FAILURES})")


def check_resource_flags(args) -> None:
    for flag, value in (("--cpus-per-trial", args.cpus_per_trial), ("--gpus-per-trial", args.gpus_per_trial),
                        ("--memory-per-trial", args.memory_per_trial)):
        if value is not None and not (value >= 0 and value == value and value != float("inf")):
            raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
    if args.cpus_per_trial == 0 and not args.gpus_per_trial:
        raise UsageError("--cpus-per-trial 0 needs --gpus-per-trial > 0 (a trial must hold something)")
    if args.gpus_per_trial and args.gpus_per_trial > 1 and args.gpus_per_trial != int(args.gpus_per_trial):
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: above 1 it must be whole (Ray's rule)")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures must be >= 0, got {args.max_failures}")


def data_paths(splits) -> list[str]:
    """Files a file-backed dataset reads on every node (in-memory splits travel in the object store): the
    first image of each split is enough to catch a data root missing on a node."""
    out = []
    for split in (splits.train, splits.val, splits.test):
        paths = getattr(split, "paths", None)
        if paths:
            out.append(str(paths[0]))
    return out


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for: `trial` for tune.with_resources, and the Train workers' bundle."""

    trial: dict[str, float]
    per_worker: dict[str, float]
    use_gpu: bool
    capacity: int          # trials the cluster can run at once now (the default --concurrency, not a cap)


def trial_resources(workers: int, cpus: float | None, gpus: float | None, memory: float | None) -> TrialResources:
    """Per-trial requests (see the module docstring). `gpus` None: 1 per trial (or per worker) when the cluster
    has GPUs now, else 0; pass --gpus-per-trial explicitly on an autoscaling cluster that starts without GPU nodes."""
    nodes = alive_nodes()
    max_node_gpus = max((float(n["Resources"].get("GPU", 0)) for n in nodes), default=0.0)
    total_cpus, total_gpus = cluster_cpus_gpus()
    if gpus is None:
        gpus = 1.0 if total_gpus >= 1 else 0.0
    if gpus > max_node_gpus:
        raise UsageError(f"--gpus-per-trial {gpus:g} is more than any node has (the most is {max_node_gpus:g}); "
                         "one trial (or one DDP worker) runs on one node")
    cpus = 1.0 if cpus is None else cpus
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **({"memory": memory} if memory else {})}
    if workers == 1:
        trial = {"cpu": cpus, **({"gpu": gpus} if gpus else {}), **({"memory": memory} if memory else {})}
        per = gpus if gpus else cpus
        capacity = int((total_gpus if gpus else total_cpus) // per) if per else len(nodes)
        return TrialResources(trial, {}, bool(gpus), max(capacity, 0))
    # the trial only drives the TorchTrainer; its workers hold the CPUs/GPUs. Like Ray Train's own controller
    # (ray.train.v2 DataParallelTrainer: num_cpus=0) the trial holds no CPU, so W workers fit a node of W CPUs
    # (a CPU share such as 0.1 would make W + 0.1 on such a node: the trial pending forever). {"cpu": 0} alone
    # is rejected by Tune, hence the memory of 1 byte (../shared/notes/ray-2.60-on-2-cpus.md).
    trial = {"cpu": 0, "memory": 1}
    per = (gpus if gpus else cpus) * workers
    capacity = int((total_gpus if gpus else total_cpus) // per) if per else len(nodes)
    return TrialResources(trial, bundle, bool(gpus), max(capacity, 0))
