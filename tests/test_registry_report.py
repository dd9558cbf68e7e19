"""orchestrator.models (MLflow Models + Model Registry), orchestrator.report (report.html in real headless chromium)
and the study in optuna-dashboard, on one real GLEAN sweep (smoke budget, 2 trials) logging to a real sqlite
MLflow store; the registry against a real `mlflow server` started on a free 127.0.0.1 port.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch

from orchestrator import certify, models, sweep, tracking
from orchestrator.cli_common import run_main
from trainables import checkpoint as ckpt_io
from trainables.data import DataInfo
from trainables.registry import get_trainable
from trainables.metrics import read_tsv
from trainables.smoothing import Smooth

from processes import kill_session


@pytest.fixture(scope="module")
def glean_sweep(ray_local, tmp_path_factory):
    """The floor's setting: `orchestrator.sweep glean` (cmnist), smoke budget, 2 trials, default seed."""
    tmp = tmp_path_factory.mktemp("glean-sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    rc = run_main(sweep.main, ["glean", "--budget", "smoke", "--trials", "2", "--tracking-uri", uri,
                               "--storage", str(tmp / "ray")])
    assert rc == 0
    (sweep_dir,) = (tmp / "ray").glob("glean-*")
    cl = mlflow.MlflowClient(uri)
    parent = next(r for r in cl.search_runs([e.experiment_id for e in cl.search_experiments()])
                  if r.data.tags.get(tracking.TAG_ROLE) == "sweep")
    return uri, sweep_dir, parent


def _tsv_without_time(path: Path) -> tuple[list[str], list[str]]:
    """(meta lines, data lines without the `time` column) of a certification TSV."""
    lines = Path(path).read_text().splitlines()
    meta = [ln for ln in lines if ln.startswith("#")]
    rows = [ln.split("\t") for ln in lines if not ln.startswith("#")]
    t = rows[0].index("time")
    return meta, ["\t".join(r[:t] + r[t + 1:]) for r in rows]


@pytest.mark.slow
def test_selected_model_is_registered_and_certify_model_reproduces_the_sweeps_tsv(glean_sweep, tmp_path, capsys):
    uri, sweep_dir, parent = glean_sweep
    cl = mlflow.MlflowClient(uri, registry_uri=uri)
    version = cl.get_model_version_by_alias("glean-cmnist", "selected")
    assert version.run_id == parent.data.tags["selected_run_id"]
    assert float(version.tags["test_acr"]) == parent.data.metrics["test_acr"]
    # cmnist has a held-out test domain: the default selection is the oracle (orchestrator/selection.py)
    assert float(version.tags["selected_oracle_acr"]) == parent.data.metrics["selected_oracle_acr"]
    assert version.tags["final_cert_selection"] == "oracle" and version.tags["final_cert_n"] == "100"

    # every trial's final model is an MLflow Model linked to its run; the MLmodel names a safe loader
    trial_ids = {r.info.run_id for r in cl.search_runs([parent.info.experiment_id])
                 if r.data.tags.get(tracking.TAG_ROLE) == "trial"}
    logged = cl.search_logged_models(experiment_ids=[parent.info.experiment_id])
    assert {m.source_run_id for m in logged} == trial_ids and len(logged) == 2
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=cl.get_model_version_download_uri(
        "glean-cmnist", version.version), dst_path=str(tmp_path / "m"), tracking_uri=uri))
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: orchestrator.models" in mlmodel and "python_model" not in mlmodel

    # the module Smooth accepts, with the metadata a reader needs
    loaded = models.resolve_model_uri("models:/glean-cmnist@selected", uri, tmp_path / "r")
    assert loaded.metadata["sigma"] == loaded.sigma and loaded.metadata["lipschitz"] > 0
    smooth = Smooth(loaded.net, loaded.trainable.info.num_classes, loaded.sigma)
    x = torch.rand(*loaded.trainable.info.input_shape)
    assert smooth.predict(x, n=50, alpha=0.01, generator=torch.Generator().manual_seed(0)) in (-1, 0, 1)
    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/glean-cmnist@selected")
        assert pyfunc.predict(x.numpy()[None]).shape == (1,)
    finally:
        mlflow.set_tracking_uri(None)

    # the floor: certify --model reproduces the sweep's test TSV (every column but the wall-clock `time`)
    out = tmp_path / "certify-out"
    assert certify.main(["--model", "models:/glean-cmnist@selected", "--tracking-uri", uri, "--out", str(out),
                         "--no-progress"]) == 0
    sweep_tsv = sweep_dir / "final_certification" / parent.data.tags["selected_run_id"] / "test.tsv"
    _, ours = _tsv_without_time(out / "test.tsv")
    _, theirs = _tsv_without_time(sweep_tsv)
    assert ours == theirs and len(ours) == 1 + 16
    ours_meta, theirs_meta = read_tsv(out / "test.tsv").attrs["meta"], read_tsv(sweep_tsv).attrs["meta"]
    differ = {k for k in ours_meta.keys() | theirs_meta.keys() if ours_meta.get(k) != theirs_meta.get(k)}
    assert differ == {"source"}, differ   # where the model came from: a checkpoint path vs the URI
    by_number = models.model_version(f"models:/glean-cmnist/{version.version}", uri)
    assert by_number.version == version.version and by_number.source == version.source

    capsys.readouterr()
    assert certify.main(["--model", "models:/glean-cmnist@nosuch", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model version models:/glean-cmnist@nosuch" in err[0]


def test_loading_never_unpickles_code(tmp_path):
    """A checkpoint whose pickle needs a class (arbitrary code on load) is refused by the safe reader."""
    info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
    t = get_trainable("gaussian")({}, info)
    path = ckpt_io.save(tmp_path / "model.pt", t, 1)
    assert models.read_checkpoint_safely(path)["trainable"] == "gaussian"
    blob = torch.load(path, weights_only=False)
    blob["extra"] = {"payload": Path("/etc/passwd")}        # any non-allow-listed global
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(models.ModelUriError, match="not a safely loadable"):
        models.read_checkpoint_safely(tmp_path / "evil.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_registry_round_trip_through_a_real_mlflow_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300   # seconds on an idle machine; 120 s measured on the loaded shared one
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
        torch.manual_seed(0)
        t = get_trainable("gaussian")({"sigma": 0.5}, info)
        path = ckpt_io.save(tmp_path / "model.pt", t, 3)
        cl = mlflow.MlflowClient(uri)
        exp = cl.create_experiment("mnist")
        run = cl.create_run(exp).info.run_id
        logged = models.log_model(uri, run, path, input_example=np.zeros((1, 1, 28, 28), np.float32))
        v = models.register_selected(uri, logged.model_uri, run, "gaussian", "mnist",
                                     tags={"test_acr": 0.5, "final_cert_seed": 0})
        assert v.name == "gaussian-mnist" and v.aliases == ["selected"]
        loaded = models.resolve_model_uri("models:/gaussian-mnist@selected", uri, tmp_path / "dl")
        for k, w in t.net.state_dict().items():
            assert torch.equal(loaded.net.state_dict()[k], w)
        assert loaded.metadata["sigma"] == 0.5 and "lipschitz" not in loaded.metadata
        assert models.certify_settings(models.model_version("models:/gaussian-mnist/1", uri)) == {"seed": 0}
        # the artifacts went through the server (proxied), not to a path the client wrote
        assert any((tmp_path / "artifacts").rglob("model.pt"))
    finally:
        kill_session(server.pid)


@pytest.mark.slow
def test_report_renders_in_headless_chromium_and_optuna_dashboard_reads_the_study(glean_sweep, tmp_path):
    uri, sweep_dir, parent = glean_sweep
    html_path = sweep_dir / "report" / "report.html"
    md = (sweep_dir / "report" / "report.md").read_text()
    assert html_path.exists() and "## Certified accuracy vs radius" in md and "## Optimisation" in md
    assert "models:/glean-cmnist@selected" in md and "optuna-dashboard sqlite:///" in md
    for img in re.findall(r"\]\((report_files/[^)]+)\)", md):
        assert (sweep_dir / "report" / img).stat().st_size > 1000
    cl = mlflow.MlflowClient(uri)
    assert {a.path for a in cl.list_artifacts(parent.info.run_id, "report")} >= {"report/report.html",
                                                                                  "report/report.md"}

    # optuna-dashboard (the PyPI package) serves the study from the same storage: its own WSGI app, called
    storage_url = parent.data.params["optuna_storage"]
    from optuna_dashboard import wsgi
    app = wsgi(storage_url)
    status = []
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "QUERY_STRING": "",
                         "SERVER_NAME": "x", "SERVER_PORT": "80", "wsgi.input": io.BytesIO(),
                         "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1"},
                        lambda s, h, *a: status.append(s)))
    studies = json.loads(body)["study_summaries"]
    assert status[0].startswith("200") and [s["study_name"] for s in studies] == [sweep_dir.name]
    study = optuna.load_study(study_name=sweep_dir.name, storage=storage_url)
    assert len(study.trials) == 2

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = int(re.search(r'data-images="(\d+)"', dom.stdout).group(1))
    broken = int(re.search(r'data-broken-images="(\d+)"', dom.stdout).group(1))
    assert images >= 3 and broken == 0, (images, broken)
    shot = subprocess.run(flags + [f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,2000",
                                   html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and (tmp_path / "shot.png").stat().st_size > 10_000
