"""The device rule (contract C1), GPU actor resources and bad device input, all checked without a GPU.

- resolve_device / session_device / ray_assigned_gpu against their documented rules (CUDA availability and
  Ray's GPU assignment are the injected facts);
- no module but trainables/device.py names a device type literally;
- the certification pool's resource arithmetic: num_gpus = min(1, GPUs / actors), `--device cpu|cuda`;
- an actor that dies on every shard is restarted a bounded number of times, then the run fails naming the shard;
- `--device cuda` without CUDA, and a batch not divisible by --workers: one line on stderr, exit 2, nothing written.
"""
from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest
import torch

from trainables import device as D

from stderr import ours

REPO = Path(__file__).resolve().parents[1]


def test_resolve_device_rules(monkeypatch):
    monkeypatch.setattr(D, "cuda_available", lambda: False)
    assert D.resolve_device("auto") == D.resolve_device(None) == torch.device("cpu")
    assert D.resolve_device("CPU") == D.HOST
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available") as err:
            D.resolve_device(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown device"):
        D.resolve_device("gpu0")
    with pytest.raises(ValueError, match="unsupported device"):
        D.resolve_device("meta")
    monkeypatch.setattr(D, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("auto") == torch.device("cuda", 0)
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        D.resolve_device("cuda:2")
    assert D.check_spec("cuda:7") == "cuda:7"
    with pytest.raises(ValueError):
        D.check_spec("tpu")


def test_session_device_outside_ray_follows_the_spec(monkeypatch):
    monkeypatch.setattr(D, "cuda_available", lambda: False)
    assert D.session_device("auto") == D.HOST
    assert D.session_device("cpu") == D.HOST
    with pytest.raises(ValueError):
        D.session_device("cuda")


def test_the_gpu_ray_assigned_is_found_through_cuda_visible_devices(monkeypatch):
    import ray

    monkeypatch.setattr(D, "cuda_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(D, "_in_train_worker", lambda: False)   # (asking Ray would start one: none runs here)
    monkeypatch.setattr(D, "_in_ray_worker", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")            # Ray's default: only the assigned GPU visible
    assert D.ray_assigned_gpu() == torch.device("cuda", 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert D.ray_assigned_gpu() == torch.device("cuda", 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")                 # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    assert D.ray_assigned_gpu() == torch.device("cuda", 3)
    assert D.session_device("auto") == torch.device("cuda", 3)
    assert D.session_device("cpu") == D.HOST                    # an explicit cpu always wins
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert D.ray_assigned_gpu() is None


def _device_literals(path: Path) -> list[str]:
    """String literals naming a device type ("cpu", "cuda", "cuda:K") that are not dictionary keys (Ray's
    resource names {"cpu": 1} are resources, not devices) and not inside a docstring/help text."""
    found = []
    toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for i, tok in enumerate(toks):
        if tok.type != tokenize.STRING:
            continue
        try:
            value = eval(tok.string)   # noqa: S307 (a literal from our own source)
        except Exception:
            continue
        if not isinstance(value, str) or value not in ("cpu", "cuda") and not value.startswith("cuda:"):
            continue
        nxt = next((t for t in toks[i + 1:] if t.type not in (tokenize.NL, tokenize.NEWLINE)), None)
        if nxt is not None and nxt.string == ":":
            continue
        found.append(f"{path.relative_to(REPO)}:{tok.start[0]}: {tok.string}")
    return found


def test_no_module_but_the_device_rule_names_a_device_type():
    files = [p for d in ("trainables", "orchestrator") for p in (REPO / d).glob("*.py")
             if p.name != "device.py"]
    assert [hit for p in files for hit in _device_literals(p)] == []


@pytest.mark.parametrize("cluster, actors, expected_actors, gpus_each, kind", [
    ({"CPU": 2}, None, 2, None, "cpu"),
    ({"CPU": 16, "GPU": 4}, None, 4, 1.0, "cuda"),     # default: one actor per GPU
    ({"CPU": 16, "GPU": 4}, 2, 2, 1.0, "cuda"),        # fewer actors than GPUs: one whole GPU each, never 2
    ({"CPU": 16, "GPU": 1}, 2, 2, 0.5, "cuda"),        # more actors than GPUs: a fractional share
    ({"CPU": 16, "GPU": 2}, 3, 3, 2 / 3, "cuda"),
])
def test_actor_gpu_shares(cluster, actors, expected_actors, gpus_each, kind):
    from orchestrator.pool import actor_resources

    n, options, threads, device_type = actor_resources(actors, cluster)
    assert (n, threads, device_type) == (expected_actors, 1, kind)
    assert options.get("num_gpus") == (pytest.approx(gpus_each) if gpus_each else None)
    assert options["num_cpus"] == min(1.0, cluster["CPU"] / n)


def test_actor_device_choice():
    from orchestrator.pool import CertifyInputError, actor_resources

    assert "num_gpus" not in actor_resources(2, {"CPU": 4, "GPU": 2}, device="cpu")[1]
    with pytest.raises(CertifyInputError, match="has no GPU"):
        actor_resources(2, {"CPU": 4}, device="cuda")


def test_an_actor_that_always_dies_fails_the_run_naming_its_shard(ray_local, tmp_path):
    import os

    from orchestrator import pool
    from trainables.data import DataInfo
    from trainables.registry import get_trainable

    class DyingWorker(pool.CertifyWorker):   # the injected fault: the process exits in every shard
        def certify(self, *args, **kwargs):
            os._exit(1)

    info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
    t = get_trainable("gaussian")({"arch": "mlp3"}, info)
    data = [(torch.rand(1, 28, 28), 0) for _ in range(4)]
    shards = [[0, 1], [2, 3]]
    (tmp_path / pool.SHARD_DIR).mkdir()
    resources = pool.actor_resources(1, {"CPU": 1})
    with pytest.raises(pool.ShardFailedError, match=r"certification shard 0 \(examples 0\.\.1, test split\) "
                                                    r"failed after up to 1 actor restarts"):
        pool._run_pool(pool._checkpoint_bytes(t), data, shards, [0, 1], tmp_path, resources,
                       dict(n0=10, n=100, alpha=0.01, batch=100, seed=0), "test", False, None, 120,
                       max_restarts=1, worker_cls=DyingWorker)
    assert not list((tmp_path / pool.SHARD_DIR).iterdir())


def _exit2(main, argv, capsys, *nothing: Path) -> str:
    from orchestrator.cli_common import run_main

    rc = run_main(main, argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(ours(err)) == 1, err
    for p in nothing:
        assert not p.exists(), f"{p} was written"
    return err


def test_train_device_cuda_without_cuda_exits_2(tmp_path, capsys, monkeypatch):
    from orchestrator import train

    monkeypatch.setattr(D, "cuda_available", lambda: False)
    db = tmp_path / "m.db"
    err = _exit2(train.main, ["gaussian", "--budget", "smoke", "--device", "cuda", "--tracking-uri",
                              f"sqlite:///{db}"], capsys, db)
    assert "CUDA is not available" in err
    err = _exit2(train.main, ["gaussian", "--budget", "smoke", "--device", "tpu", "--tracking-uri",
                              f"sqlite:///{db}"], capsys, db)
    assert "unknown device" in err


def test_train_batch_not_divisible_by_workers_exits_2(tmp_path, capsys):
    from orchestrator import train

    db = tmp_path / "m.db"
    err = _exit2(train.main, ["gaussian", "--budget", "smoke", "--workers", "2", "--set", "batch_size=33",
                              "--tracking-uri", f"sqlite:///{db}"], capsys, db)
    assert "batch_size 33 is not divisible by 2 workers" in err


def test_certify_device_cuda_on_a_cluster_without_gpus_exits_2(ray_local, tmp_path, capsys):
    from orchestrator import certify
    from trainables import checkpoint
    from trainables.data import DataInfo
    from trainables.registry import get_trainable

    if ray_local.cluster_resources().get("GPU", 0):
        pytest.skip("this cluster has GPUs")
    info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))   # no source: no "trained on other data" warning
    ckpt = checkpoint.save(tmp_path / "model.pt", get_trainable("gaussian")({"arch": "mlp3"}, info), epoch=1)
    out = tmp_path / "out"
    rc = certify.main(["--checkpoint", str(ckpt), "--out", str(out), "--device", "cuda", "--max", "2",
                       "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(ours(err)) == 1 and "has no GPU" in err, err
    assert not out.exists()
