"""`orchestrator.sweep`: real Ray Tune + Optuna sweeps logging to a real MLflow sqlite store.

- a smoke sweep (1 trial, smoke budget) for every registered trainable, in-process on the session's Ray;
- a crashing trial is recorded FAILED and the sweep goes on;
- (a driver SIGKILLed mid-sweep, then `--resume`: in tests/test_search.py, with the Optuna study's checks);
- bad input: one line on stderr, exit code 2, nothing written.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from orchestrator import sweep, tracking
from orchestrator.cli_common import run_main
from trainables import checkpoint as ckpt_io
from trainables import metrics as M
from trainables.registry import TRAINABLES


ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--budget", "smoke", "--trials", "1"]


def _runs(uri: str) -> list:
    cl = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in cl.search_experiments()]
    return cl.search_runs(ids, max_results=1000) if ids else []


def _by_role(runs, role):
    return [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == role]


@pytest.mark.parametrize("name", list(TRAINABLES))
def test_smoke_sweep_every_trainable(name, ray_local, mlflow_uri, tmp_path, capsys):
    rc = sweep.main([name, *SMOKE, "--tracking-uri", mlflow_uri, "--storage", str(tmp_path / "ray")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test ACR" in out and "validation ACR" in out and f"mlflow ui --backend-store-uri {mlflow_uri}" in out

    runs = _runs(mlflow_uri)
    (parent,) = _by_role(runs, "sweep")
    (trial,) = _by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and trial.info.status == "FINISHED"
    assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert trial.data.tags[tracking.TAG_TRAINABLE] == name and trial.data.tags[tracking.TAG_SELECTED] == "true"
    assert parent.data.params["sampler"] == "tpe" and parent.data.tags[tracking.TAG_GIT_COMMIT]
    assert tracking.VAL_ACR in trial.data.metrics and "loss" in trial.data.metrics

    # the logged test ACR is the one recomputed from the logged TSV; the checkpoint artifact loads
    cl = mlflow.MlflowClient(mlflow_uri)
    tsv = cl.download_artifacts(trial.info.run_id, tracking.cert_tsv_artifact("test"), str(tmp_path))
    assert trial.data.metrics["test_acr"] == pytest.approx(M.acr(M.read_tsv(tsv)))
    assert parent.data.metrics["test_acr"] == trial.data.metrics["test_acr"]
    path = cl.download_artifacts(trial.info.run_id, tracking.CHECKPOINT_ARTIFACT, str(tmp_path))
    trainable, blob = ckpt_io.load(path)
    assert trainable.NAME == name and blob["epoch"] >= 1
    for key, value in blob["hparams"].items():
        # the logged value is the one trained with, a dataset's default included (GLEAN's batch_size)
        assert trial.data.params[key] == str(value), key


def test_two_objectives_selection_and_a_space_choosing_the_trainable(ray_local, mlflow_uri, tmp_path, capsys):
    # mnist has no held-out test domain: train-domain selection (oracle there is an input error: test_selection.py)
    rc = sweep.main(["drf", "--budget", "smoke", "--trials", "2", "--objectives", "acr,clean_acc", "--sampler",
                     "nsga2", "--tracking-uri", mlflow_uri, "--storage", str(tmp_path / "ray")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Pareto front (acr, clean_acc)" in out and "train-domain selection" in out
    runs = _runs(mlflow_uri)
    (parent,) = _by_role(runs, "sweep")
    trials = _by_role(runs, "trial")
    assert parent.data.params["selection"] == "train-domain" and parent.data.params["sampler"] == "nsga2"
    assert {r.data.tags[tracking.TAG_TRAINABLE] for r in trials} <= {"drf-smoothadv", "drf-consistency"}
    assert all(r.data.tags[tracking.TAG_SELECTION] == "train-domain" for r in trials)
    assert all("val_acr" in r.data.metrics and "oracle_acr" not in r.data.metrics for r in trials)
    assert "pareto_front.tsv" in [a.path for a in mlflow.MlflowClient(mlflow_uri).list_artifacts(parent.info.run_id)]
    assert parent.data.params["best.trainable"] == f"drf-{parent.data.params['best.variant']}"


def test_crashing_trial_is_recorded_and_the_sweep_goes_on(ray_local, mlflow_uri, tmp_path, capsys):
    # each value passes its own rule (checked before Ray starts), but mix_step=5 > num_steps=2 is a combination
    # only the trainable checks: those trials fail when they build it
    rc = sweep.main(["smoothmix", "--budget", "smoke", "--trials", "4", "--seed", "3", "--space", "mix_step=5,0",
                     "--set", "num_steps=2", "--set", "sigma=0.25", "--tracking-uri", mlflow_uri,
                     "--max-failures", "1", "--storage", str(tmp_path / "ray")])
    trials = _by_role(_runs(mlflow_uri), "trial")
    assert len(trials) == 4
    assert all(r.info.status in ("FINISHED", "FAILED") for r in trials)
    failed = [r for r in trials if r.info.status == "FAILED"]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert failed and finished, "seed 3 samples both values (Optuna's seeded TPE)"
    assert all("mix_step=5 must be <= num_steps=2" in r.data.tags[tracking.TAG_ERROR] for r in failed), \
        [r.data.tags.get(tracking.TAG_ERROR) for r in failed]
    assert rc == 0 and all(r.data.params["mix_step"] == "0" for r in finished)


# A SIGKILLed driver and `--resume` (every trial once in MLflow, the same Optuna study, a finished sweep not
# recomputed): tests/test_search.py::test_killed_driver_resumes_the_sweep_its_runs_and_its_study.


@pytest.mark.parametrize("argv, message", [
    (["nosuch"], "unknown sweep name 'nosuch'; valid: glean"),
    (["glean", "--space", "lam=1e6:10"], "search range of 'lam' is inverted"),
    (["glean", "--space", "lr=0.01:0.01"], "search range of 'lr' is empty"),
    (["glean", "--space", "sigma="], "search range is empty"),
    (["glean", "--set", "sigma=-1"], "sigma must be > 0"),
    (["glean", "--trials", "0"], "--trials must be >= 1"),
    (["glean", "--dataset", "mnist"], "glean is not defined on dataset 'mnist'"),
    (["glean", "--sampler", "cmaes", "--objectives", "acr,clean_acc"], "cmaes optimises one objective"),
    (["glean", "--resume"], "nothing to resume"),
    (["glean", "--address", "127.0.0.1:9"], "cannot reach a Ray cluster at 127.0.0.1:9"),
    (["gaussian", "--dataset", "cifar10", "--data-root", "/nonexistent/data"], "cifar10"),
    (["glean", "--sampler", "grid", "--space", "lam=10:1000"], "--sampler grid needs values, not ranges: give lam"),
    (["glean", "--sampler", "grid", "--space", "lam=10,100", "--trials", "3"], "runs each of its 2 settings once"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = run_main(sweep.main, argv + ["--budget", "smoke", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


def test_typo_in_a_flag_is_rejected(capsys):
    assert run_main(sweep.main, ["glean", "--trails", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trails" in err[0]         # one line, not argparse's usage block
