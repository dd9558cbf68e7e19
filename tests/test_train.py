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


def test_resume_continues_from_the_last_checkpoint_into_the_same_run(mlflow_uri, tmp_path, capsys, monkeypatch):
    """A run that fails after its epoch-1 checkpoint, then `--resume RUN_ID`: training restarts at epoch 2 from
    the checkpoint artifact, in the same run, every epoch logged exactly once."""
    import dataclasses

    from orchestrator import budgets, train_loop

    smoke = budgets.BUDGETS["smoke"]
    monkeypatch.setitem(budgets.BUDGETS, "smoke", dataclasses.replace(smoke, evals=2))   # checkpoints at 1, 2
    real_certify, calls = train_loop.certify_selection, []

    def fail_at_epoch_2(*a, **kw):   # the injected fault, in the second evaluation's main selection set
        if (a[3] if len(a) > 3 else kw.get("which")) is None:
            calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return real_certify(*a, **kw)

    monkeypatch.setattr(train_loop, "certify_selection", fail_at_epoch_2)
    argv = ["--budget", "smoke", "--tracking-uri", mlflow_uri]
    with pytest.raises(RuntimeError, match="injected fault"):
        train.main(["gaussian", "--dataset", "cmnist", "--set", "lr=0.02", *argv])
    cl = mlflow.MlflowClient(mlflow_uri)
    (run,) = cl.search_runs([e.experiment_id for e in cl.search_experiments()])
    assert run.info.status == "FAILED" and [m.step for m in cl.get_metric_history(run.info.run_id, "epoch")] == [1]

    monkeypatch.setattr(train_loop, "certify_selection", real_certify)
    trained = []
    real_steps = train_loop.epoch_steps
    monkeypatch.setattr(train_loop, "epoch_steps", lambda *a, **kw: (trained.append(a[3]), real_steps(*a, **kw))[1])
    capsys.readouterr()
    assert train.main(["--resume", run.info.run_id, "--tracking-uri", mlflow_uri]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == run.info.run_id
    assert trained == [1], "only epoch 2 (index 1) is trained again"
    done = _check_run(mlflow_uri, run.info.run_id, tmp_path, "gaussian", 1)
    assert done.data.params["lr"] == "0.02" and done.data.params["dataset"] == "cmnist"
    for key in ("epoch", "loss"):
        assert sorted(m.step for m in cl.get_metric_history(run.info.run_id, key)) == [1, 2]
    assert len(cl.search_runs([run.info.experiment_id])) == 1


def test_resume_bad_input(mlflow_uri, tmp_path, capsys):
    rc = run_main(train.main, ["--resume", "0123456789abcdef", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no MLflow store" in err
    assert not (tmp_path / "x.db").exists()
