"""The certification actor pool and `python -m orchestrator.certify`, with a real local Ray and MNIST digits.

Guarantees checked (issue 7): results independent of sharding and of the number of actors; a killed actor is
replaced and its shard redone; a killed driver resumes without recomputing finished shards; bad input gets a
one-line error, exit code 2 and no final TSV; results logged to the training run in MLflow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from orchestrator import certify, tracking
from orchestrator.pool import CertifyInputError, certify_with_pool
from trainables import checkpoint
from trainables.data import load_dataset
from trainables.metrics import read_tsv
from trainables.registry import get_trainable

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(n0=10, n=200, alpha=0.01, batch=100, seed=3)
INDICES = list(range(12))
RAY_TIMEOUT = 180  # seconds without progress before a test fails instead of hanging (loaded 2-core CI)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", download=False)


@pytest.fixture(scope="module")
def ckpt(mnist, tmp_path_factory):
    """A Gaussian-augmentation MLP trained for a few steps on 2,000 digits: varied radii. (An epoch on the whole
    packaged MNIST makes nearly every certified example reach the n = 200 cap, and the radii stop telling runs
    apart: 3 distinct values on the 12 examples, measured.)"""
    torch.manual_seed(0)
    t = get_trainable("gaussian")({"arch": "mlp3", "lr": 0.05, "batch_size": 64}, mnist.info, epochs=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(mnist.train, range(2000)), batch_size=64,
                                         shuffle=True)
    for x, y, d in loader:
        t.update(x, y, d)
    return checkpoint.save(tmp_path_factory.mktemp("ckpt") / "model.pt", t, epoch=1)


def in_process(ckpt, mnist, settings, indices=INDICES) -> pd.DataFrame:
    """certify_many called in-process, without Ray: what every pool run must reproduce."""
    trainable, _ = checkpoint.load(ckpt)
    indices = list(indices)
    xs = torch.stack([mnist.test[i][0] for i in indices])
    labels = [int(mnist.test[i][1]) for i in indices]
    rows = trainable.certifier().certify_many(xs, labels, indices, n0=settings["n0"], n=settings["n"],
                                               alpha=settings["alpha"], batch_size=settings["batch"],
                                               seed=settings["seed"])
    return pd.DataFrame([r.__dict__ for r in rows]).sort_values("idx").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(ckpt, mnist):
    return in_process(ckpt, mnist, SETTINGS)


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in a.columns if c != "time"]
    assert list(a["idx"]) == sorted(a["idx"])
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True),
                                  check_dtype=False)


@pytest.fixture(scope="module")
def one_actor_out(ray_local, ckpt, mnist, tmp_path_factory):
    """A finished 1-actor certification of INDICES (its directory is reused by the bad-input test)."""
    out = tmp_path_factory.mktemp("one") / "out"
    df = certify_with_pool(ckpt, mnist.test, INDICES, out_dir=out, actors=1, shard_size=5, progress=False,
                           timeout_s=RAY_TIMEOUT, **SETTINGS)
    return out, df


def test_one_and_three_actors_give_the_same_tsv(ray_local, ckpt, mnist, reference, one_actor_out, tmp_path):
    one = one_actor_out[1]
    three = certify_with_pool(ckpt, mnist.test, INDICES, out_dir=tmp_path / "three", actors=3, shard_size=2,
                              progress=False, timeout_s=RAY_TIMEOUT, **SETTINGS)
    same_rows(one, reference)
    same_rows(three, reference)
    # the radii are not trivial, so the comparison means something
    assert one["radius"].nunique() > 3 and (one["correct"] == 1).any()
    # the final TSV on disk is the returned table, in Cohen's column order
    on_disk = read_tsv(tmp_path / "three" / "test.tsv")
    assert list(on_disk.columns[:6]) == ["idx", "label", "predict", "radius", "correct", "time"]
    same_rows(on_disk, reference)
    assert json.loads((tmp_path / "three" / "manifest.json").read_text())["complete"] is True


def test_a_small_certification_runs_in_the_driver_with_the_pools_rows(ray_local, ckpt, mnist, reference,
                                                                     one_actor_out, tmp_path, monkeypatch):
    """Below LOCAL_SAMPLES noise samples and without an actor count, the driver certifies in its own process
    (no actor is started: the class the pool would start is made to fail) and writes the same shards, manifest
    and TSV as the pool, with the same rows; a resume of that directory with actors reuses every shard."""
    from orchestrator import pool

    assert len(INDICES) * (SETTINGS["n0"] + SETTINGS["n"]) <= pool.LOCAL_SAMPLES

    def no_pool(*args, **kwargs):
        raise AssertionError("a small certification started actors")

    monkeypatch.setattr(pool, "_run_pool", no_pool)
    local = certify_with_pool(ckpt, mnist.test, INDICES, out_dir=tmp_path / "local", shard_size=5, progress=False,
                              timeout_s=RAY_TIMEOUT, **SETTINGS)
    same_rows(local, reference)
    same_rows(local, one_actor_out[1])
    monkeypatch.undo()
    again = certify_with_pool(ckpt, mnist.test, INDICES, out_dir=tmp_path / "local", shard_size=5, actors=1,
                              progress=False, timeout_s=RAY_TIMEOUT, **SETTINGS)
    assert again.attrs["shards_reused"] == 3 and again.attrs["shards_computed"] == 0


def test_killed_actor_is_replaced_and_its_shard_redone(ray_local, ckpt, mnist, tmp_path):
    pids: dict[int, int] = {}            # actor index -> pid seen in its last result
    killed: dict[str, int] = {}
    redone: list[int] = []               # pid that computed the killed actor's shard

    def kill_busy_actor(event):
        pids[event.actor] = event.pid
        if killed and event.shard == killed["shard"]:
            redone.append(event.pid)
        candidates = [a for a in event.busy if a in pids]
        if not killed and candidates:    # kill an actor in the middle of a shard
            victim = candidates[0]
            killed.update(actor=victim, pid=pids[victim], shard=event.busy[victim])
            ray_local.kill(event.actors[victim], no_restart=False)

    # shards of ~0.1 s (n=5,000), so that the victim is surely still computing when the kill lands
    settings = {**SETTINGS, "n": 5000, "batch": 1000}
    df = certify_with_pool(ckpt, mnist.test, INDICES, out_dir=tmp_path / "out", actors=2, shard_size=1,
                           progress=False, on_shard=kill_busy_actor, timeout_s=RAY_TIMEOUT, **settings)
    same_rows(df, in_process(ckpt, mnist, settings))
    assert df.attrs["shards_computed"] == len(INDICES)
    assert killed, "no actor was busy when a shard finished"
    # the killed actor's shard was finished by a new process: the restarted actor
    assert redone and redone[0] != killed["pid"]


def test_killed_driver_resumes_without_recomputing(ray_local, ckpt, mnist, tmp_path, capsys):
    # more noise samples than elsewhere, so that the driver is still running when it is killed
    settings = {**SETTINGS, "n": 5000, "batch": 1000}
    examples = 6
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--max", str(examples), "--shard-size", "1", "--actors", "1",
            "--out", str(out), "--no-progress", *[a for k, v in settings.items() for a in (f"--{k}", str(v))]]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.certify", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shards = out / "shards"
    deadline = time.monotonic() + RAY_TIMEOUT
    try:
        while len(list(shards.glob("shard-*.tsv"))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the driver wrote no shards in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.tsv")}
    assert 2 <= len(before) < examples
    assert not (out / "test.tsv").exists()          # nothing presented as complete
    assert json.loads((out / "manifest.json").read_text())["complete"] is False

    assert certify.main(["--resume", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"computed {examples - len(before)} shards, reused {len(before)}" in printed
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.tsv") if p.name in before} == before
    same_rows(read_tsv(out / "test.tsv"), in_process(ckpt, mnist, settings, range(examples)))


def _exit2(argv, capsys, out: Path | None = None) -> str:
    assert certify.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("certify: error:")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err   # one line, the last thing printed
    err = lines[0]
    if out is not None:
        assert not (out / "test.tsv").exists()
    return err


def test_bad_input_exits_2_with_one_line(ray_local, ckpt, mnist, one_actor_out, tmp_path, capsys, mlflow_uri):
    out = tmp_path / "out"
    base = ["--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]
    assert "must be >= n0" in _exit2([*base, "--n0", "100", "--n", "50"], capsys, out)
    assert "too small for alpha" in _exit2([*base, "--n0", "5", "--n", "5"], capsys, out)
    assert "no MLflow store" in _exit2(["--run-id", "0123abcd", "--tracking-uri", mlflow_uri], capsys)
    assert not Path(mlflow_uri.removeprefix("sqlite:///")).exists()     # certify only reads: creates no store
    import mlflow
    mlflow.MlflowClient(mlflow_uri).search_experiments()                  # now the store exists
    assert "unknown MLflow run id" in _exit2(["--run-id", "0123abcd", "--tracking-uri", mlflow_uri,
                                              "--out", str(out)], capsys, out)

    # a checkpoint that names another architecture than the weights it holds
    blob = checkpoint.read(ckpt)
    blob["hparams"]["arch"] = "lenet"
    other_arch = tmp_path / "other_arch.pt"
    torch.save(blob, other_arch)
    assert "do not fit" in _exit2(["--checkpoint", str(other_arch), "--out", str(out)], capsys, out)

    # an output directory holding another model's shards, or this model's with other settings
    done = one_actor_out[0]
    trainable, _ = checkpoint.load(ckpt)
    with torch.no_grad():
        next(trainable.net.parameters()).add_(0.01)
    other = checkpoint.save(tmp_path / "other.pt", trainable, epoch=1)
    err = _exit2(["--checkpoint", str(other), "--out", str(done), "--max", str(len(INDICES)),
                  "--shard-size", "5", *[a for k, v in SETTINGS.items() for a in (f"--{k}", str(v))]], capsys)
    assert "another model" in err
    with pytest.raises(CertifyInputError, match="other settings"):
        certify_with_pool(ckpt, mnist.test, INDICES, out_dir=done, progress=False, shard_size=5,
                          **{**SETTINGS, "n": 300})
    assert not out.exists()


def test_certify_run_id_logs_to_the_training_run(ray_local, ckpt, mlflow_uri, tmp_path, capsys):
    import mlflow

    from orchestrator import mlflow_utils

    mlflow.set_tracking_uri(mlflow_uri)
    # artifacts beside the test's store (a bare set_experiment would put them in ./mlruns of the checkout)
    mlflow.set_experiment(experiment_id=mlflow_utils.ensure_experiment(mlflow.MlflowClient(mlflow_uri),
                                                                       "certify-test", mlflow_uri))
    with mlflow.start_run(tags={tracking.TAG_ROLE: "train", tracking.TAG_TRAINABLE: "gaussian"}) as run:
        mlflow.log_artifact(str(ckpt), artifact_path=str(Path(tracking.CHECKPOINT_ARTIFACT).parent))
    run_id = run.info.run_id
    argv = ["--run-id", run_id, "--tracking-uri", mlflow_uri, "--max", "6", "--n0", "10", "--n", "200",
            "--alpha", "0.01", "--batch", "100", "--out", str(tmp_path / "out"), "--no-progress"]
    assert certify.main(argv) == 0
    logged = mlflow.MlflowClient(mlflow_uri).get_run(run_id)
    assert {"test_acr", "test_abstain_rate"} <= set(logged.data.metrics)
    artifacts = {f.path for f in mlflow.MlflowClient(mlflow_uri).list_artifacts(run_id, tracking.CERT_DIR)}
    assert {tracking.cert_tsv_artifact("test"), tracking.cert_plot_artifact("test")} <= artifacts
    local = mlflow.MlflowClient(mlflow_uri).download_artifacts(run_id, tracking.cert_tsv_artifact("test"),
                                                               str(tmp_path / "dl"))
    assert len(read_tsv(local)) == 6


def test_glean_latent_certification_runs_through_the_pool(ray_local, tmp_path):
    """GLEAN's certifier (latent smoothing, rows with det_radius) goes through the pool unchanged."""
    cmnist = load_dataset("cmnist", download=False)
    torch.manual_seed(0)
    glean = get_trainable("glean")({"hidden": 64}, cmnist.info, epochs=2)
    spread = torch.linspace(0, len(cmnist.train) - 1, 512).long().tolist()   # both training environments
    for _ in range(2):
        glean.update(*(torch.stack(t) if isinstance(t[0], torch.Tensor) else torch.tensor(t)
                       for t in zip(*(cmnist.train[i] for i in spread))))
    indices = [0, 3, 5, 8]
    settings = dict(n0=20, n=500, alpha=0.01, batch=100, seed=1)
    df = certify_with_pool(glean, cmnist.test, indices, out_dir=tmp_path / "glean", actors=2, shard_size=2,
                           progress=False, timeout_s=RAY_TIMEOUT, **settings)
    xs = torch.stack([cmnist.test[i][0] for i in indices])
    rows = glean.certifier().certify_many(xs, [int(cmnist.test[i][1]) for i in indices], indices,
                                          n0=20, n=500, alpha=0.01, batch_size=100, seed=1)
    same_rows(df, pd.DataFrame([r.__dict__ for r in rows]))
    assert "det_radius" in read_tsv(tmp_path / "glean" / "test.tsv").columns
