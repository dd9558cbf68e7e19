"""GPU paths (issue 12, item 5): run where CUDA is present, skipped with the reason elsewhere.

- one training epoch of every trainable on CUDA, every parameter and the optimiser's state on the GPU, and
  a checkpoint written there restored on the host and back (map_location through trainables.checkpoint);
- a 1-worker sweep smoke and a `--workers 2` sweep on one GPU (each DDP worker a fractional share);
- the certification pool on CUDA (actors take min(1, GPUs/actors) of a GPU, rows equal to one in-process
  certification on the same GPU);
- SyncBatchNorm with 2 NCCL ranks equals one process (needs 2 GPUs).
The CPU-side logic of each (device rule, resource arithmetic, DDP equivalence) is tested without a GPU in
tests/test_device.py, tests/test_ddp.py and tests/test_certify_pool.py.
"""
from __future__ import annotations

import pytest
import torch

from trainables.device import HOST, cuda_available, resolve_device

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(), reason="CUDA is not available on this machine "
                                 f"(torch {torch.__version__}); the GPU paths are proven by CPU equivalence tests")]


def _info(name: str):
    from trainables.data import DataInfo
    if name == "glean":
        return DataInfo("cmnist", 2, (2, 14, 14), (0.0, 0.0), (1.0, 1.0), train_domains=("a", "b"),
                        test_domains=("c",))
    return DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))


FAST = {"smoothadv": {"num_steps": 2}, "consistency": {"num_steps": 2}, "drf-smoothadv": {"num_steps": 2},
        "drf-consistency": {"num_steps": 2}, "smoothmix": {"num_steps": 2}, "glean": {"hidden": 32}}


@pytest.mark.parametrize("name", ["gaussian", "smoothadv", "consistency", "smoothmix", "macer", "stability",
                                  "drf-smoothadv", "drf-consistency", "glean"])
def test_one_epoch_of_each_trainable_on_cuda(name, tmp_path):
    from orchestrator.train_loop import LocalSession, LoopConfig, LoopData, run_training
    from trainables import checkpoint
    from torch.utils.data import TensorDataset

    info = _info(name)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, *info.input_shape, generator=g)
    y = torch.randint(0, info.num_classes, (64,), generator=g)
    d = torch.randint(0, max(1, info.num_train_domains), (64,), generator=g)
    data = LoopData(info, TensorDataset(x, y, d), x[:4], y[:4], [0, 1, 2, 3])
    cfg = LoopConfig(trainable=name, hparams={"batch_size": 32, **FAST.get(name, {})}, epochs=1,
                     eval_epochs=(1,), n0=10, n=100, cert_batch=100, device="cuda")
    report = run_training(cfg, data, LocalSession(tmp_path))
    assert torch.isfinite(torch.tensor(report["train_loss"]))
    trainable, _ = checkpoint.load(tmp_path / "model.pt", device=resolve_device("cuda"))
    assert all(p.is_cuda for p in trainable.net.parameters())
    back, _ = checkpoint.load(tmp_path / "model.pt", device=HOST)
    assert all(not p.is_cuda for p in back.net.parameters())


def test_sweep_smoke_one_worker_and_two_workers_sharing_one_gpu(ray_local, tmp_path):
    from orchestrator import sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for workers in ("1", "2"):
        rc = sweep.main(["gaussian", "--budget", "smoke", "--trials", "1", "--workers", workers,
                         "--tracking-uri", uri, "--storage", str(tmp_path / f"ray{workers}")])
        assert rc == 0


def test_certification_pool_on_cuda(ray_local, tmp_path):
    import pandas as pd

    from orchestrator.pool import actor_resources, certify_with_pool
    from trainables.registry import get_trainable
    from trainables.data import DataInfo

    info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
    t = get_trainable("gaussian")({}, info, device=resolve_device("cuda"))
    xs = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    data = [(xs[i], i % 10) for i in range(6)]
    _, options, _, kind = actor_resources(2)
    assert kind == "cuda" and 0 < options["num_gpus"] <= 1
    df = certify_with_pool(t, data, list(range(6)), out_dir=tmp_path / "out", n0=10, n=500, alpha=0.01,
                           batch=500, actors=2, progress=False, timeout_s=300)
    direct = t.certifier().certify_many(xs.to(t.device), [i % 10 for i in range(6)], list(range(6)), n0=10,
                                        n=500, alpha=0.01, batch_size=500)
    assert df["predict"].tolist() == [r.predict for r in direct]
    assert df["radius"].tolist() == pytest.approx([r.radius for r in direct])
    assert isinstance(df, pd.DataFrame)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm over NCCL needs 2 GPUs")
def test_sync_batchnorm_two_nccl_ranks_equal_one_process(tmp_path):
    """On GPUs BatchNorm becomes SyncBatchNorm: 2 NCCL ranks (cuda:0, cuda:1) train ResNet-110 as one process
    does on the global batch (tolerance 1e-4: cuDNN's reductions are not bitwise deterministic)."""
    import torch.multiprocessing as mp

    from test_ddp import _free_port, _max_rel, _outcome, _rank_main
    from orchestrator.train_loop import LocalSession

    out = str(tmp_path / "result")
    mp.spawn(_rank_main, args=(2, _free_port(), [("gaussian-bn", None)], out, "nccl", "cuda"), nprocs=2,
             join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False)[("gaussian-bn", None)] for r in range(2)]
    single = _outcome("gaussian-bn", LocalSession(), device="cuda:0")
    cpu = lambda p: {k: v.cpu() for k, v in p.items()}  # noqa: E731
    assert _max_rel(cpu(ranks[0]["params"]), cpu(ranks[1]["params"])) == 0.0
    assert _max_rel(cpu(ranks[0]["params"]), cpu(single["params"])) < 1e-4
