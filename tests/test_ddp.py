"""Data-parallel training is the single-process recipe: the proof (issue 12, item 3).

Two gloo ranks (plain processes from torch.multiprocessing, a free port, no Ray) train `gaussian`,
`drf-smoothadv` and `glean` through the one training loop (orchestrator.train_loop.run_training) over the same
global batches as one process. After k steps:
- the ranks' parameters are identical to each other and within 1e-5 (relative) of one process's;
- DRF's λ is identical on both ranks and equal to one process's;
- the validation certification, shared out over the ranks, gives one process's rows (hence the same ACR);
- the reported (rank-averaged) training metrics equal one process's.
Each collective is then removed in turn (monkeypatched in the ranks) and the same comparison must FAIL: the test
would catch the loss of any all-reduce. Batch norm (resnet110): CPU ranks keep per-rank statistics (torch's
SyncBatchNorm does not run on CPUs; trainables' stated choice), tested: ranks agree, one process differs; on GPUs
the layers become SyncBatchNorm (conversion tested here, the numbers in tests/test_gpu.py).

The ranks run one case after another in one spawn (~10-20 s in all on 2 shared cores).
"""
from __future__ import annotations

import socket
from unittest import mock

import pytest
import torch

from orchestrator.train_loop import (LocalSession, LoopConfig, LoopData, epoch_steps, run_training,
                                     sync_batchnorm)
from trainables.data import DataInfo

MNIST = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
CMNIST = DataInfo("cmnist", 2, (2, 14, 14), (0.0, 0.0), (1.0, 1.0), train_domains=("+80%", "+90%"),
                  test_domains=("-90%",))
TINY_CIFAR = DataInfo("cifar10", 10, (3, 8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

#: name -> (data info, training examples, hyperparameters). Batches: W * m divides B (SmoothAdv's chunks).
CASES: dict[str, tuple[DataInfo, int, dict]] = {
    "gaussian": (MNIST, 48, {"batch_size": 16, "lr": 0.05}),
    "drf-smoothadv": (MNIST, 32, {"batch_size": 16, "num_noise_vec": 2, "num_steps": 2, "kappa": 5,
                                  "zeta": 0.5, "lr": 0.05, "lam0": 0.05}),   # a λ at which distances differ
    "glean": (CMNIST, 64, {"batch_size": 32, "hidden": 16, "anneal_steps": 2, "lam": 50.0, "lr": 0.01}),
    "glean-two-half": (CMNIST, 64, {"batch_size": 32, "hidden": 16, "anneal_steps": 1, "lam": 50.0,
                                    "penalty_estimator": "two_half"}),
    "gaussian-bn": (TINY_CIFAR, 16, {"batch_size": 8, "lr": 0.05}),
}
#: collectives removed one at a time in the ranks (target, replacement) -> the case that must then differ
SABOTAGE: dict[str, tuple[str, str]] = {
    "noise keys": ("gaussian", "trainables.base.Trainable.set_batch_keys"),
    "metric mean": ("gaussian", "trainables.distributed.mean_metrics"),
    "DRF distance gather": ("drf-smoothadv", "trainables.drf.gather_in_order"),
    "GLEAN all-reduce": ("glean", "trainables.distributed.all_reduce_sum"),
    "GLEAN gradient scale": ("glean", "trainables.distributed.scaled_for_ddp"),
    "GLEAN global halves": ("glean-two-half", "trainables.distributed.env_ordinals"),
    "BatchNorm statistics average": ("gaussian-bn", "trainables.distributed.average_buffers"),
}
EPOCHS = 2
RTOL = 1e-5


def _identity_for(target: str):
    if target.endswith("set_batch_keys"):
        return lambda self, keys: None
    if target.endswith("mean_metrics"):
        return lambda metrics, maximum=(): dict(metrics)
    if target.endswith("average_buffers"):
        return lambda module: None
    if target.endswith("gather_in_order"):
        return lambda values, rows: values
    if target.endswith("env_ordinals"):
        from trainables import distributed
        local = distributed.env_ordinals
        return lambda d, rows: local(d, None)
    return lambda t: t


def _data(case: str) -> LoopData:
    info, n, _ = CASES[case]
    g = torch.Generator().manual_seed(7)
    x = torch.rand(n, *info.input_shape, generator=g)
    y = torch.randint(0, info.num_classes, (n,), generator=g)
    d = torch.randint(0, max(1, info.num_train_domains), (n,), generator=g)
    from torch.utils.data import TensorDataset
    k = 6
    return LoopData(info, TensorDataset(x, y, d), x[:k].clone(), y[:k].clone(), list(range(100, 100 + k)))


def _config(case: str, device: str = "cpu") -> LoopConfig:
    name = case.split("-two-half")[0].replace("-bn", "")
    hparams = dict(CASES[case][2])
    if case == "gaussian-bn":
        hparams["arch"] = "resnet110"
    return LoopConfig(trainable=name, hparams=hparams, epochs=EPOCHS, eval_epochs=(EPOCHS,), seed=3, n0=10, n=64,
                      alpha=0.01, cert_batch=64, device=device)


def _outcome(case: str, session, device: str = "cpu") -> dict:
    """Train the case in `session`; return the final parameters, λ (DRF) and the report's figures."""
    from trainables.registry import get_trainable

    captured = {}
    cls = get_trainable(_config(case).trainable)
    end_epoch = cls.end_epoch

    def capture(self, epoch):   # keep the trainable, to read its final state (after the last evaluation)
        captured["trainable"] = self
        return end_epoch(self, epoch)

    with mock.patch.object(cls, "end_epoch", capture):
        report = run_training(_config(case, device), _data(case), session)
    t = captured["trainable"]
    return {"params": {k: v.detach().clone() for k, v in t.net.state_dict().items()}, "lam": getattr(t, "lam", None),
            "report": {k: v for k, v in report.items() if isinstance(v, float) and "time" not in k}}


def _rank_main(rank: int, world: int, port: int, jobs: list, out: str, backend: str = "gloo",
               device: str = "cpu") -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":                       # tests/test_gpu.py: one GPU per rank
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from orchestrator.train_loop import ProcessGroupSession
    results = {}
    try:
        for case, target in jobs:
            if target is None:
                results[(case, None)] = _outcome(case, ProcessGroupSession(), device)
            else:
                with mock.patch(target, _identity_for(target)):
                    results[(case, target)] = _outcome(case, ProcessGroupSession(), device)
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out}.{rank}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """{(case, sabotage target or None): [rank 0 outcome, rank 1 outcome]} from one 2-process gloo group."""
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("ddp") / "result")
    jobs = [(case, None) for case in CASES] + [(case, target) for case, target in SABOTAGE.values()]
    mp.spawn(_rank_main, args=(2, _free_port(), jobs, out), nprocs=2, join=True)
    per_rank = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    return {key: [per_rank[0][key], per_rank[1][key]] for key in per_rank[0]}


@pytest.fixture(scope="module")
def one_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {case: _outcome(case, LocalSession()) for case in CASES}
    finally:
        torch.set_num_threads(threads)


def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        if x.is_floating_point():
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp(min=1e-12)))
        else:
            worst = max(worst, float((x != y).any()))
    return worst


def _differences(ranks: list, single: dict) -> list[str]:
    """What differs between the two ranks' run and one process's (empty: equivalent)."""
    diffs = []
    if _max_rel(ranks[0]["params"], ranks[1]["params"]) != 0.0:
        diffs.append("ranks' parameters differ")
    rel = _max_rel(ranks[0]["params"], single["params"])
    if rel > RTOL:
        diffs.append(f"parameters differ from one process's (max relative {rel:.2e})")
    for r in ranks:
        if single["lam"] is not None and abs(r["lam"] - single["lam"]) > RTOL * max(1.0, abs(single["lam"])):
            diffs.append(f"lambda {r['lam']} != one process's {single['lam']}")
    for key, value in single["report"].items():
        for r in ranks:
            if abs(r["report"][key] - value) > RTOL * max(1.0, abs(value)):
                diffs.append(f"{key} {r['report'][key]} != one process's {value}")
    return diffs


@pytest.mark.parametrize("case", ["gaussian", "drf-smoothadv", "glean", "glean-two-half"])
def test_two_gloo_ranks_train_what_one_process_trains(case, two_ranks, one_process):
    ranks, single = two_ranks[(case, None)], one_process[case]
    assert _differences(ranks, single) == []
    assert "val_acr" in single["report"]   # compared with the other figures (1e-5 relative) above
    if case == "drf-smoothadv":   # λ moved (κ = 5 < the chunk of 8: the FIFO and its order matter)
        assert single["lam"] != CASES[case][2].get("lam0", 1.0)


@pytest.mark.parametrize("what", list(SABOTAGE))
def test_the_comparison_fails_without_each_collective(what, two_ranks, one_process):
    case, target = SABOTAGE[what]
    diffs = _differences(two_ranks[(case, target)], one_process[case])
    if case == "gaussian-bn":   # differs from one process anyway (per-rank statistics): the ranks must split
        diffs = [d for d in diffs if d == "ranks' parameters differ"]
    assert diffs, f"removing the {what} went unnoticed"


def test_batch_norm_on_cpu_ranks_uses_per_rank_statistics(two_ranks, one_process):
    """The stated choice: on CPUs each rank normalises its B/W examples. Ranks stay identical (DDP averages the
    gradients; the running statistics are averaged before evaluation), but they train something slightly
    different from one process."""
    ranks, single = two_ranks[("gaussian-bn", None)], one_process["gaussian-bn"]
    assert _max_rel(ranks[0]["params"], ranks[1]["params"]) == 0.0
    assert _max_rel(ranks[0]["params"], single["params"]) > RTOL


def test_sync_batchnorm_conversion_for_gpus_keeps_parameters_and_state_keys():
    from torch import nn

    from trainables.models import build_model
    net = build_model("resnet110", TINY_CIFAR)
    keys, params = list(net.state_dict()), [id(p) for p in net.parameters()]
    assert sync_batchnorm(net, torch.device("cpu")) is net and not any(
        isinstance(m, nn.SyncBatchNorm) for m in net.modules())               # CPU: unchanged
    out = sync_batchnorm(net, torch.device("cuda", 0))                      # conversion itself needs no GPU
    assert out is net
    bn = sum(type(m) is nn.BatchNorm2d for m in build_model("resnet110", TINY_CIFAR).modules())
    assert bn > 100 and sum(isinstance(m, nn.SyncBatchNorm) for m in net.modules()) == bn
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == params


def test_global_batches_are_cut_before_sharding():
    """W ranks hold exactly the global batches of one process (rows r::W), padded to equal sizes."""
    one = [(idx, keys) for idx, keys in epoch_steps(12, 4, seed=1, epoch=2)]
    two = [list(epoch_steps(12, 4, seed=1, epoch=2, rank=r, world=2)) for r in (0, 1)]
    for s, (idx, keys) in enumerate(one):
        merged = torch.empty_like(idx)
        for r in (0, 1):
            i, k = two[r][s]
            assert k.size == keys.size == 4 and (k.seed, k.epoch, k.step) == (1, 2, s)
            merged[k.rows] = i
        assert torch.equal(merged, idx)
    with pytest.raises(ValueError, match="not divisible by 3 workers"):
        list(epoch_steps(12, 4, seed=1, epoch=0, rank=0, world=3))
    # a batch larger than the data: one global batch of the padded epoch (13 -> 14 for 2 ranks)
    steps = [list(epoch_steps(13, 100, seed=0, epoch=0, rank=r, world=2)) for r in (0, 1)]
    assert [len(s) for s in steps] == [1, 1] and all(len(s[0][0]) == 7 for s in steps)


def test_noise_of_an_example_does_not_depend_on_the_world_size():
    from trainables.batchkeys import BatchKeys

    whole = BatchKeys.local(3, 1, 5, 8).normal((2, 3), torch.device("cpu"))
    for world in (2, 4):
        for r in range(world):
            rows = torch.arange(r, 8, world)
            part = BatchKeys(3, 1, 5, rows, 8).normal((2, 3), torch.device("cpu"))
            assert torch.equal(part, whole[rows])
    assert not torch.equal(whole, BatchKeys.local(3, 1, 6, 8).normal((2, 3), torch.device("cpu")))
