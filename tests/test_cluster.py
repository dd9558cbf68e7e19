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

from processes import kill_session, session_pids, stop_ray_node
from stderr import ours

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
        stop_ray_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not session_pids(head.pid)


# --- storage URIs (a real S3-compatible server), the pre-flight and per-trial resources ---------------------------
from s3 import s3_server  # noqa: E402,F401  (fixture)

from orchestrator import cluster as cluster_mod  # noqa: E402
from orchestrator import storage as st  # noqa: E402
from orchestrator import sweep  # noqa: E402
from orchestrator.cli_common import UsageError, run_main  # noqa: E402


def test_storage_uris_local_and_s3(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert st.normalize("rel/x") == str(tmp_path / "rel" / "x")        # a local path is made absolute
    uri = s3_server.uri("unit")
    assert st.normalize(uri) == uri                                     # a URI is never Path.resolve()d
    assert st.join(uri, "a", "b.json").split("?")[0].endswith("/unit/a/b.json")
    for base in (str(tmp_path / "store"), (tmp_path / "store2").as_uri(), uri):
        assert st.read_text(st.join(base, "s-1", "sweep.json")) is None
        st.write_text(st.join(base, "s-1", "sweep.json"), '{"a": 1}')
        st.write_text(st.join(base, "s-2", "sweep.json"), '{"a": 2}')
        assert st.read_text(st.join(base, "s-2", "sweep.json")) == '{"a": 2}'
        assert st.list_dirs(base, "s-") == ["s-1", "s-2"] and st.list_dirs(base, "x") == []
    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "sub" / "f.tsv").write_text("idx\n")
    st.upload_dir(tmp_path / "up", st.join(uri, "final"))
    assert "unit/final/sub/f.tsv" in s3_server.keys("unit/")
    assert not (tmp_path / "s3:").exists()


def test_unreachable_storage_exits_2_before_anything_is_written(ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster_mod, "STORAGE_TIMEOUT_S", 15.0)
    dead = f"s3://k:s@bucket/x?endpoint_override=127.0.0.1:{_free_port()}&scheme=http&region=us-east-1"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = run_main(sweep.main, ["gaussian", "--budget", "smoke", "--trials", "1", "--tracking-uri", uri,
                               "--storage", dead])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(ours(err)) == 1 and "is not reachable from the driver" in err, err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-trial", "1"], "more than any node has"),
    (["--gpus-per-trial", "1.5"], "above 1 it must be whole"),
    (["--cpus-per-trial", "-1"], "--cpus-per-trial must be a finite number >= 0"),
    (["--max-failures", "-1"], "--max-failures must be >= 0"),
    (["--storage", "nosuchscheme://x/y"], "--storage 'nosuchscheme://x/y'"),
])
def test_bad_resources_exit_2(ray_local, argv, message, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = run_main(sweep.main, ["gaussian", "--budget", "smoke", "--trials", "1", "--tracking-uri", uri,
                               "--storage", str(tmp_path / "ray"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(ours(err)) == 1 and message in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


def test_trial_resources_are_requests_not_a_snapshot_cap(ray_local):
    one = cluster_mod.trial_resources(1, 0.5, None, 2 ** 30)
    assert one.trial == {"cpu": 0.5, "memory": 2 ** 30} and not one.use_gpu and one.capacity == 4
    ddp = cluster_mod.trial_resources(2, None, None, None)
    # one machine: the documented {"cpu": 0} trick (the trial only drives the trainer's 2 workers)
    assert ddp.trial == {"cpu": 0, "memory": 1} and ddp.per_worker == {"CPU": 1.0} and ddp.capacity == 1
    with pytest.raises(UsageError, match="more than any node has"):
        cluster_mod.trial_resources(1, 1, 0.5, None)


def test_sweep_on_s3_storage_logs_from_the_driver_only(ray_local, s3_server, tmp_path, capsys):
    """Storage as a URI end to end: Tune's experiment, checkpoints, sweep.json and the final certification in
    the bucket, nothing under a local `s3:` folder; every epoch of the trial in MLflow once."""
    storage = s3_server.uri("sweep")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["gaussian", "--budget", "smoke", "--trials", "1", "--dataset", "cmnist", "--tracking-uri", uri,
            "--storage", storage]
    assert sweep.main(argv) == 0
    keys = s3_server.keys("sweep/")
    assert any(k.endswith("/sweep.json") for k in keys)
    assert any("/final_certification/" in k and k.endswith("test.tsv") for k in keys)
    assert any("/checkpoint_" in k and k.endswith("model.pt") for k in keys)
    assert not list(Path.cwd().glob("s3:*")) and not list(tmp_path.glob("s3:*"))
    cl = mlflow.MlflowClient(uri)
    (trial,) = [r for r in cl.search_runs([e.experiment_id for e in cl.search_experiments()])
                if r.data.tags.get(tracking.TAG_ROLE) == "trial"]
    epochs = [m.step for m in cl.get_metric_history(trial.info.run_id, "loss")]
    assert sorted(epochs) == list(range(1, int(trial.data.params["epochs"]) + 1))    # every epoch, once
    arts = {a.path for a in cl.list_artifacts(trial.info.run_id, "certification")}
    assert tracking.cert_tsv_artifact("val") in arts and tracking.cert_tsv_artifact("test") in arts
    capsys.readouterr()
    assert sweep.main(argv + ["--resume"]) == 0 and "already complete" in capsys.readouterr().out


# --- a real two-node cluster (tests/cluster.py): the head has no CPU, the worker cannot see the driver's disk ---
from cluster import two_nodes  # noqa: E402,F401  (fixture)


def _store_runs(uri: str) -> list:
    cl = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in cl.search_experiments()]
    return cl.search_runs(ids, max_results=1000) if ids else []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_default_sweep_with_shared_storage(two_nodes, s3_server):
    """The default `orchestrator.sweep glean --budget smoke` (default ./mlflow.db in the driver's directory,
    which the worker node cannot see) with shared S3 storage: every trial ran on the worker node (the head has
    no CPU), every run is in the driver's store with every epoch once, all FINISHED."""
    done = two_nodes.run("orchestrator.sweep", "glean", "--budget", "smoke", "--address", two_nodes.address,
                         "--storage", s3_server.uri("two-nodes"), timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "test ACR" in done.stdout
    uri = f"sqlite:///{two_nodes.driver_dir / 'mlflow.db'}"
    runs = _store_runs(uri)
    trials = [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in runs)
    cl = mlflow.MlflowClient(uri)
    for r in trials:
        steps = [m.step for m in cl.get_metric_history(r.info.run_id, "epoch")]
        assert len(steps) == len(set(steps)) >= 1
    assert not (two_nodes.driver_dir / "mlruns").exists() or list((two_nodes.driver_dir / "mlruns").iterdir())


def _trial_processes(sid: int) -> list[int]:
    """The Tune trial processes (function trainables run in `ray::ImplicitFunc` actors) of process session `sid`."""
    found = []
    for pid in session_pids(sid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::ImplicitFunc"):
            found.append(pid)
    return found


#: the driver of the trial-kill test: the smoke budget with 4 epochs on 4,000 MNIST images (a few seconds per epoch
#: on one core, so the kill lands between epochs; smoke's 1 epoch on 256 images is over before it can be killed),
#: registered in the driver process only (trials receive the Budget object itself, pickled with the sweep's setup)
KILL_TEST_DRIVER = """
import dataclasses, sys
from orchestrator import budgets, sweep
from orchestrator.cli_common import run_main
budgets.BUDGETS["kill-test"] = dataclasses.replace(budgets.BUDGETS["smoke"], name="kill-test",
                                                   epochs={"mnist": 4}, max_train=4000)
sys.exit(run_main(sweep.main, sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_trial_process_killed_mid_run_restarts_from_its_checkpoint(two_nodes, s3_server, tmp_path):
    """Issue 11, fault tolerance: the trial's process on the worker node is SIGKILLed after its first epoch was
    reported (with its checkpoint); Tune restarts the trial (max_failures >= 2) from that checkpoint, the sweep
    completes, and the trial's MLflow run, written by the driver only, holds every epoch exactly once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-c", KILL_TEST_DRIVER, "gaussian", "--budget", "kill-test", "--trials", "1",
            "--address", two_nodes.address, "--storage", s3_server.uri("trial-kill"), "--tracking-uri", uri]
    log = tmp_path / "driver.log"
    proc = subprocess.Popen(args, cwd=two_nodes.driver_dir, env=two_nodes.env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed is None:
            assert proc.poll() is None, "the sweep ended before its trial could be killed: " + log.read_text()[-3000:]
            # the driver prints its MLflow line once it has created the store: reading earlier races its migrations
            trials = [r for r in _store_runs(uri) if r.data.tags.get(tracking.TAG_ROLE) == "trial"] \
                if "MLflow: experiment" in log.read_text() else []
            if trials and trials[0].data.metrics.get(tracking.EPOCH, 0) >= 1:
                victims = _trial_processes(two_nodes.worker_sid)
                assert len(victims) == 1, f"expected one trial process on the worker node, found {victims}"
                os.kill(victims[0], signal.SIGKILL)
                killed = victims[0]
                epoch_at_kill = trials[0].data.metrics[tracking.EPOCH]
            time.sleep(0.25)
        assert killed is not None, "no epoch was reported within 300 s: " + log.read_text()[-3000:]
        rc = proc.wait(timeout=400)
    finally:
        kill_session(proc.pid)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    assert epoch_at_kill < 4, "the kill came after the last epoch: nothing was tested"
    assert "test ACR" in out
    runs = _store_runs(uri)
    [trial] = [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "trial"]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    epochs = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(trial.info.run_id, tracking.EPOCH)]
    assert sorted(epochs) == [1, 2, 3, 4], f"every epoch exactly once, got {epochs}"
    assert trial.data.tags.get("restarts") == "1", f"Tune restarted the trial once: {trial.data.tags}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_sweep_with_two_ddp_workers_per_trial(two_nodes, s3_server, tmp_path):
    """`--workers 2` inside a sweep on the cluster: the trial drives a TorchTrainer whose 2 DDP workers fill the
    worker node's 2 CPUs (the trial holds none, like Ray Train's own controller: with a CPU share it would wait
    forever for 2.1 CPUs on a 2-CPU node); every epoch reaches the driver's store once, reported by 2 ranks."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = two_nodes.run("orchestrator.sweep", "gaussian", "--budget", "smoke", "--trials", "1", "--workers", "2",
                         "--address", two_nodes.address, "--storage", s3_server.uri("two-workers"),
                         "--tracking-uri", uri, timeout=540)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    runs = _store_runs(uri)
    [trial] = [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert trial.data.params["workers"] == "2" and trial.data.metrics["world_size"] == 2
    epochs = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(trial.info.run_id, tracking.EPOCH)]
    assert len(epochs) == len(set(epochs)) >= 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_storage_not_shared_exits_2_and_starts_nothing(two_nodes):
    local = two_nodes.hidden / "ray_results"
    store = two_nodes.driver_dir / "mlflow.db"     # the module's earlier tests may have made it: count its runs

    def runs() -> int:
        if not store.exists():
            return 0
        cl = mlflow.MlflowClient(f"sqlite:///{store}")
        return len(cl.search_runs([e.experiment_id for e in cl.search_experiments()]))
    before = runs()
    done = two_nodes.run("orchestrator.sweep", "gaussian", "--budget", "smoke", "--trials", "1", "--address",
                         two_nodes.address, "--storage", str(local), timeout=180)
    err = ours(done.stderr)
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error: node ") and "pass shared storage" in err[0], err
    assert runs() == before, "no MLflow run was started"
    assert not [p for p in local.rglob("*") if p.is_file()], "nothing is left in the storage"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_data_root_missing_on_a_node_exits_2(two_nodes):
    """File-backed datasets read their images on every node: the pre-flight checks them there."""
    image = two_nodes.hidden / "data" / "img_000001.jpg"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"\xff\xd8")
    code = ("import sys, ray\nfrom orchestrator import cluster\nfrom orchestrator.cli_common import UsageError\n"
            f"ray.init(address={two_nodes.address!r}, log_to_driver=False)\n"
            f"try:\n    cluster.preflight(None, [{str(image)!r}])\nexcept UsageError as e:\n"
            "    print(e); sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=two_nodes.driver_dir, env=two_nodes.env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout.startswith("node ") and f"data path {image} does not exist" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_certify_two_actors_matches_one_local_actor(two_nodes, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**two_nodes.env}
    trained = subprocess.run([sys.executable, "-m", "orchestrator.train", "gaussian", "--budget", "smoke",
                              "--tracking-uri", uri], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_id = trained.stdout.strip().splitlines()[-1]
    ckpt = mlflow.MlflowClient(uri).download_artifacts(run_id, tracking.CHECKPOINT_ARTIFACT, str(tmp_path))
    common = ["orchestrator.certify", "--checkpoint", ckpt, "--n0", "8", "--n", "64", "--max", "12",
              "--shard-size", "3", "--no-progress"]
    on_cluster = two_nodes.run(*common, "--actors", "2", "--address", two_nodes.address, "--out",
                               str(tmp_path / "cluster"), timeout=300)
    assert on_cluster.returncode == 0, on_cluster.stderr[-3000:]
    local_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    alone = subprocess.run([sys.executable, "-m", *common, "--actors", "1", "--out", str(tmp_path / "local")],
                           cwd=tmp_path, env=local_env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    a = (tmp_path / "cluster" / "test.tsv").read_text().splitlines()
    b = (tmp_path / "local" / "test.tsv").read_text().splitlines()
    def rows(lines):   # every column but the wall-clock `time` (the last one)
        return [line.rsplit("\t", 1)[0] for line in lines if not line.startswith("#")]
    strip = rows(a), rows(b)
    assert strip[0] == strip[1] and len(strip[0]) == 13
