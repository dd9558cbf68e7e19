"""Bad input to the four commands: one line on stderr, exit code 2, and nothing written (issue 15).

Every case runs the command's `main(argv)` in this process through `cli_common.run_main` (as `python -m` does),
in a fresh working directory holding a real MLflow sqlite store (one FINISHED run) and a real checkpoint.
Each case asserts: the exit code; exactly one line on stderr, without a traceback; and that the working
directory is unchanged (no store created or touched, no partial output, no RUNNING run). The signal and
exit-code cases that need a real process are in tests/test_signals.py.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import socket
from pathlib import Path

import pytest
import torch

from orchestrator import certify, compare, mlflow_utils, sweep, train
from orchestrator.cli_common import run_main
from trainables import checkpoint
from trainables.data import DataInfo

COMMANDS = {"train": train.main, "sweep": sweep.main, "certify": certify.main, "compare": compare.main}
MNIST_INFO = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
CMNIST_INFO = DataInfo("cmnist", 2, (2, 14, 14), (0.0, 0.0), (1.0, 1.0), train_domains=("+80%", "+90%"),
                       test_domains=("-90%",))


def readonly_dir(tmp: Path) -> Path | None:
    """A folder this process cannot write to: chmod for a normal user; root ignores permission bits, so a
    read-only mount then (/proc/sys in containers); None when neither exists."""
    if os.geteuid() != 0:
        d = tmp / "ro"
        d.mkdir(exist_ok=True)
        d.chmod(0o555)
        return d
    for d in (Path("/proc/sys"), Path("/sys/fs/cgroup")):
        if d.is_dir() and not os.access(d, os.W_OK):
            return d
    return None


class Evil:
    """A pickle that would create a file when unpickled by a full unpickler."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A template store (one FINISHED run in experiment "mnist") and checkpoints, built once."""
    from trainables.gaussian import Gaussian

    root = tmp_path_factory.mktemp("assets")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cl = mlflow_utils.client(uri)
    exp = mlflow_utils.ensure_experiment(cl, "mnist", uri)
    run_id = mlflow_utils.create_run(cl, exp, "done", {"role": "train"})
    mlflow_utils.close_run(cl, run_id, "FINISHED")
    torch.manual_seed(0)
    checkpoint.save(root / "model.pt", Gaussian({}, MNIST_INFO, epochs=1), epoch=1)
    (root / "garbage.pt").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"format": checkpoint.FORMAT, "x": Evil(str(root / "PWNED"))}, root / "evil.pt")
    return root, run_id


@pytest.fixture
def ws(assets, tmp_path, monkeypatch):
    """A working directory with a copy of the store and the checkpoints; no MLflow/Ray environment."""
    root, run_id = assets
    for name in ("mlflow.db", "model.pt", "garbage.pt", "evil.pt"):
        shutil.copy2(root / name, tmp_path / name)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "emptydir").mkdir()
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "SMOOTHING_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_STORAGE", str(tmp_path / "ray_results"))
    monkeypatch.chdir(tmp_path)
    return tmp_path, run_id


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if not p.is_dir()} | \
        {str(p.relative_to(folder)) + "/": (0, 0) for p in folder.rglob("*") if p.is_dir()}


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]      # closed again: nothing listens there


S = "sqlite:///{ws}/mlflow.db"
CASES = [
    # (id, command, argv, a fragment the one line must hold)
    ("train-unknown-trainable", "train", ["bogus"], "bogus"),
    ("train-lr-inf", "train", ["gaussian", "--set", "lr=inf"], "finite"),
    ("train-lr-nan", "train", ["gaussian", "--set", "lr=nan"], "finite"),
    ("train-lr-abc", "train", ["gaussian", "--set", "lr=abc"], "lr="),
    ("train-arch-bogus", "train", ["gaussian", "--set", "arch=bogus"], "architecture"),
    ("train-sigma-negative", "train", ["gaussian", "--set", "sigma=-1"], "sigma"),
    ("train-unknown-hparam", "train", ["gaussian", "--set", "nosuch=1"], "unknown hyperparameter"),
    ("train-set-without-equals", "train", ["gaussian", "--set", "lr"], "key=value"),
    ("train-batch-not-int", "train", ["gaussian", "--set", "batch_size=1.5"], "batch_size"),
    ("train-workers-0", "train", ["gaussian", "--workers", "0"], "--workers"),
    ("train-workers-abc", "train", ["gaussian", "--workers", "abc"], "invalid int"),
    ("train-unknown-flag", "train", ["gaussian", "--bogus"], "unrecognized"),
    ("train-budget-unknown", "train", ["gaussian", "--budget", "huge"], "invalid choice"),
    ("train-dataset-unknown", "train", ["gaussian", "--dataset", "nosuch"], "nosuch"),
    ("train-uri-scheme", "train", ["gaussian", "--tracking-uri", "foo://bar"], "unsupported scheme"),
    ("train-uri-http-refused", "train", ["gaussian", "--tracking-uri", "http://127.0.0.1:{port}"], "did not answer"),
    ("train-uri-mistyped-folder", "train", ["gaussian", "--tracking-uri", "sqlite:///{ws}/nosuch/mlflow.db"],
     "does not exist"),
    ("train-uri-under-file", "train", ["gaussian", "--tracking-uri", "sqlite:///{ws}/afile/mlflow.db"], "a file"),
    ("train-uri-read-only", "train", ["gaussian", "--tracking-uri", "sqlite:///{ro}/mlflow.db"], "not writable"),
    ("train-uri-credentials", "train", ["gaussian", "--tracking-uri", "http://alice:s3cret@127.0.0.1:{port}"],
     "***@"),
    ("sweep-unknown-name", "sweep", ["bogus"], "unknown sweep name"),
    ("sweep-space-lr-abc", "sweep", ["gaussian", "--space", "lr=abc"], "lr"),
    ("sweep-space-sigma-abc", "sweep", ["gaussian", "--space", "sigma=0.25,abc"], "sigma"),
    ("sweep-space-sigma-negative", "sweep", ["gaussian", "--space", "sigma=-1,0"], "sigma"),
    ("sweep-space-lr-inf", "sweep", ["gaussian", "--space", "lr=1e-3:inf"], "finite"),
    ("sweep-space-inverted", "sweep", ["gaussian", "--space", "lr=0.1:0.01"], "inverted"),
    ("sweep-space-empty", "sweep", ["gaussian", "--space", "lr="], "empty"),
    ("sweep-space-unknown", "sweep", ["gaussian", "--space", "nosuch=1,2"], "unknown parameter"),
    ("sweep-space-categorical", "sweep", ["glean", "--space", "penalty_estimator=bogus"], "not one of"),
    ("sweep-set-lr-inf", "sweep", ["gaussian", "--set", "lr=inf"], "finite"),
    ("sweep-trials-0", "sweep", ["gaussian", "--trials", "0"], "--trials"),
    ("sweep-concurrency-0", "sweep", ["gaussian", "--concurrency", "0"], "--concurrency"),
    ("sweep-cmaes-two-objectives", "sweep", ["gaussian", "--sampler", "cmaes", "--objectives", "acr,clean_acc"],
     "cmaes"),
    ("sweep-resume-nothing", "sweep", ["gaussian", "--resume", "--tracking-uri", S], "nothing to resume"),
    ("sweep-uri-scheme", "sweep", ["gaussian", "--tracking-uri", "foo://bar"], "unsupported scheme"),
    ("certify-no-model", "certify", [], "--checkpoint"),
    ("certify-missing-checkpoint", "certify", ["--checkpoint", "nosuch.pt"], "no checkpoint"),
    ("certify-garbage-checkpoint", "certify", ["--checkpoint", "garbage.pt"], "not a readable checkpoint"),
    ("certify-malicious-checkpoint", "certify", ["--checkpoint", "evil.pt"], "allow-list"),
    ("certify-n-below-n0", "certify", ["--checkpoint", "model.pt", "--n0", "100", "--n", "10"], "n0"),
    ("certify-alpha", "certify", ["--checkpoint", "model.pt", "--alpha", "2"], "alpha"),
    ("certify-shard-size-negative", "certify", ["--checkpoint", "model.pt", "--shard-size", "-1", "--out", "o"],
     "--shard-size"),
    ("certify-shard-size-0", "certify", ["--checkpoint", "model.pt", "--shard-size", "0", "--out", "o"],
     "--shard-size"),
    ("certify-skip-0", "certify", ["--checkpoint", "model.pt", "--skip", "0"], "--skip"),
    ("certify-max-0", "certify", ["--checkpoint", "model.pt", "--max", "0"], "--max"),
    ("certify-actors-0", "certify", ["--checkpoint", "model.pt", "--actors", "0"], "--actors"),
    ("certify-out-file", "certify", ["--checkpoint", "model.pt", "--out", "afile"], "is a file"),
    ("certify-out-under-file", "certify", ["--checkpoint", "model.pt", "--out", "afile/sub"], "is a file"),
    ("certify-out-read-only", "certify", ["--checkpoint", "model.pt", "--out", "{ro}/out"], "not writable"),
    ("certify-split-unknown", "certify", ["--checkpoint", "model.pt", "--split", "dev"], "invalid choice"),
    ("certify-address-refused", "certify", ["--checkpoint", "model.pt", "--address", "127.0.0.1:{port}"],
     "cannot reach a Ray cluster"),
    ("certify-resume-without-out", "certify", ["--resume"], "--out"),
    ("certify-resume-nothing", "certify", ["--resume", "--out", "emptydir"], "nothing to resume"),
    ("certify-run-no-store", "certify", ["--run-id", "abc", "--tracking-uri", "sqlite:///{ws}/none.db"],
     "no MLflow store"),
    ("certify-run-unknown", "certify", ["--run-id", "0123456789abcdef", "--tracking-uri", S], "unknown MLflow run"),
    ("certify-run-no-checkpoint", "certify", ["--run-id", "{run_id}", "--tracking-uri", S], "has no"),
    ("certify-skip-beyond-split", "certify", ["--checkpoint", "model.pt", "--skip", "100000000", "--out", "o"],
     "beyond"),
    ("compare-no-store", "compare", ["--tracking-uri", "sqlite:///{ws}/none.db"], "no MLflow store"),
    ("compare-default-store-absent", "compare", ["--tracking-uri", "sqlite:///{ws}/emptydir/mlflow.db"],
     "creates none"),
    ("compare-unknown-experiment", "compare", ["--tracking-uri", S, "--experiment", "nope"], "unknown experiment"),
    ("compare-unknown-run", "compare", ["--tracking-uri", S, "--runs", "0123456789abcdef"], "unknown run id"),
    ("compare-uncertified", "compare", ["--tracking-uri", S, "--experiment", "mnist"], "certify them first"),
    ("compare-radii", "compare", ["--tracking-uri", S, "--radii", "0,x"], "--radii"),
    ("compare-radii-negative", "compare", ["--tracking-uri", S, "--radii", "-1"], "--radii"),
    ("compare-out-file", "compare", ["--tracking-uri", S, "--out", "afile"], "a file"),
    ("compare-uri-http-refused", "compare", ["--tracking-uri", "http://127.0.0.1:{port}"], "did not answer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, ws, capsys):
    name, command, argv, fragment = case
    folder, run_id = ws
    ro = readonly_dir(folder)
    if "{ro}" in " ".join(argv) and ro is None:
        pytest.skip("no read-only folder available")
    fill = {"ws": folder, "port": refused_port(), "ro": ro, "run_id": run_id}
    argv = [a.format(**fill) for a in argv]
    before = snapshot(folder)
    capsys.readouterr()
    code = run_main(COMMANDS[command], argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert "s3cret" not in out + err                          # credentials are never printed
    assert snapshot(folder) == before                          # no store, no partial output, nothing touched
    cl = mlflow_utils.client(S.format(ws=folder))
    assert [r.info.status for r in cl.search_runs([e.experiment_id for e in cl.search_experiments()])] \
        == ["FINISHED"]
    assert not (folder.parent / "PWNED").exists() and not (folder / "PWNED").exists()


def test_suite_has_at_least_40_cases_over_the_four_commands():
    assert len(CASES) >= 40
    assert {c[1] for c in CASES} == set(COMMANDS)


def test_http_store_that_accepts_but_never_answers_times_out(ws, capsys, monkeypatch):
    """A server that accepts connections and says nothing: the probe's time-out, not a hang."""
    import time

    monkeypatch.setattr(mlflow_utils, "PROBE_TIMEOUT_S", 1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        code = run_main(train.main, ["gaussian", "--tracking-uri", uri])
        took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "did not answer" in err[0], err
    assert took < 10


# --- the value rules themselves -------------------------------------------------------------------------------
def test_a_malicious_pickle_is_refused_and_never_executed(assets, tmp_path):
    root, _ = assets
    target = tmp_path / "PWNED"
    for protocol in (2, 4):           # a crafted torch file, and plain pickles
        with open(tmp_path / f"evil{protocol}.pt", "wb") as f:
            pickle.dump({"format": checkpoint.FORMAT, "x": Evil(str(target))}, f, protocol=protocol)
    torch.save({"format": checkpoint.FORMAT, "x": Evil(str(target))}, tmp_path / "evil.pt")
    for name, match in [("evil.pt", "allow-list .posix.system"), ("evil2.pt", "allow-list"),
                        ("evil4.pt", "not a readable checkpoint")]:
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.read(tmp_path / name)
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.load(tmp_path / name)
    assert not target.exists()


def test_credentials_are_redacted_in_what_is_logged_and_printed(ws):
    uri = S.format(ws=ws[0])
    cl = mlflow_utils.client(uri)
    run_id = mlflow_utils.create_run(cl, mlflow_utils.ensure_experiment(cl, "x", uri), "r",
                                     {"server": "https://bob:hunter2@mlflow.example.org"})
    mlflow_utils.log_params(cl, run_id, {"store": "postgresql://u:pw123@db:5432/mlflow",
                                         "artifacts": "s3://bucket/x?X-Amz-Signature=abcdef&token=zzz"})
    run = cl.get_run(run_id)
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    for secret in ("hunter2", "pw123", "abcdef", "zzz"):
        assert secret not in logged
    assert "***@db:5432" in logged
    assert "hunter2" not in mlflow_utils.ui_command("http://bob:hunter2@host:5000")
    assert "--host 127.0.0.1" in mlflow_utils.ui_command(uri)      # the MLflow UI we suggest binds locally


def test_a_diverging_run_stops_as_failed_naming_epoch_and_step(ws, monkeypatch):
    """A run whose loss becomes non-finite stops at once, FAILED, saying where (it must not train on and log a
    model with NaN weights as FINISHED). Injected fault: the network's first weight becomes NaN before the
    third optimiser step, as after a divergence (lr=1e30 alone only kills LeNet's ReLUs: a finite loss)."""
    from trainables.gaussian import Gaussian

    folder, _ = ws
    uri = S.format(ws=folder)
    original, calls = Gaussian.update, []

    def update(self, x, y, d):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(self.net.parameters()).fill_(float("nan"))
        return original(self, x, y, d)

    monkeypatch.setattr(Gaussian, "update", update)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at epoch 1, step 3"):
        train.main(["gaussian", "--budget", "smoke", "--set", "batch_size=16", "--tracking-uri", uri])
    cl = mlflow_utils.client(uri)
    [run] = [r for r in cl.search_runs([e.experiment_id for e in cl.search_experiments()])
             if r.data.tags.get("trainable") == "gaussian"]
    assert run.info.status == "FAILED"
    assert "epoch 1, step 3" in run.data.tags["error"]


# --- certify: provenance and lock (real Ray, in this process) -------------------------------------------------
def _write_mnist(root: Path, test_images: "np.ndarray", test_labels: "np.ndarray") -> Path:
    """A data root holding MNIST's four IDX files (real format, small synthetic content: 5,100 training
    images, so that the last 5,000 form the validation split)."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (5100, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, 5100).astype(np.uint8)

    def idx(path: Path, array: "np.ndarray", magic: int) -> None:
        header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        path.write_bytes(header + array.astype(np.uint8).tobytes())

    idx(raw / "train-images-idx3-ubyte", train_x, 0x803)
    idx(raw / "train-labels-idx1-ubyte", train_y, 0x801)
    idx(raw / "t10k-images-idx3-ubyte", test_images, 0x803)
    idx(raw / "t10k-labels-idx1-ubyte", test_labels, 0x801)
    return root


def test_certify_resume_refuses_other_data_and_a_locked_out(assets, tmp_path, capsys):
    """Issue 15's first defect: `--resume --out OUT --data-root ALT` (valid MNIST, test order reversed) used to
    reuse every shard. Now the manifest records the data's provenance and the resume is refused, one line
    listing the difference; the same data resumes; a second certification on a locked OUT is refused."""
    import numpy as np

    from orchestrator.pool import exclusive_lock

    rng = np.random.default_rng(1)
    test_x, test_y = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20).astype(np.uint8)
    data = _write_mnist(tmp_path / "R", test_x, test_y)
    alt = _write_mnist(tmp_path / "ALT", test_x[::-1], test_y[::-1])
    out = tmp_path / "OUT"
    settings = ["--n0", "10", "--n", "100", "--alpha", "0.1", "--batch", "100", "--max", "6", "--shard-size", "2",
                "--actors", "1", "--no-progress"]
    assert certify.main(["--checkpoint", str(assets[0] / "model.pt"), "--data-root", str(data), "--out", str(out),
                         *settings]) == 0
    manifest = (out / "manifest.json").read_text()
    assert '"examples_sha256"' in manifest and '"recipe"' in manifest
    before = snapshot(out)
    capsys.readouterr()

    assert certify.main(["--resume", "--out", str(out), "--data-root", str(alt), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other data" in err[0] and "examples_sha256" in err[0], err
    assert snapshot(out) == before

    with exclusive_lock(out):
        assert certify.main(["--resume", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another certification" in err[0], err

    assert certify.main(["--resume", "--out", str(out), "--no-progress"]) == 0
    assert "computed 0 shards, reused 3" in capsys.readouterr().out


# --- sweep: provenance ------------------------------------------------------------------------------------------
def test_sweep_resume_refuses_other_data(ws, capsys):
    """Issue 15, "the same for sweep resume": sweep.json records the data a sweep was started on (content hashes
    of its selection and test examples and of a training sample); `--resume --data-root ALT` (valid MNIST, the
    test order reversed) is refused with one line naming what differs, before Ray starts or anything is written;
    the data it was started on passes the same check."""
    import json

    import numpy as np

    from orchestrator.budgets import get_budget
    from orchestrator.cli_common import load_splits, make_selection
    from orchestrator.provenance import sweep_data_identity

    folder, _ = ws
    rng = np.random.default_rng(1)
    test_x, test_y = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40).astype(np.uint8)
    data = _write_mnist(folder / "R", test_x, test_y)
    alt = _write_mnist(folder / "ALT", test_x[::-1], test_y[::-1])
    storage = folder / "ray_results"
    argv = ["gaussian", "--budget", "smoke", "--trials", "2", "--tracking-uri", S.format(ws=folder),
            "--storage", str(storage), "--resume"]
    assert run_main(sweep.main, argv + ["--data-root", str(data)]) == 2      # nothing to resume yet: its name
    prefix = capsys.readouterr().err.split("(")[-1].split("*")[0]
    budget = get_budget("smoke")
    splits = load_splits("mnist", str(data), budget, "gaussian")
    selection = make_selection(splits, None, budget.search_examples, budget.final_examples_for("gaussian"))
    identity = sweep_data_identity(splits, selection)
    (storage / f"{prefix}20261128-120000").mkdir(parents=True)
    state = {"status": "running", "tracking_uri": S.format(ws=folder), "data": identity}
    (storage / f"{prefix}20261128-120000" / "sweep.json").write_text(json.dumps(state))
    before = snapshot(folder)

    assert run_main(sweep.main, argv + ["--data-root", str(alt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other data" in err[0] and "test_examples_sha256" in err[0], err
    assert "train_sample_sha256" not in err[0]                 # the training split is the same
    assert snapshot(folder) == before

    recorded = (storage / f"{prefix}20261128-120000", state)
    sweep._check_resume_data(recorded, identity)             # the same data: no refusal
    splits_again = load_splits("mnist", str(data), budget, "gaussian")
    assert sweep_data_identity(splits_again, selection) == identity
