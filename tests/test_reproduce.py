"""The GLEAN paper's CMNIST evidence as commands (issue 14 item 5), at the smoke budget (numbers mean nothing;
what is checked is what each command runs, certifies, logs and shows):

- `orchestrator.sweep --sampler grid` (Fig. 5's parameter study): every combination of the listed values runs
  once, the other searched parameters at their defaults, every setting certified on the test split, and the
  table / parameter_study.* agree with the trial runs' own certification TSVs;
- `orchestrator.reproduce glean-table2` (Table 2): every method certified with the same n on the same test
  examples (so compare puts them in one like-with-like table), GLEAN's deterministic certificate in its own
  column, and a relaunch skips the finished runs;
- the parameter study's table and figure from known rows.
"""
from __future__ import annotations

import itertools

import mlflow
import pandas as pd
import pytest

from orchestrator import parameter_study as P
from orchestrator import reproduce, sweep, tracking
from orchestrator.cli_common import run_main
from trainables import metrics as M


def _runs(uri: str) -> list:
    cl = mlflow.MlflowClient(uri)
    return cl.search_runs([e.experiment_id for e in cl.search_experiments()], max_results=1000)


def test_grid_sweep_runs_every_setting_once_and_certifies_each(ray_local, mlflow_uri, tmp_path, capsys):
    rc = sweep.main(["glean", "--budget", "smoke", "--sampler", "grid", "--space", "lam=0,1000",
                     "--space", "sigma=0.12,0.25", "--tracking-uri", mlflow_uri, "--storage", str(tmp_path / "ray")])
    assert rc == 0
    out = capsys.readouterr().out
    runs = _runs(mlflow_uri)
    [parent] = [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "trial"]
    assert parent.data.params["sampler"] == "grid" and parent.data.params["trials"] == "4"
    settings = sorted((float(t.data.params["lam"]), float(t.data.params["sigma"])) for t in trials)
    assert settings == sorted(itertools.product((0.0, 1000.0), (0.12, 0.25)))      # each combination once
    assert {t.data.params["lr"] for t in trials} == {"0.001"}     # not listed: pinned at the declared default
    assert all(t.info.status == "FINISHED" for t in trials)

    cl = mlflow.MlflowClient(mlflow_uri)
    acr = {}
    for t in trials:      # every setting certified on the test split, the same examples for each
        tsv = M.read_tsv(cl.download_artifacts(t.info.run_id, tracking.cert_tsv_artifact("test"), str(tmp_path / t.info.run_id)))
        acr[(float(t.data.params["lam"]), float(t.data.params["sigma"]))] = M.acr(tsv)
        assert t.data.metrics["test_acr"] == pytest.approx(M.acr(tsv))
    arts = {a.path for a in cl.list_artifacts(parent.info.run_id)}
    assert {"parameter_study.png", "parameter_study.md", "parameter_study.csv"} <= arts
    csv = pd.read_csv(cl.download_artifacts(parent.info.run_id, "parameter_study.csv", str(tmp_path / "p")))
    for _, row in csv.iterrows():
        assert row["acr"] == pytest.approx(acr[(row["lam"], row["sigma"])])
    assert "lam \\ sigma" in out and "parameter study" in out


def test_parameter_study_table_and_figure(tmp_path):
    def rows(correct, radius):
        return pd.DataFrame({"idx": range(4), "label": [0] * 4, "predict": [0 if c else 1 for c in correct],
                             "radius": radius, "correct": [int(c) for c in correct], "time": [0.0] * 4})
    points = [({"lam": 10.0, "sigma": 0.12}, rows([1, 1, 0, 0], [0.1, 0.2, 0.0, 0.0])),
              ({"lam": 10.0, "sigma": 0.25}, rows([1, 1, 1, 0], [0.3, 0.3, 0.3, 0.0])),
              ({"lam": 1e4, "sigma": 0.12}, rows([1, 0, 0, 0], [0.4, 0.0, 0.0, 0.0]))]
    frame = P.study_frame(points, ["lam", "sigma"], (0.0, 0.25))
    assert list(frame["acr"]) == pytest.approx([0.075, 0.225, 0.1])
    table = P.pivot_markdown(frame, ["lam", "sigma"]).splitlines()
    assert table[0] == "| lam \\ sigma | 0.12 | 0.25 |"
    assert table[2] == "| 10 | 0.0750 | 0.2250 |" and table[3] == "| 10000 | 0.1000 | – |"
    png = P.plot_study(points, ["lam", "sigma"], tmp_path / "study.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reproduce_table2_certifies_every_method_alike_and_skips_finished_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["glean-table2", "--budget", "smoke", "--n", "64", "--examples", "12", "--tracking-uri", uri,
            "--out", str(tmp_path / "out")]
    assert reproduce.main(argv) == 0
    runs = [r for r in _runs(uri) if r.data.tags.get(tracking.TAG_ROLE) == "train"]
    assert sorted(r.data.tags[tracking.TAG_TRAINABLE] for r in runs) == sorted(reproduce.TABLE2_METHODS)
    assert {r.data.tags["test_cert_n"] for r in runs} == {"64"}
    assert {r.data.params["sigma"] for r in runs} == {"0.12"}
    cl = mlflow.MlflowClient(uri)
    examples = {tuple(M.read_tsv(cl.download_artifacts(r.info.run_id, tracking.cert_tsv_artifact("test"),
                                                       str(tmp_path / r.info.run_id)))["idx"]) for r in runs}
    assert len(examples) == 1 and len(next(iter(examples))) == 12        # the same 12 examples for every method
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert len(table) == 5 and set(table["n"].astype(str)) == {"64"}        # one like-with-like table
    assert table.set_index("trainable")["det_acr_mean"].notna().to_dict() == {
        m: m == "glean" for m in reproduce.TABLE2_METHODS}                 # the deterministic column: GLEAN only
    capsys.readouterr()

    assert reproduce.main(argv) == 0                                        # relaunch: nothing retrained
    assert capsys.readouterr().out.count("done before") == 5
    assert len([r for r in _runs(uri) if r.data.tags.get(tracking.TAG_ROLE) == "train"]) == 5


@pytest.mark.parametrize("argv, message", [
    (["glean-ablations", "--n", "100"], "--n / --examples apply to glean-table2"),
    (["glean-table2", "--sigmas", "0.25"], "--sigmas does not apply to glean-table2"),
    (["glean-parameters", "--lams", "10,x"], "--lams must be comma-separated numbers"),
    (["glean-table2", "--seeds", "-1"], "--seeds must be non-negative"),
])
def test_reproduce_bad_input(argv, message, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert run_main(reproduce.main, [*argv, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "m.db").exists()


def test_reproduce_dry_run_prints_the_commands(capsys):
    assert reproduce.main(["glean-parameters", "--dry-run", "--budget", "paper"]) == 0
    out = capsys.readouterr().out
    assert ("python -m orchestrator.sweep glean --dataset cmnist --budget paper --sampler grid --space "
            "lam=10,100,1000,10000,100000,1000000 --space sigma=0.12,0.25,0.5,1") in out
    assert reproduce.main(["glean-ablations", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and sum("lipschitz=false" in line for line in lines) == 4
