"""GLEAN on CelebA and DomainNet: folders in the official layouts (written by tests/test_data_folders.py), the
train command without Ray, and a CPU smoke sweep showing both selection protocols."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dataset", ["celeba", "domainnet"])
def test_glean_trains_and_certifies_on_image_folders(tmp_path, dataset):
    """`orchestrator.train glean --dataset celeba|domainnet` (no Ray) on folders in the official layout: mini-
    batches holding every training domain, oracle selection, test figures on the 80% outside the hold-out."""
    import warnings

    import mlflow
    from test_data_folders import write_celeba, write_domainnet

    from orchestrator import train
    from orchestrator.cli_common import run_main

    (write_celeba if dataset == "celeba" else write_domainnet)(tmp_path / "data")
    if dataset == "domainnet":     # the default split trains on the five other domains: add the missing three
        import shutil
        for domain in ("infograph", "painting", "quickdraw"):
            shutil.copytree(tmp_path / "data" / "domainnet" / "clipart", tmp_path / "data" / "domainnet" / domain)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # celeba: the fixture's md5 differs from the release
        rc = run_main(train.main, ["glean", "--dataset", dataset, "--budget", "smoke", "--data-root",
                                   str(tmp_path / "data"), "--tracking-uri", uri, "--set", "width=4",
                                   "--set", "batch_size=32"])
    assert rc == 0
    cl = mlflow.MlflowClient(uri)
    (run,) = cl.search_runs([cl.get_experiment_by_name(dataset).experiment_id])
    m = run.data.metrics
    assert {"val_acr", "oracle_acr", "test_acr", "penalty"} <= set(m), set(m)
    assert m["test_acr"] <= 0.12 * 4                 # L = 1: radii on the paper's scale (sigma Phi^-1(p) <= 0.46)
    assert run.data.tags["test_examples"] == "test_minus_holdout"


def test_glean_smoke_sweep_on_domainnet_shows_both_protocols(ray_local, tmp_path, capsys):
    """A CPU smoke sweep of GLEAN on DomainNet folders (5 training domains, mini-batches): oracle selection by
    default, and the table labels each protocol's pick with its test-domain figures."""
    import shutil

    from test_data_folders import write_domainnet

    from orchestrator import sweep

    write_domainnet(tmp_path / "data")
    for domain in ("infograph", "painting", "quickdraw"):
        shutil.copytree(tmp_path / "data" / "domainnet" / "clipart", tmp_path / "data" / "domainnet" / domain)
    rc = sweep.main(["glean", "--dataset", "domainnet", "--budget", "smoke", "--trials", "2", "--data-root",
                     str(tmp_path / "data"), "--set", "width=4", "--set", "batch_size=40",
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "ray")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "oracle selection: test-domain validation" in out
    for row in ("[oracle (selected)] oracle ACR", "[oracle (selected)] test ACR", "[train-domain] validation ACR",
                "[train-domain] test ACR", "[train-domain] test cert. acc."):
        assert row in out, out
