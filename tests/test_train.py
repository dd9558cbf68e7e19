"""`orchestrator.train`: one configuration trained, certified and logged to a real MLflow store; the one-process
path and Ray Train's TorchTrainer with 2 DDP workers (gloo) for real."""
from __future__ import annotations

import mlflow
import pytest
import torch

from orchestrator import tracking, train
from orchestrator.cli_common import run_main
from orchestrator.train_loop import epoch_batches
from trainables import checkpoint as ckpt_io
from trainables import metrics as M


def _check_run(uri: str, run_id: str, tmp_path, name: str, workers: int):
    cl = mlflow.MlflowClient(uri)
    run = cl.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_ROLE] == "train" and run.data.tags[tracking.TAG_TRAINABLE] == name
    assert run.data.params["workers"] == str(workers) and run.data.params["data_source"]
    assert tracking.VAL_ACR in run.data.metrics and "loss" in run.data.metrics
    tsv = cl.download_artifacts(run_id, tracking.cert_tsv_artifact("test"), str(tmp_path))
    assert run.data.metrics["test_acr"] == pytest.approx(M.acr(M.read_tsv(tsv)))
    assert len(M.read_tsv(tsv)) == 16  # the smoke budget's final_examples
    cl.download_artifacts(run_id, tracking.cert_plot_artifact("test"), str(tmp_path))
    trainable, blob = ckpt_io.load(cl.download_artifacts(run_id, tracking.CHECKPOINT_ARTIFACT, str(tmp_path)))
    assert trainable.NAME == name and blob["epoch"] == int(run.data.params["epochs"])
    return run


def test_train_one_process(mlflow_uri, tmp_path, capsys):
    rc = train.main(["gaussian", "--budget", "smoke", "--tracking-uri", mlflow_uri, "--set", "lr=0.02"])
    assert rc == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1]
    run = _check_run(mlflow_uri, run_id, tmp_path, "gaussian", 1)
    assert run.data.params["lr"] == "0.02"


def test_train_torchtrainer_two_workers(ray_local, mlflow_uri, tmp_path, capsys):
    rc = train.main(["gaussian", "--budget", "smoke", "--workers", "2", "--tracking-uri", mlflow_uri,
                     "--storage", str(tmp_path / "ray")])
    assert rc == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1]
    run = _check_run(mlflow_uri, run_id, tmp_path, "gaussian", 2)
    assert run.data.metrics["world_size"] == 2  # reported by rank 0 of the DDP group


def test_ranks_see_disjoint_shards_of_the_same_permutation():
    shards = [torch.cat(list(epoch_batches(10, 4, seed=1, epoch=2, rank=r, world=2))) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(10))
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    again = torch.cat(list(epoch_batches(10, 3, seed=1, epoch=2)))
    assert torch.equal(again, torch.cat(list(epoch_batches(10, 3, seed=1, epoch=2))))


@pytest.mark.parametrize("argv, message", [
    (["nosuch"], "unknown trainable 'nosuch'; registered: glean"),
    (["gaussian", "--set", "lr=-1"], "lr must be > 0"),
    (["gaussian", "--set", "nope=1"], "unknown hyperparameter 'nope'"),
    (["gaussian", "--workers", "0"], "--workers must be >= 1"),
    (["glean", "--dataset", "mnist"], "glean is not defined on dataset 'mnist'"),
])
def test_bad_input(argv, message, tmp_path, capsys):
    rc = run_main(train.main, argv + ["--budget", "smoke", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "m.db").exists()
