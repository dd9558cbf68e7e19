"""`python -m orchestrator.compare` on a real MLflow store filled by smoke runs of two trainables.

Checked (issue 8): the table's numbers equal those recomputed from the logged TSVs (mean and std over seeds);
the PNGs exist and are not blank; the comparison is logged as a run; an empty experiment, an unknown run id
and runs without certification get a one-line message and exit code 2.
"""
from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest

from orchestrator import compare, tracking
from trainables import metrics

EXPERIMENT = "compare-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """gaussian trained at the smoke budget with seeds 0 and 1 (batch 16 and lr 0.05, so that one epoch of
    256 examples certifies some), and a 2-trial smoke sweep of stability (its selected trial certified)."""
    from orchestrator import sweep, train

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = ["--budget", "smoke", "--tracking-uri", uri, "--experiment", EXPERIMENT]
    for seed in ("0", "1"):
        sets = ["--set", "batch_size=16", "--set", "lr=0.05"]
        assert train.main(["gaussian", "--seed", seed, *sets, *common]) == 0
    assert sweep.main(["stability", "--trials", "2", "--set", "batch_size=16", "--storage", str(root / "ray"),
                       *common]) == 0
    return uri


def _png_ok(path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 5_000, path
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.02, f"{path} looks blank"


def test_table_equals_numbers_recomputed_from_the_tsvs(store, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main(["--experiment", EXPERIMENT, "--tracking-uri", store, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "table.csv")
    assert set(table["trainable"]) == {"gaussian", "stability"}
    client = mlflow.MlflowClient(store)
    radii = metrics.RADII_BY_DATASET["mnist"]
    for _, row in table.iterrows():
        runs = row["run_ids"].split(",")
        assert row["runs"] == len(runs)
        per_run = []
        for run_id in runs:
            tsv = tracking.cert_tsv_artifact("test")
            local = client.download_artifacts(run_id, tsv, str(tmp_path / run_id))
            df = pd.read_csv(local, sep="\t", comment="#")    # independent of metrics.read_tsv
            correct = df["correct"].to_numpy() == 1
            per_run.append({**{r: float((correct & (df["radius"].to_numpy() >= r)).mean()) for r in radii},
                            "acr": float((df["radius"] * correct).mean())})
        for key in [*radii, "acr"]:
            values = np.array([p[key] for p in per_run])
            col = "acr" if key == "acr" else metrics.certacc_key(key)
            assert math.isclose(row[f"{col}_mean"], values.mean(), abs_tol=1e-12)
            if len(values) > 1:
                assert math.isclose(row[f"{col}_std"], values.std(ddof=1), abs_tol=1e-12)
            else:
                assert math.isnan(row[f"{col}_std"])
    # gaussian: one row, two seeds (mean ± std); stability: the sweep's selected trial
    assert list(table.loc[table["trainable"] == "gaussian", "runs"]) == [2]
    assert list(table.loc[table["trainable"] == "stability", "source"]) == ["sweep"]
    assert table["acr_mean"].max() > 0      # non-trivial numbers, so the comparison means something
    md = (out / "table.md").read_text()
    assert "train-domain selection" in md and "Budget: smoke" in md and "±" in md
    assert md.splitlines()[0] in printed
    for png in ["certified_accuracy.png", *[p.name for p in out.glob("sweep-*.png")]]:
        _png_ok(out / png)
    assert {p.name.rsplit("-", 1)[1] for p in out.glob("sweep-*.png")} >= {"history.png", "importance.png"}
    # the comparison is an MLflow run with everything attached
    runs = client.search_runs([client.get_experiment_by_name(compare.COMPARE_EXPERIMENT).experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[tracking.TAG_ROLE] == "compare"
    logged = {f.path for f in client.list_artifacts(runs[0].info.run_id)}
    assert {"table.csv", "table.md", "certified_accuracy.png"} <= logged


def _exit2(argv, capsys) -> str:
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("compare: error:")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


def test_bad_input_gets_a_clear_message(store, tmp_path, capsys):
    base = ["--tracking-uri", store, "--out", str(tmp_path / "cmp"), "--no-log"]
    client = mlflow.MlflowClient(store)
    client.create_experiment("empty")
    assert "hold no runs" in _exit2(["--experiment", "empty", *base], capsys)
    assert "unknown experiment" in _exit2(["--experiment", "nope", *base], capsys)
    assert "unknown run id" in _exit2(["--runs", "0123456789abcdef", *base], capsys)
    bare = client.create_run(client.get_experiment_by_name("empty").experiment_id).info.run_id
    assert "certify them first" in _exit2(["--runs", bare, *base], capsys)
    assert "certify them first" in _exit2(["--experiment", "empty", *base], capsys)
    assert "--radii" in _exit2(["--experiment", EXPERIMENT, "--radii", "0,x", *base], capsys)
    assert not (tmp_path / "cmp" / "table.csv").exists()


# --- like with like (issue 15): a store whose runs differ in one setting at a time --------------------------
def _certified_run(cl, exp_id: str, tmp, *, seed: int, budget: str = "smoke", selection: str = "train-domain",
                   n: int | None = None, idx=range(100), sigma: float = 0.25, lr: str = "0.05") -> str:
    """A real MLflow run of `orchestrator.train`'s shape (tags, params, certification TSV artifact) with rows
    drawn from a seeded generator: the table's grouping, not training, is under test here."""
    from orchestrator import mlflow_utils

    run_id = mlflow_utils.create_run(cl, exp_id, "gaussian-train", {
        tracking.TAG_ROLE: "train", tracking.TAG_TRAINABLE: "gaussian", tracking.TAG_DATASET: "mnist",
        tracking.TAG_SIGMA: sigma, tracking.TAG_BUDGET: budget, tracking.TAG_SELECTION: selection,
        tracking.TAG_SEED: seed})
    mlflow_utils.log_params(cl, run_id, {"trainable": "gaussian", "dataset": "mnist", "sigma": sigma, "lr": lr,
                                         "seed": seed, "budget": budget, "selection": selection})
    if n is not None:
        mlflow_utils.set_tags(cl, run_id, {"test_cert_n0": 100, "test_cert_n": n, "test_cert_alpha": 0.001})
    rng = np.random.default_rng(seed * 7919 + (n or 0))
    idx = list(idx)
    correct = rng.random(len(idx)) < 0.8
    df = pd.DataFrame({"idx": idx, "label": 1, "predict": np.where(correct, 1, 2),
                       "radius": np.round(rng.random(len(idx)), 3), "correct": correct.astype(int),
                       "time": 0.01})
    path = tmp / f"{run_id}.tsv"
    metrics.write_tsv(df, path)
    mlflow_utils.log_file(cl, run_id, path, tracking.cert_tsv_artifact("test"))
    mlflow_utils.close_run(cl, run_id)
    return run_id


def test_rows_only_average_runs_that_match_in_every_setting(tmp_path, capsys):
    from orchestrator import mlflow_utils

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = mlflow_utils.client(uri)
    exp = mlflow_utils.ensure_experiment(cl, "like", uri)
    seeds = [_certified_run(cl, exp, tmp_path, seed=s, n=1000) for s in (0, 1)]          # one row, 2 runs
    big_n = _certified_run(cl, exp, tmp_path, seed=2, n=100_000)                          # other n
    oracle = _certified_run(cl, exp, tmp_path, seed=3, n=1000, selection="oracle", idx=range(20, 100))
    quick = _certified_run(cl, exp, tmp_path, seed=4, n=1000, budget="quick")             # other budget
    other_lr = _certified_run(cl, exp, tmp_path, seed=5, n=1000, lr="0.1")                 # other config
    global_uri = mlflow.get_tracking_uri()

    out = tmp_path / "cmp"
    assert compare.main(["--experiment", "like", "--tracking-uri", uri, "--out", str(out)]) == 0
    capsys.readouterr()
    table = pd.read_csv(out / "table.csv", dtype={"n": str, "n0": str, "alpha": str})
    by_runs = {frozenset(r.split(",")): row for r, (_, row) in zip(table["run_ids"], table.iterrows())}
    assert set(by_runs) == {frozenset(seeds), frozenset([big_n]), frozenset([oracle]), frozenset([quick]),
                            frozenset([other_lr])}
    assert by_runs[frozenset(seeds)]["runs"] == 2
    # every row is labelled with what differs from the others of its trainable and sigma
    labels = {k: str(row["config"]) for k, row in by_runs.items()}
    assert "n=100000" in labels[frozenset([big_n])] and "n=1000" in labels[frozenset(seeds)]
    assert "selection=oracle" in labels[frozenset([oracle])]
    assert "examples=80#" in labels[frozenset([oracle])]
    assert "budget=quick" in labels[frozenset([quick])]
    assert "lr=0.1" in labels[frozenset([other_lr])]
    assert len(set(labels.values())) == len(labels)
    assert (out / "table.md").read_text().count("\n| gaussian") == 5
    # MLflow was driven through a client: no global tracking URI set, no active run left behind
    assert mlflow.get_tracking_uri() == global_uri and mlflow.active_run() is None
    [logged] = cl.search_runs([cl.get_experiment_by_name(compare.COMPARE_EXPERIMENT).experiment_id])
    assert logged.info.status == "FINISHED" and logged.data.tags[tracking.TAG_ROLE] == "compare"


def test_compare_never_creates_a_store(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    assert compare.main(["--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "cmp")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not db.exists() and not (tmp_path / "cmp").exists()
