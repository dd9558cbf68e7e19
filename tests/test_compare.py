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
