"""Test helper: a two-node Ray cluster on one machine, as a second machine would see it.

The head (`ray start --head --num-cpus 0`: every trial, task and actor must run elsewhere) and one worker node
with 2 CPUs started in a private mount namespace (`unshare -m --propagation private`) where tmpfs mounts hide
what a second machine would not share: the driver's working directory (`TwoNodes.driver_dir`, where the
default ./mlflow.db lands), `TwoNodes.hidden` (a local "storage" the worker must not see), ~/ray_results,
~/.cache and ~/.ray. The interpreter and the project stay visible (a real worker runs the same image).
Every fixed default port is moved to a free one (others run Ray on this machine); RAY_AUTH_MODE=disabled
everywhere (the worker's private ~/.ray holds no token). Teardown ends exactly the two process sessions this
fixture started, by PID (never `ray stop`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from processes import describe, kill_session, session_pids, stop_ray_node
from s3 import free_port

BIN = Path(sys.executable).parent


def _ports(*flags: str) -> list[str]:
    out: list[str] = []
    for flag in flags:
        out += [flag, str(free_port())]
    return out


@dataclass
class TwoNodes:
    address: str
    driver_dir: Path      # the driver's working directory: hidden from the worker node
    hidden: Path          # a folder the driver sees and the worker does not
    env: dict
    worker_sid: int       # the worker node's process session: every process it starts (trials, actors) is in it

    def run(self, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """`python -m <args>` as a driver of this cluster (from driver_dir)."""
        return subprocess.run([sys.executable, "-m", *args], cwd=cwd or self.driver_dir, env=self.env,
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)


def _unshare_works() -> str | None:
    if shutil.which("unshare") is None:
        return "`unshare` is not installed: the worker node cannot get a private mount namespace"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare -m` is not permitted here ({probe.stderr.strip()[:200]}); CI runs as root"
    return None


class _NodeFailed(Exception):
    pass


def _wait_for_nodes(address: str, env: dict, n: int, logs: Path, alive: subprocess.Popen,
                    timeout: float = 180) -> None:
    """Until `n` nodes are alive; _NodeFailed when `alive` (the node's `ray start`) exits or time runs out."""
    code = ("import ray, time, sys\n"
            f"ray.init(address={address!r}, log_to_driver=False)\n"
            f"deadline = time.time() + 60\n"
            f"while sum(1 for x in ray.nodes() if x['Alive']) < {n}:\n"
            "    if time.time() > deadline: sys.exit(1)\n"
            "    time.sleep(0.5)\n")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if alive.poll() is not None:
            raise _NodeFailed()
        try:
            probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   timeout=120)
            if probe.returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)
    raise _NodeFailed()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    why = _unshare_works()
    if why:
        pytest.skip(why)
    if not (BIN / "ray").exists():
        pytest.fail(f"the ray CLI is not installed next to {sys.executable}")
    base = tmp_path_factory.mktemp("two-nodes")
    driver_dir, hidden = base / "driver", base / "hidden"
    driver_dir.mkdir()
    hidden.mkdir()
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="r2n", dir="/tmp")   # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_STORAGE"):
        env.pop(k, None)
    node_ports = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                  "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
    head_cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                str(port), "--num-cpus", "0", "--num-gpus", "0", "--temp-dir", temp_dir,
                "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
                *_ports("--dashboard-port", "--ray-client-server-port", *node_ports)]
    home = Path.home()
    hide = [driver_dir, hidden, home / "ray_results", home / ".cache", home / ".ray"]
    mounts = " && ".join(f"mkdir -p {p} && mount -t tmpfs tmpfs {p}" for p in hide)
    worker_cmd = " ".join([str(BIN / "ray"), "start", "--block", "--address", f"127.0.0.1:{port}",
                           "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
                           *_ports(*node_ports)])
    procs: list[subprocess.Popen] = []
    try:
        # Ray gives a raylet 30 s to register (hard-coded): on a loaded machine a node can miss that, so each node
        # gets three starts
        def start(cmd, log, n, **kw):
            for attempt in range(3):
                proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=open(base / log, "w"),
                                        stderr=subprocess.STDOUT, **kw)
                procs.append(proc)
                try:
                    _wait_for_nodes(f"127.0.0.1:{port}", env, n, base, alive=proc)
                    return
                except _NodeFailed:
                    kill_session(proc.pid)
            pytest.fail("the two-node cluster did not come up: " + " | ".join(
                f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(base.glob("*.log"))))

        start(head_cmd, "head.log", 1, cwd=driver_dir)
        start(["unshare", "-m", "--propagation", "private", "bash", "-c",
               f"{mounts} && cd / && exec {worker_cmd}"], "worker.log", 2)
        yield TwoNodes(f"127.0.0.1:{port}", driver_dir, hidden, env, worker_sid=procs[-1].pid)
    finally:
        for proc in reversed(procs):
            stop_ray_node(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
    for proc in procs:
        assert not session_pids(proc.pid), describe(session_pids(proc.pid))
