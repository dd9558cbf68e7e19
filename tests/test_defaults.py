"""orchestrator/defaults.py: outside a Ray job the familiar defaults; inside one (as Ray's job supervisor marks
its entrypoint) every default under ~/.smoothing-orchestrator, explicit choices winning, and the places printed
when a command starts and ends. The end-to-end proof with a real `ray job submit` is tests/test_cluster.py;
here a real certification run in a job's environment writes its default output to the stable place."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import torch

from orchestrator import certify, defaults, mlflow_utils, sweep

JOB_ENV = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_test123"}})
JOB_VARS = (defaults.JOB_CONFIG_ENV, defaults.HOME_ENV, "MLFLOW_TRACKING_URI", "RAY_STORAGE")


@pytest.fixture
def no_job(monkeypatch, tmp_path):
    """Outside a job, in an empty working directory `tmp_path/work`."""
    from mlflow.tracking._tracking_service import utils

    for var in JOB_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(utils, "_tracking_uri", None)   # an earlier in-process mlflow.set_tracking_uri (compare)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


@pytest.fixture
def in_job(no_job, monkeypatch, tmp_path):
    """This process as a job's entrypoint: Ray's marker variable set, HOME a temporary folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv(defaults.JOB_CONFIG_ENV, JOB_ENV)
    return home / ".smoothing-orchestrator"


def test_outside_a_job_the_defaults_are_unchanged(no_job):
    assert defaults.ray_job_id() is None
    assert defaults.default_tracking_uri() == mlflow.get_tracking_uri()
    assert mlflow_utils.resolve_tracking_uri() == f"sqlite:///{no_job / 'mlflow.db'}"
    assert defaults.default_storage() == str(Path.home() / "ray_results")
    assert defaults.default_output_dir("certify-out") == Path("certify-out")


def test_inside_a_job_every_default_is_in_the_stable_place(in_job):
    assert defaults.ray_job_id() == "raysubmit_test123"
    assert mlflow_utils.resolve_tracking_uri() == f"sqlite:///{in_job / 'mlflow.db'}"
    assert defaults.default_storage() == str(in_job / "ray_results")
    assert defaults.default_output_dir("certify-out") == in_job / "certify-out"
    assert defaults.default_output_dir("compare-out") == in_job / "compare-out"
    # the store opens although ~/.smoothing-orchestrator does not exist yet, and its artifacts go beside it
    uri = mlflow_utils.resolve_tracking_uri()
    cl = mlflow_utils.client(uri)
    exp = cl.get_experiment(mlflow_utils.ensure_experiment(cl, "x", uri))
    assert (in_job / "mlflow.db").is_file() and exp.artifact_location == (in_job / "mlruns" / "x").as_uri()


def test_explicit_choices_win_inside_a_job(in_job, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("RAY_STORAGE", "s3://bucket/ray_results")
    # probe=False: which store is chosen, not whether it answers (tests/test_bad_input.py covers the probe)
    assert mlflow_utils.resolve_tracking_uri(probe=False) == "http://mlflow.example:5000"
    assert mlflow_utils.resolve_tracking_uri("sqlite:///x.db", probe=False) == f"sqlite:///{Path.cwd() / 'x.db'}"
    assert defaults.default_storage() == "s3://bucket/ray_results"
    monkeypatch.setenv(defaults.HOME_ENV, str(tmp_path / "pv"))
    assert defaults.default_output_dir("certify-out") == tmp_path / "pv" / "certify-out"


def test_a_jobs_working_directory_gives_it_away_without_the_marker(no_job, monkeypatch):
    pkg = no_job / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    assert defaults.ray_job_id() == "unknown"
    monkeypatch.chdir(no_job)
    assert defaults.ray_job_id() is None


def test_locations_are_printed_at_start_and_end_even_after_a_failure(in_job, capsys):
    calls = []

    def main(argv=None):
        calls.append(argv)
        print("working")
        raise RuntimeError("boom")

    wrapped = defaults.with_locations(main, sweep.build_parser)
    with pytest.raises(RuntimeError):
        wrapped(["glean", "--budget", "smoke"])
    out = capsys.readouterr().out.splitlines()
    heads = [i for i, line in enumerate(out) if line.startswith("Ray job raysubmit_test123 on node ")]
    assert calls == [["glean", "--budget", "smoke"]]
    assert len(heads) == 2 and heads[0] == 0 < out.index("working") < heads[1]
    assert ", starting;" in out[heads[0]] and ", ending;" in out[heads[1]]
    store = [line.split()[-1] for line in out if line.strip().startswith("MLflow store")]
    assert store == [f"sqlite:///{in_job / 'mlflow.db'}"] * 2
    storage = [line.split()[-1] for line in out if line.strip().startswith("Ray storage")]
    assert storage == [str(in_job / "ray_results")] * 2


def test_no_banner_outside_a_job_or_for_a_command_line_main_rejects(no_job, monkeypatch, capsys):
    wrapped = defaults.with_locations(lambda argv=None: 0, sweep.build_parser)
    assert wrapped(["glean"]) == 0 and capsys.readouterr().out == ""
    monkeypatch.setenv(defaults.JOB_CONFIG_ENV, JOB_ENV)
    assert wrapped(["glean", "--no-such-flag"]) == 0          # main reports the bad input itself, once
    assert capsys.readouterr() == ("", "")
    assert wrapped(["glean", "--tracking-uri", "http://h:5000"]) == 0
    out = capsys.readouterr().out
    assert "MLflow store  http://h:5000" in out and ".smoothing-orchestrator/mlflow.db" not in out


def test_certify_in_a_job_writes_its_default_output_to_the_stable_place(ray_local, in_job, monkeypatch, capsys):
    """A real certification (real Ray actors) run as a job's entrypoint would run it, from a throwaway working
    directory: the TSV lands under <stable>/certify-out, nothing in the working directory."""
    from trainables import checkpoint
    from trainables.data import load_dataset
    from trainables.registry import get_trainable

    stable = in_job.parent.parent / "pv"
    monkeypatch.setenv(defaults.HOME_ENV, str(stable))   # the override, as a persistent volume would use it
    torch.manual_seed(0)
    mnist = load_dataset("mnist", download=False)
    model = get_trainable("gaussian")({"arch": "mlp3", "lr": 0.05, "batch_size": 64}, mnist.info, epochs=1)
    ckpt = checkpoint.save(in_job.parent.parent / "model.pt", model, epoch=1)
    workdir = Path.cwd()
    argv = ["--checkpoint", str(ckpt), "--max", "3", "--n0", "10", "--n", "100", "--alpha", "0.01",
            "--batch", "100", "--actors", "1", "--no-progress"]
    run = defaults.with_locations(certify.main, certify.build_parser, certify.DEFAULT_OUT_ROOT)
    assert run(argv) == 0
    (tsv,) = (stable / "certify-out").glob("test-*/test.tsv")
    assert len(tsv.read_text().splitlines()) >= 4
    assert not any(workdir.iterdir()), list(workdir.iterdir())
    out = capsys.readouterr().out
    folders = [line.split()[-1] for line in out.splitlines() if line.strip().startswith("output folder")]
    assert folders == [str(stable / "certify-out")] * 2
    assert "MLflow store" not in out                  # no --run-id: certify does not touch MLflow
    assert os.environ[defaults.JOB_CONFIG_ENV] == JOB_ENV
