"""A real Ray cluster: `ray start --head` on loopback from the project's environment, a smoke sweep submitted with
`ray job submit --working-dir .` and NO --tracking-uri / --storage, the job SUCCEEDED, its runs in the stable
store it printed (~/.smoothing-orchestrator under the job's HOME, orchestrator/defaults.py) and none in Ray's
temporary copy of the working directory; then the head and everything it started are ended by PID (never
`ray stop`, which would stop every Ray on a shared machine)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from orchestrator import tracking

from processes import kill_session, session_pids

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_job_submit_smoke_sweep_results_outlive_the_job(tmp_path):
    if not (BIN / "ray").exists():
        pytest.fail(f"the ray CLI is not installed next to {sys.executable}")
    port, dash = _free_port(), _free_port()
    # every fixed default port moved to a free one: another Ray on this machine may hold the defaults (the job
    # agent's 52365 above all: without it, submissions fail with "No available agent to submit job")
    agent_ports = ["--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port",
                   str(_free_port()), "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port",
                   str(_free_port()), "--ray-client-server-port", str(_free_port())]
    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's unix sockets live under it
    home = (tmp_path / "home").resolve()   # the job's HOME: its stable place is inside this test's tmp
    home.mkdir()
    stable = home / ".smoothing-orchestrator"
    uri = f"sqlite:///{stable / 'mlflow.db'}"
    # token auth switches on by itself once ~/.ray/auth_token exists: set the mode for head, CLI and job alike
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_STORAGE", "SMOOTHING_ORCHESTRATOR_HOME"):
        env.pop(var, None)   # the defaults are under test
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
         "--temp-dir", temp_dir, "--include-dashboard", "true", *agent_ports],
        env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while time.time() < deadline:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        else:
            pytest.fail("the head's job server did not come up within 90 s")

        deadline = time.time() + 60
        while True:  # the job agent can come up seconds after the job API answers
            job = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                 "--runtime-env-json", json.dumps({"env_vars": {"HOME": str(home)}}), "--",
                 "python", "-m", "orchestrator.sweep", "gaussian", "--budget", "smoke", "--trials", "1"],
                env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0 and "succeeded" in job.stdout.lower(), (job.stdout + job.stderr)[-3000:]
        assert "test ACR" in job.stdout

        # the store and storage are printed when the command starts and again when it ends
        printed = re.findall(r"^\s*MLflow store\s+(\S+)\s*$", job.stdout, re.M)
        assert printed == [uri, uri], job.stdout[-3000:]
        assert re.findall(r"^\s*Ray storage\s+(\S+)\s*$", job.stdout, re.M) == [str(stable / "ray_results")] * 2
        start, end = (re.search(rf"^Ray job raysubmit_\w+ on node .*, {when};", job.stdout, re.M)
                      for when in ("starting", "ending"))
        assert start and end and start.start() < job.stdout.index("test ACR") < end.start(), job.stdout[-3000:]

        cl = mlflow.MlflowClient(uri)
        runs = cl.search_runs([e.experiment_id for e in cl.search_experiments()])
        roles = sorted(r.data.tags.get(tracking.TAG_ROLE) for r in runs)
        assert roles == ["sweep", "trial"] and all(r.info.status == "FINISHED" for r in runs)
        assert all(r.info.artifact_uri.startswith(stable.as_uri()) for r in runs)   # artifacts beside the store
        assert [p.name for p in (stable / "ray_results").glob("*/sweep.json")] == ["sweep.json"]

        # Ray's temporary copy of the working directory (still there: Ray keeps it for the session) holds none
        # of the results; before orchestrator/defaults.py it held mlflow.db and mlruns/
        # (one per upload: a submission retried while the tree changed uploads another)
        pkgs = [p for p in Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
        assert any((pkg / "orchestrator" / "sweep.py").exists() for pkg in pkgs), pkgs
        leaked = [p for pkg in pkgs for p in pkg.iterdir()
                  if p.name in ("mlflow.db", "mlruns", "ray_results", "certify-out")]
        assert not leaked, leaked
    finally:
        head.send_signal(signal.SIGTERM)   # `ray start --block` stops what it started on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_session(head.pid)             # then anything left in its session, by PID
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not session_pids(head.pid)
