"""orchestrator.search (contract C6): samplers sized to the sweep, ASHA-stopped trials PRUNED, the study in a real
sqlite Optuna storage -- read with optuna.load_study during a real sweep, after the driver is killed, and after
`--resume` (trial count, states, values against the MLflow trial runs).
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import sqlalchemy.exc
import pytest
from ray import tune

from orchestrator import search, tracking

from processes import kill_session

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("trials, startup, population", [(2, 1, 2), (6, 2, 3), (32, 10, 16), (200, 10, 50)])
def test_samplers_are_sized_to_the_trial_count(trials, startup, population):
    tpe = search.make_sampler("tpe", 0, trials, concurrency=2)
    assert tpe._n_startup_trials == startup and startup <= max(1, trials // 3)
    assert tpe._constant_liar is True
    assert search.make_sampler("tpe", 0, trials, concurrency=1)._constant_liar is False
    nsga = search.make_sampler("nsga2", 0, trials, concurrency=2, objectives=2)
    assert nsga._population_size == population and population <= max(2, trials // 2)
    with pytest.raises(ValueError, match="cmaes optimises one objective"):
        search.make_sampler("cmaes", 0, trials, 1, objectives=2)


@pytest.mark.parametrize("kind", search.SAMPLERS)
def test_every_sampler_survives_pickle_as_tune_saves_it(kind):
    """Tune pickles the searcher, sampler included; Optuna 5.1's NSGA-II holds a threading.Lock (the two-objective
    sweep died in Tuner()). After a round trip the sampler still proposes."""
    objectives = 2 if kind == "nsga2" else 1
    sampler = pickle.loads(pickle.dumps(search.make_sampler(kind, 0, 4, 2, objectives, grid={"x": [0.0, 1.0]})))
    study = optuna.create_study(sampler=sampler, directions=["maximize"] * objectives)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    assert 0.0 <= trial.params["x"] <= 1.0
    study.tell(trial, [1.0] * objectives)
    pickle.loads(pickle.dumps(sampler))


def test_default_storage_and_bad_urls(tmp_path):
    assert search.default_storage_url(f"sqlite:///{tmp_path}/a/mlflow.db", tmp_path / "sweep") == \
        f"sqlite:///{tmp_path}/a/optuna.db"
    assert search.default_storage_url("http://127.0.0.1:5000", tmp_path / "sweep") == \
        f"sqlite:///{tmp_path}/sweep/optuna.db"
    search.check_storage_url(f"sqlite:///{tmp_path}/x.db")
    for url, msg in [("not a url", "not a database URL"), ("s3://b/x", "not 's3'"),
                     ("sqlite://", "in-memory"), (f"sqlite:///{tmp_path}/nope/x.db", "does not exist")]:
        with pytest.raises(ValueError, match=msg):
            search.check_storage_url(url)


def test_stopped_trials_are_pruned_failed_ones_failed_and_the_searcher_survives_a_restore(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    s = search.build_searcher("tpe", 0, trials=4, concurrency=2, objectives=("val_acr",), storage_url=url,
                              study_name="sweep-a", planned_epochs=4, user_attrs={"dataset": "cmnist"})
    s.set_search_properties(None, None, {"lr": tune.loguniform(1e-3, 1e-1)})
    cfgs = {tid: s.suggest(tid) for tid in ("t1", "t2", "t3")}
    assert all(0.001 <= c["lr"] <= 0.1 for c in cfgs.values())
    s.on_trial_result("t1", {"epoch": 1, "train_loss": 1.0})            # no evaluation this epoch: ignored
    for tid, acrs in (("t1", [0.1, 0.2, 0.3, 0.4]), ("t2", [0.05, 0.07])):
        for epoch, acr in enumerate(acrs, 1):
            s.on_trial_result(tid, {"epoch": epoch, "val_acr": acr})
    s.on_trial_complete("t1", {"epoch": 4, "val_acr": 0.4})
    s.on_trial_complete("t2", {"epoch": 2, "val_acr": 0.07})           # ASHA stopped it at epoch 2 of 4
    s.on_trial_complete("t3", None, error=True)

    study = optuna.load_study(study_name="sweep-a", storage=url)
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert by_tune["t1"].state.name == "COMPLETE" and by_tune["t1"].value == 0.4
    assert by_tune["t1"].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}
    assert by_tune["t2"].state.name == "PRUNED" and by_tune["t2"].intermediate_values == {1: 0.05, 2: 0.07}
    assert by_tune["t2"].value == 0.07                                  # Optuna: a pruned trial's last value
    assert by_tune["t3"].state.name == "FAIL"
    assert study.metric_names == ["val_acr"] and study.user_attrs["dataset"] == "cmnist"

    # Tune saves the searcher with pickle; a restored one continues the same study, and a trial the study holds
    # as RUNNING that the saved searcher never knew (asked after the save by a killed driver) is failed
    s.save(str(tmp_path / "searcher.pkl"))
    s.suggest("t4")                                                     # asked after the save, then "killed"
    restored = search.build_searcher("tpe", 0, 4, 2, ("val_acr",), url, "sweep-a", planned_epochs=4)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.suggest("t5")
    restored.on_trial_result("t5", {"epoch": 4, "val_acr": 0.5})
    restored.on_trial_complete("t5", {"epoch": 4, "val_acr": 0.5})
    study = optuna.load_study(study_name="sweep-a", storage=url)
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    assert states == {"t1": "COMPLETE", "t2": "PRUNED", "t3": "FAIL", "t4": "FAIL", "t5": "COMPLETE"}
    assert study.best_value == 0.5 and len({t.number for t in study.trials}) == 5
    pickle.loads(pickle.dumps(restored))                                # still picklable for Tune's next save


def test_a_trial_told_after_the_last_save_is_rerun_by_tune_without_touching_the_study(tmp_path):
    """The CI failure of 2026-11-28: the driver told a trial COMPLETE, was SIGKILLed before Tune saved the
    searcher, and on `--resume` Tune re-ran that trial from its checkpoint; reporting its repeated epochs to the
    finished Optuna trial raised UpdateFinishedTrialError and ended the resumed sweep."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    s = search.build_searcher("tpe", 0, trials=3, concurrency=1, objectives=("val_acr",), storage_url=url,
                              study_name="sweep-b", planned_epochs=2)
    s.set_search_properties(None, None, {"lr": tune.loguniform(1e-3, 1e-1)})
    s.suggest("t1")
    s.on_trial_result("t1", {"epoch": 1, "val_acr": 0.1})
    s.save(str(tmp_path / "searcher.pkl"))                              # Tune's last save: t1 still running
    s.on_trial_result("t1", {"epoch": 2, "val_acr": 0.3})
    s.on_trial_complete("t1", {"epoch": 2, "val_acr": 0.3})            # told, then the driver is killed
    s.suggest("t0")                                                     # asked and finished after the save too
    s.on_trial_complete("t0", {"epoch": 2, "val_acr": 0.25})

    restored = search.build_searcher("tpe", 0, 3, 1, ("val_acr",), url, "sweep-b", planned_epochs=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    for epoch, acr in ((1, 0.1), (2, 0.3)):                             # Tune re-runs t1 from its checkpoint
        restored.on_trial_result("t1", {"epoch": epoch, "val_acr": acr})
    restored.on_trial_complete("t1", {"epoch": 2, "val_acr": 0.3})
    restored.suggest("t2")
    restored.on_trial_result("t2", {"epoch": 2, "val_acr": 0.2})
    restored.on_trial_complete("t2", {"epoch": 2, "val_acr": 0.2})
    study = optuna.load_study(study_name="sweep-b", storage=url)
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert {k: (t.state.name, t.value) for k, t in by_tune.items()} == {"t1": ("COMPLETE", 0.3),
                                                                         "t0": ("COMPLETE", 0.25),
                                                                         "t2": ("COMPLETE", 0.2)}
    assert study.user_attrs[search.ORPHANS_ATTR] == [by_tune["t0"].number]   # Tune redoes t0's work
    assert by_tune["t1"].intermediate_values == {1: 0.1, 2: 0.3}


def _trial_runs(uri: str) -> list:
    cl = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in cl.search_experiments()]
    runs = cl.search_runs(ids, max_results=1000) if ids else []
    return [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "trial"]


def _study(url: str):
    names = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=names[0], storage=url) if len(names) == 1 else None


@pytest.mark.slow
def test_killed_driver_resumes_the_sweep_its_runs_and_its_study(tmp_path):
    """A real sweep (gaussian, smoke budget, 4 trials one at a time): the study is in the default storage beside
    the MLflow sqlite file while the sweep runs; the driver is SIGKILLed after a trial completed; `--resume`
    finishes the sweep with every trial exactly once in MLflow (all FINISHED) and continues the same study; a
    second `--resume` recomputes nothing. (One test for the sweep's and the study's resume: each costs a sweep.)"""
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    n = 4   # a smoke trial takes seconds: 4 leave a window to kill the driver mid-sweep on a fast machine
    args = [sys.executable, "-m", "orchestrator.sweep", "gaussian", "--budget", "smoke", "--trials", str(n),
            "--concurrency", "1", "--tracking-uri", mlflow_uri, "--storage", str(tmp_path / "ray")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    seen_running = False
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:   # the driver may still be creating the schema when the file appears
                study = _study(url) if (tmp_path / "optuna.db").exists() else None
            except sqlalchemy.exc.SQLAlchemyError:
                study = None
            if study is not None:
                states = [t.state.name for t in study.trials]
                seen_running |= "RUNNING" in states
                if "COMPLETE" in states and list((tmp_path / "ray").glob("*/experiment_state*")):
                    break
            assert proc.poll() is None, "the sweep ended before it could be killed:\n" + \
                (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("no trial completed within 240 s")
        # mid-sweep: the study is there, named after the sweep, with at least one finished trial (counted in the
        # states that decided the kill: study.trials reads the storage again, and the sweep runs on meanwhile)
        mid = study
        assert mid.study_name == next((tmp_path / "ray").glob("gaussian-*")).name
        assert mid.metric_names == ["val_acr"] and mid.user_attrs["selection"] == "train-domain"
        assert 1 <= states.count("COMPLETE") < n
        assert seen_running, "a trial was visible as RUNNING while it ran"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_session(proc.pid)

    done = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test ACR" in done.stdout
    cl = mlflow.MlflowClient(mlflow_uri)
    every = cl.search_runs([e.experiment_id for e in cl.search_experiments()], max_results=1000)
    [parent] = [r for r in every if r.data.tags.get(tracking.TAG_ROLE) == "sweep"]
    trial_runs = _trial_runs(mlflow_uri)
    ids = [r.data.tags[tracking.TAG_TUNE_TRIAL] for r in trial_runs]
    assert len(ids) == len(set(ids)) == n, "every trial exactly once in MLflow"
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in trial_runs)
    study = _study(url)
    assert study is not None and study.study_name == mid.study_name, "one study, continued"
    # a trial the killed driver finished after Tune's last save is redone by Tune: the study lists it as orphaned
    orphans = set(study.user_attrs.get(search.ORPHANS_ATTR, []))
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and t.number not in orphans]
    assert len(complete) == n, [(t.number, t.state.name) for t in study.trials]
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in study.trials), "nothing left RUNNING"
    assert all(t.user_attrs.get("orphaned") for t in study.trials if t.state.name == "FAIL")
    # the values are the trial runs' final validation ACRs, trial by trial (linked by Tune's trial id)
    runs = {r.data.tags[tracking.TAG_TUNE_TRIAL]: r for r in _trial_runs(mlflow_uri)}
    assert len(runs) == n
    for t in complete:
        assert t.value == pytest.approx(runs[t.user_attrs["tune_trial_id"]].data.metrics[tracking.VAL_ACR])
        assert t.params["lr"] == pytest.approx(float(runs[t.user_attrs["tune_trial_id"]].data.params["lr"]))

    again = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert len(cl.search_runs([e.experiment_id for e in cl.search_experiments()], max_results=1000)) == \
        len(every), "a finished sweep is not recomputed"
