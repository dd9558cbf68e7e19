"""A real Ray cluster: `ray start --head` on loopback from the project's environment, a smoke sweep submitted with
`ray job submit --working-dir .`, the job SUCCEEDED, its runs in MLflow; then the head and everything it
started are ended by PID (never `ray stop`, which would stop every Ray on a shared machine)."""
from __future__ import annotations

import os
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


@pytest.mark.timeout(420)
def test_ray_job_submit_smoke_sweep(tmp_path):
    if not (BIN / "ray").exists():
        pytest.fail(f"the ray CLI is not installed next to {sys.executable}")
    port, dash = _free_port(), _free_port()
    # every fixed default port moved to a free one: another Ray on this machine may hold the defaults (the job
    # agent's 52365 above all: without it, submissions fail with "No available agent to submit job")
    agent_ports = ["--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port",
                   str(_free_port()), "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port",
                   str(_free_port()), "--ray-client-server-port", str(_free_port())]
    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's unix sockets live under it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # token auth switches on by itself once ~/.ray/auth_token exists: set the mode for head, CLI and job alike
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
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
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                 "python", "-m", "orchestrator.sweep", "gaussian", "--budget", "smoke", "--trials", "1",
                 "--tracking-uri", uri, "--storage", str(tmp_path / "ray_results")],
                env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0 and "succeeded" in job.stdout.lower(), (job.stdout + job.stderr)[-3000:]
        assert "test ACR" in job.stdout

        cl = mlflow.MlflowClient(uri)
        runs = cl.search_runs([e.experiment_id for e in cl.search_experiments()])
        roles = sorted(r.data.tags.get(tracking.TAG_ROLE) for r in runs)
        assert roles == ["sweep", "trial"] and all(r.info.status == "FINISHED" for r in runs)
    finally:
        head.send_signal(signal.SIGTERM)   # `ray start --block` stops what it started on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_session(head.pid)             # then anything left in its session, by PID
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not session_pids(head.pid)
