"""C7 signals, in real processes: SIGTERM/SIGINT end a run as KILLED, shut Ray down, print one line and exit
143/130; a second signal exits at once (issue 15). `timeout`, Slurm, Kubernetes and `ray job stop` send SIGTERM.

Each command runs as `python -m ...` in its own session (start_new_session), so that the test can check that
no process of it (Ray's included) outlives it, and can end whatever is left (tests/processes.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator import mlflow_utils
from processes import kill_session, session_pids
from stderr import ours

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-do-not-log"


def start(args: list[str], cwd: Path, **env) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    environment.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {what} within {timeout} s")


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def db_has(db: Path, sql: str) -> bool:
    """Whether `sql` returns a row in the sqlite store `db`, read-only (an MlflowClient here would race the
    command's own creation of the schema)."""
    import sqlite3

    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(sql).fetchone() is not None
    except sqlite3.Error:
        return False


def runs(uri: str) -> list:
    cl = mlflow_utils.client(uri)
    return cl.search_runs([e.experiment_id for e in cl.search_experiments()])


def assert_one_line(err: str, signame: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    mine = [line for line in ours(err) if f"interrupted by {signame}" in line]
    assert len(mine) == 1 and ours(err)[-1] == mine[0], err[-3000:]


def assert_session_ends(sid: int, timeout: float = 20) -> None:
    """Ray shut down cleanly: no process of the command's session is left (Ray's daemons included)."""
    deadline = time.monotonic() + timeout
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not session_pids(sid), [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:100]
                                   for p in session_pids(sid) if Path(f"/proc/{p}").exists()]


def test_second_signal_exits_at_once(tmp_path):
    """While the first signal's clean-up runs (here: a slow one), a second signal ends the process at once."""
    script = textwrap.dedent("""
        import sys, time
        from orchestrator.cli_common import run_main
        def main(argv):
            try:
                print("ready", flush=True)
                time.sleep(60)
            except KeyboardInterrupt:
                print("cleaning up", flush=True)
                time.sleep(60)          # a clean-up that would take long
            return 0
        sys.exit(run_main(main, [], prog="demo"))
    """)
    proc = start(["-c", script], tmp_path)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "cleaning up"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, timeout=10)
        assert code == 143 and time.monotonic() - t0 < 5
        assert "SIGTERM again" in err and "Traceback" not in err
    finally:
        kill_session(proc.pid)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_train_signal_marks_the_run_killed(tmp_path, signum, code):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = start(["-m", "orchestrator.train", "gaussian", "--budget", "quick", "--tracking-uri", uri],
                 tmp_path, AWS_SECRET_ACCESS_KEY=SECRET, MLFLOW_TRACKING_TOKEN=SECRET)
    try:
        wait_for(lambda: db_has(tmp_path / "mlflow.db", "select 1 from params"), proc, 240,
                 "a RUNNING training run")
        time.sleep(1.0)       # inside the training loop
        proc.send_signal(signum)
        rc, out, err = finish(proc)
        assert rc == code, err[-3000:]
        assert_one_line(err, signal.Signals(signum).name)
        [run] = runs(uri)
        assert run.info.status == "KILLED"
        logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
        assert SECRET not in logged + out + err          # no credential from the environment is logged
        assert_session_ends(proc.pid)
    finally:
        kill_session(proc.pid)


def test_certify_sigterm_keeps_shards_and_stops_ray(tmp_path):
    import torch

    from trainables import checkpoint
    from trainables.data import DataInfo
    from trainables.gaussian import Gaussian

    torch.manual_seed(0)
    info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
    checkpoint.save(tmp_path / "model.pt", Gaussian({}, info, epochs=1), epoch=1)
    out = tmp_path / "out"
    proc = start(["-m", "orchestrator.certify", "--checkpoint", "model.pt", "--n0", "10", "--n", "1000",
                  "--max", "400", "--shard-size", "1", "--out", str(out), "--no-progress", "--actors", "1"], tmp_path)
    try:
        wait_for(lambda: any((out / "shards").glob("shard-*.tsv")), proc, 240, "a finished shard")
        proc.send_signal(signal.SIGTERM)
        rc, _, err = finish(proc)
        assert rc == 143, err[-3000:]
        assert_one_line(err, "SIGTERM")
        assert "actor restart will fail" not in err         # Ray's alarming line is gone (model inlined)
        assert not (out / "test.tsv").exists()                         # no partial result
        assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
        assert_session_ends(proc.pid)
    finally:
        kill_session(proc.pid)


@pytest.mark.slow
def test_sweep_sigterm_leaves_no_run_running(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = start(["-m", "orchestrator.sweep", "gaussian", "--budget", "smoke", "--trials", "2",
                  "--tracking-uri", uri, "--storage", str(tmp_path / "ray")], tmp_path)
    try:
        wait_for(lambda: db_has(tmp_path / "mlflow.db", "select 1 from tags where key = 'mlflow.parentRunId'"),
                 proc, 300, "a trial run")
        proc.send_signal(signal.SIGTERM)
        rc, _, err = finish(proc, timeout=120)
        assert rc == 143, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        statuses = {r.info.run_id: r.info.status for r in runs(uri)}
        assert "RUNNING" not in statuses.values(), statuses
        parent = [r for r in runs(uri) if r.data.tags.get("role") == "sweep"]
        assert parent and parent[0].info.status == "KILLED"
        assert_session_ends(proc.pid, timeout=30)
    finally:
        kill_session(proc.pid)


def test_a_signal_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, monkeypatch):
    """Python runs a signal handler between bytecodes of the main thread; if those are a finalizer's (here a
    weakref callback, as in the full-suite failure of the TERM case above), the handler's Interrupted is printed
    as "Exception ignored" and dropped. The training loop must still stop at its next step, KILLED, exit 143.
    Injected: at the 2nd optimiser step a weakref callback sends this process SIGTERM."""
    import weakref

    from orchestrator import train
    from orchestrator.cli_common import run_main
    from trainables.gaussian import Gaussian

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    original, calls, keep = Gaussian.update, [], []

    class Victim:
        pass

    def update(self, x, y, d):
        calls.append(1)
        if len(calls) == 2:
            victim = Victim()
            keep.append(weakref.ref(victim, lambda _ref: os.kill(os.getpid(), signal.SIGTERM)))
            del victim            # the callback runs now, and the handler inside it
        return original(self, x, y, d)

    swallowed = []
    monkeypatch.setattr(Gaussian, "update", update)
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type.__name__))
    rc = run_main(train.main, ["gaussian", "--budget", "smoke", "--set", "batch_size=16", "--tracking-uri", uri])
    assert keep and keep[0]() is None, "the injected finalizer did not run"
    assert swallowed == [], "run_main's hook does not print the swallowed Interrupted (C7: one line)"
    assert rc == 143 and len(calls) == 2, (rc, len(calls))     # stopped at the next step, not at the end
    [run] = runs(uri)
    assert run.info.status == "KILLED"
