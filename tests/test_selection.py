"""Model selection (orchestrator/selection.py, contract C5): protocols per dataset, the disjoint oracle hold-out,
picks, both metrics reported by every evaluation, and bad input -> exit 2 before anything is written."""
from __future__ import annotations

from types import SimpleNamespace

import mlflow
import pytest

from orchestrator import selection as S
from orchestrator import sweep, train, tracking
from orchestrator.cli_common import run_main
from trainables.data import DataInfo

CMNIST = DataInfo("cmnist", 2, (2, 14, 14), (0.0, 0.0), (1.0, 1.0), train_domains=("+80%", "+90%"),
                  test_domains=("-90%",))
MNIST = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))


def test_default_protocol_follows_the_dataset():
    assert S.check_protocol(None, CMNIST) == "oracle"
    assert S.check_protocol(None, MNIST) == "train-domain"
    assert S.check_protocol("train-domain", CMNIST) == "train-domain"
    with pytest.raises(S.SelectionError, match="needs a held-out test domain.*'mnist'"):
        S.check_protocol("oracle", MNIST)


def test_oracle_hold_out_is_a_fixed_disjoint_20_percent():
    splits = SimpleNamespace(info=CMNIST, val=range(500), test=range(1000))
    sets = S.selection_sets(splits, "oracle", search_examples=None, final_examples=None)
    assert len(sets.oracle) == 200 and len(sets.report) == 800 and not set(sets.oracle) & set(sets.report)
    assert sorted(sets.oracle + sets.report) == list(range(1000))
    assert sets.report_label == "test_minus_holdout" and sets.val == list(range(500))
    again = S.selection_sets(splits, "train-domain", 50, 100)         # both protocols: same hold-out, same report
    assert set(again.oracle) <= set(sets.oracle) and set(again.report) <= set(sets.report)
    assert len(again.oracle) == 50 and len(again.report) == 100
    plain = S.selection_sets(SimpleNamespace(info=MNIST, val=range(10), test=range(30)), "train-domain", None, None)
    assert plain.oracle is None and plain.report == list(range(30)) and plain.report_label == "test"


def test_each_protocol_picks_its_own_best():
    results = [SimpleNamespace(metrics={"val_acr": 0.6, "oracle_acr": 0.05}),      # colour-reliant
               SimpleNamespace(metrics={"val_acr": 0.3, "oracle_acr": 0.20}),      # invariant
               SimpleNamespace(metrics={"val_acr": float("nan")})]
    assert S.pick(results, "train-domain") is results[0]
    assert S.pick(results, "oracle") is results[1]
    assert S.pick(results[2:], "oracle") is None


def test_oracle_without_a_test_domain_exits_2_before_writing(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for cmd, argv in ((sweep.main, ["gaussian", "--select", "oracle"]), (train.main, ["gaussian", "--select", "oracle"])):
        rc = run_main(cmd, [*argv, "--budget", "smoke", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]
                      if cmd is sweep.main else [*argv, "--budget", "smoke", "--tracking-uri", uri])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "needs a held-out test domain" in err[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


def test_a_run_on_cmnist_reports_both_protocols_metrics(tmp_path):
    """orchestrator.train (no Ray) on cmnist: every evaluation reports val_acr AND oracle_acr; the test figures
    come from the 80% outside the hold-out."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = run_main(train.main, ["glean", "--budget", "smoke", "--tracking-uri", uri, "--set", "hidden=16"])
    assert rc == 0
    (run,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("cmnist").experiment_id])
    m = run.data.metrics
    assert {tracking.VAL_ACR, S.ORACLE_ACR, S.ORACLE_CLEAN_ACC, "test_acr"} <= set(m)
    assert run.data.tags[tracking.TAG_SELECTION] == "oracle"
    assert run.data.tags["test_examples"] == "test_minus_holdout"
