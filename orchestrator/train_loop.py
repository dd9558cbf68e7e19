"""The one training loop, for every trainable and every way it runs.

`run_training(cfg, data, session)` trains `cfg.trainable` for `cfg.epochs` epochs and reports every epoch
{epoch, world_size, train_<metric>..., step_metrics: [[global step, {name: value}], ...]}; after each epoch in
`cfg.eval_epochs` it also certifies the selection examples (the validation split, or the oracle's test-domain
hold-out) with the search settings and adds {val_acr, val_clean_acc} and a checkpoint. The final report's
checkpoint directory also holds the validation TSV and plot (at tracking.cert_*_artifact paths) and the
trainable's write_artifacts files, and the report the validation summary (<split>_acr, <split>_certacc_r*).
The loop never opens MLflow: whoever receives the reports logs them (orchestrator/mlflow_callback.py: the
sweep's driver-side Tune callback, or orchestrator.train). The `session` says where it runs:

- LocalSession: in this process, no Ray (`orchestrator.train` with one worker; the benchmark's direct call).
- TuneSession: directly inside a Ray Tune trial (one worker per trial; the sweep's default): `tune.report`.
- TrainSession: inside a Ray Train worker of a `TorchTrainer` (`--workers N >= 2`, DDP over gloo/NCCL):
  `ray.train.report` from every rank, the checkpoint from rank 0, the training data
  sharded by rank, the network wrapped by `ray.train.torch.prepare_model`. Inside a sweep the trainer's
  reports reach Tune through TuneReportCallback.

Data parallelism (W ranks: TrainSession, or ProcessGroupSession inside any torch.distributed group) trains the
single-process recipe: the recipe's batch_size B is the GLOBAL batch (B/W per rank; W must divide B), each epoch's
permutation is cut into global batches and rank r takes rows r, r+W, ... of each (DistributedSampler's sharding,
padded so every rank makes the same number of steps); the noise of every example is keyed by (seed, epoch, its
position in the epoch's stream) (trainables/batchkeys.py), so W ranks draw the noise one process draws; DRF's λ
and GLEAN's per-environment terms are computed over the global batch (trainables/distributed.py); the reported
training metrics are averaged over ranks; the validation certification is shared out over the ranks and gathered
(example i's certificate depends only on (seed, i), so the rows equal one process's). Batch norm: on GPUs the
network's BatchNorm layers become SyncBatchNorm (statistics over the global batch, as one process); torch's
SyncBatchNorm has no CPU implementation, so on CPU ranks each rank normalises its own B/W examples (stated
departure; the running statistics are averaged over the ranks before each evaluation and checkpoint). tests/test_ddp.py proves the equivalence.
Devices: trainables.device.session_device(cfg.device) (contract C1).

Checkpoints are directories holding `model.pt` written by trainables.checkpoint.save (self-describing: the
certify CLI can load it); they go through the Ray checkpoint API and are read back on resume by
`session.get_checkpoint()`, which restarts at the saved epoch.

Guarantees: the batch order of epoch e is a permutation drawn from a generator seeded by (seed, e), so a run
resumed from a checkpoint at epoch e trains on the same batches as an uninterrupted one; the validation
certificate of example i uses noise seeded by (seed, i) (certify_many), so every trial and every rung is scored
on the same noise. The final report is the loop's last act: a trial that the scheduler stops at its last
report never runs code after it.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator import tracking
from orchestrator.cli_common import raise_if_interrupted
from orchestrator.data_parallel import check_world, ddp_wrap, epoch_batches, epoch_steps, sync_batchnorm
from trainables.data import DataInfo

CHECKPOINT_FILE = "model.pt"


@dataclass
class LoopConfig:
    """What to train and how to score it (plain data: pickled to Ray trials and workers)."""

    trainable: str
    hparams: dict[str, Any]
    epochs: int
    eval_epochs: tuple[int, ...]          # finished-epoch counts after which to certify and report
    seed: int = 0
    selection: str = "train-domain"       # which examples score the model: "train-domain" | "oracle"
    n0: int = 100                         # certification of the selection examples (the search settings)
    n: int = 1000
    alpha: float = 0.001
    cert_batch: int = 1000
    device: str = "auto"                  # trainables.device.session_device's spec: auto | cpu | cuda[:K]
    report_extra: dict[str, Any] = field(default_factory=dict)   # added to every report (e.g. the MLflow run id)


@dataclass
class LoopData:
    """The training split and the selection examples: `sel_x` [k, *input_shape] in [0,1], `sel_y` [k],
    `sel_idx` their indices in their split (certify_many seeds example i's noise by (seed, i))."""

    info: DataInfo
    train: Any                             # a map-style dataset yielding (x, y, d)
    sel_x: torch.Tensor
    sel_y: torch.Tensor
    sel_idx: list[int]
    sel_split: str = "val"
    #: further selection sets certified at every evaluation, name -> (x, y, indices); reported as
    #: {name}_acr / {name}_clean_acc (the sweep's "oracle" test-domain hold-out: orchestrator/selection.py)
    extra_sets: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]] = field(default_factory=dict)


# --- where the loop runs --------------------------------------------------------------------------------------
class LocalSession:
    """No Ray: reports are kept in memory, checkpoints copied to `checkpoint_dir`."""

    rank, world = 0, 1

    def __init__(self, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, on_report=None):
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume = resume
        self.reports: list[dict[str, Any]] = []
        self.on_report = on_report   # on_report(metrics, checkpoint_dir or None): orchestrator.train logs there

    def get_checkpoint(self):
        from ray.train import Checkpoint

        if self.resume and self.checkpoint_dir and (self.checkpoint_dir / CHECKPOINT_FILE).exists():
            return Checkpoint.from_directory(str(self.checkpoint_dir))
        return None

    def wrap(self, net):
        return net

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if self.on_report is not None:
            self.on_report(metrics, checkpoint_dir)
        if checkpoint_dir and self.checkpoint_dir:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".tmp-{CHECKPOINT_FILE}"
            shutil.copy2(Path(checkpoint_dir) / CHECKPOINT_FILE, tmp)
            os.replace(tmp, self.checkpoint_dir / CHECKPOINT_FILE)  # atomic: never a half-written checkpoint
            for extra in Path(checkpoint_dir).iterdir():   # C3: the run's artifacts beside model.pt
                if extra.is_file() and extra.name != CHECKPOINT_FILE:
                    shutil.copy2(extra, self.checkpoint_dir / extra.name)


class TuneSession:
    """Directly inside a Ray Tune function trial."""

    rank, world = 0, 1

    def get_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def wrap(self, net):
        return net

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


class ProcessGroupSession(LocalSession):
    """Inside an already initialised torch.distributed process group without Ray (torchrun, or the test's
    torch.multiprocessing ranks): DDP wrapping by torch itself; reports kept in memory, rank 0's checkpoint
    copied to `checkpoint_dir`."""

    def __init__(self, checkpoint_dir: str | os.PathLike | None = None):
        import torch.distributed as dist

        super().__init__(checkpoint_dir if dist.get_rank() == 0 else None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def wrap(self, net):
        return ddp_wrap(net) if self.world > 1 else net


class TrainSession:
    """Inside a Ray Train worker (TorchTrainer): every rank reports, rank 0 attaches the checkpoint."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def wrap(self, net):
        import ray.train.torch

        if self.world == 1:
            return net
        return ray.train.torch.prepare_model(sync_batchnorm(net, next(net.parameters()).device))

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and self.rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


# --- data -----------------------------------------------------------------------------------------------------
def _tensors(ds) -> tuple[torch.Tensor, ...] | None:
    """(x, y, d) tensors of an in-memory split (trainables.data.TensorSplit, a TensorDataset or a Subset of
    one) without going example by example; None for other datasets."""
    from torch.utils.data import Subset, TensorDataset

    if all(hasattr(ds, a) for a in ("images", "labels", "domains")):      # trainables.data.TensorSplit
        x = ds.images
        return (x.float().div_(255.0) if x.dtype == torch.uint8 else x), ds.labels, ds.domains
    if isinstance(ds, TensorDataset):
        return tuple(ds.tensors)
    if isinstance(ds, Subset):
        inner = _tensors(ds.dataset)
        if inner is not None:
            idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
            return tuple(t[idx] for t in inner)
    return None


def materialize(ds, limit_bytes: int = 2 << 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The whole split as (x, y, d) tensors when it fits in `limit_bytes`; None for a large image folder."""
    t = _tensors(ds)
    if t is None:
        if len(ds) == 0:
            raise ValueError("the training split is empty")
        x0 = torch.as_tensor(ds[0][0])
        if x0.numel() * 4 * len(ds) > limit_bytes:
            return None
        items = [ds[i] for i in range(len(ds))]
        t = (torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items]),
             torch.as_tensor([int(it[1]) for it in items]),
             torch.as_tensor([int(it[2]) if len(it) > 2 else 0 for it in items]))
    x, y = t[0], t[1]
    d = t[2] if len(t) > 2 else torch.zeros(len(y), dtype=torch.long)
    return x.float(), y.long(), d.long()


# --- the loop -------------------------------------------------------------------------------------------------
def certify_selection(trainable, data: LoopData, cfg: LoopConfig, which: str | None = None, rank: int = 0,
                      world: int = 1):
    """Certified rows of the selection examples (or of extra set `which`) with the search settings.

    With W ranks each certifies examples rank, rank+W, ... and the rows are gathered on every rank in the
    examples' order: example i's noise is seeded by (seed, i), so the rows are one process's."""
    from trainables.distributed import gather_objects

    x, y, idx = (data.sel_x, data.sel_y, data.sel_idx) if which is None else data.extra_sets[which]
    part = slice(rank, None, world)
    rows = trainable.certifier().certify_many(x[part], y[part].tolist(), idx[part], n0=cfg.n0, n=cfg.n,
                                              alpha=cfg.alpha, batch_size=cfg.cert_batch, seed=cfg.seed)
    if world == 1:
        return rows
    shards = gather_objects(rows)
    return [shards[i % world][i // world] for i in range(len(idx))]


def selection_metrics(rows, prefix: str = "val") -> dict[str, float]:
    """{prefix}_acr and {prefix}_clean_acc (certified accuracy at radius 0) of certified rows."""
    from trainables import metrics as M

    return {f"{prefix}_acr": float(M.acr(rows)),
            f"{prefix}_clean_acc": float(M.certified_accuracy(rows, (0.0,))[0.0])}


def run_training(cfg: LoopConfig, data: LoopData, session) -> dict[str, Any]:
    """Train, evaluate at cfg.eval_epochs and report (see the module docstring). Returns the last report."""
    from trainables import checkpoint as ckpt_io
    from trainables.registry import get_trainable

    from trainables.batchkeys import mix
    from trainables.device import session_device
    from trainables.distributed import average_buffers, mean_metrics

    rank0 = session.rank == 0
    torch.manual_seed(cfg.seed)                  # identical initial weights on every rank (DDP also broadcasts)
    cls = get_trainable(cfg.trainable)
    trainable = cls(cfg.hparams, data.info, epochs=cfg.epochs, device=session_device(cfg.device))
    if session.rank:   # draws not keyed by BatchKeys (e.g. SmoothMix's mixing weights) must differ between ranks
        torch.manual_seed(mix(cfg.seed, session.rank))
    start = 0
    restored = session.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            blob = ckpt_io.read(Path(d) / CHECKPOINT_FILE)
        trainable.load_state_dict(blob["state"])
        start = int(blob["epoch"])
    trainable.distribute(session.wrap)

    tensors = materialize(data.train)
    n_train = len(tensors[1]) if tensors is not None else len(data.train)
    batch_size = int(trainable.hparams.get("batch_size") or 256)
    if batch_size < n_train:
        check_world(batch_size, session.world)
    last: dict[str, Any] = {}
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        if hasattr(trainable, "epoch_steps"):    # a trainable's own batching (GLEAN: every environment per batch)
            domains = tensors[2] if tensors is not None else data.train.domains
            steps_iter = trainable.epoch_steps(domains, cfg.seed, epoch, session.rank, session.world)
        else:
            steps_iter = epoch_steps(n_train, batch_size, cfg.seed, epoch, session.rank, session.world)
        for idx, keys in steps_iter:
            raise_if_interrupted()
            trainable.set_batch_keys(keys)
            if tensors is not None:
                x, y, d = (t[idx] for t in tensors)
            else:
                from torch.utils.data import default_collate
                x, y, d = default_collate([data.train[int(i)] for i in idx])[:3]
            for k, v in trainable.update(x, y, d).items():
                if "loss" in k and not math.isfinite(float(v)):   # diverged: stop as FAILED, say where
                    raise FloatingPointError(f"non-finite {k} ({float(v)}) at epoch {epoch + 1}, step {steps + 1}:"
                                             " training diverged; lower lr or check the data")
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
        epoch_metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        epoch_metrics.update({k: float(v) for k, v in trainable.end_epoch(epoch).items()})
        epoch_metrics["epoch_time_s"] = time.perf_counter() - t0
        epoch_metrics = mean_metrics(epoch_metrics, maximum=("epoch_time_s",))   # over ranks (identity in one)
        done = epoch + 1
        # every epoch is reported (C4): the driver logs it to MLflow once (deduplicated by epoch), so a crash
        # loses no finished epoch; only evaluation epochs add validation metrics and a checkpoint
        step_metrics = trainable.step_metrics()
        report: dict[str, Any] = {**cfg.report_extra, tracking.EPOCH: done, "world_size": session.world,
                                  **{f"train_{k}": v for k, v in epoch_metrics.items()},
                                  "step_metrics": [[int(s), dict(m)] for s, m in step_metrics]}
        if done not in cfg.eval_epochs and done != cfg.epochs:
            last = report
            session.report(report, None)
            continue
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            average_buffers(trainable.net)   # one model on every rank (per-rank BatchNorm statistics on CPUs)
            rows = certify_selection(trainable, data, cfg, None, session.rank, session.world)
            report.update(selection_metrics(rows))
            for name in data.extra_sets:      # e.g. oracle_acr: every protocol's metric at every evaluation
                report.update(selection_metrics(
                    certify_selection(trainable, data, cfg, name, session.rank, session.world), name))
            if rank0:
                ckpt_io.save(Path(tmp) / CHECKPOINT_FILE, trainable, done,
                             extra={k: v for k, v in report.items() if isinstance(v, (int, float))})
                if done == cfg.epochs:   # the final report carries the run's artifacts in its checkpoint dir
                    _final_artifacts(trainable, cfg, data, rows, Path(tmp))
            if done == cfg.epochs:       # every rank reports the same summary (the rows are gathered on each)
                report.update(_selection_summary(data, rows))
            last = report
            session.report(report, tmp)
    return last


def _selection_summary(data: LoopData, rows) -> dict[str, float]:
    """The validation summary metrics (`<split>_acr`, certified accuracies, abstain rate) of certified rows."""
    from trainables import metrics as M
    from trainables.metrics import RADII_BY_DATASET

    return M.summarize(rows, RADII_BY_DATASET.get(data.info.name, (0.0,)), prefix=f"{data.sel_split}_")


def _final_artifacts(trainable, cfg: LoopConfig, data: LoopData, rows, directory: Path) -> None:
    """Write the validation certification (TSV + plot, at their tracking.cert_*_artifact paths) and the
    trainable's own files (C3 write_artifacts) beside model.pt."""
    from orchestrator.pool import model_fingerprint
    from trainables import metrics as M
    from trainables.metrics import RADII_BY_DATASET

    radii = RADII_BY_DATASET.get(data.info.name, (0.0,))
    tsv = directory / tracking.cert_tsv_artifact(data.sel_split)
    tsv.parent.mkdir(parents=True, exist_ok=True)
    M.write_tsv(rows, tsv, meta={"sigma": trainable.sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
                                 "seed": cfg.seed, "fingerprint": model_fingerprint(trainable)})
    M.plot_certified_accuracy({f"{cfg.trainable} ({data.sel_split})": M.read_tsv(tsv)},
                              directory / tracking.cert_plot_artifact(data.sel_split), radii=radii)
    trainable.write_artifacts(directory)


# --- Ray entry points (module-level functions: picklable) ------------------------------------------------------
def train_worker(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of a TorchTrainer: config = {"cfg": LoopConfig, "data": LoopData or ObjectRef}."""
    import ray

    data = config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    run_training(config["cfg"], data, TrainSession())


def describe_exception(exc: BaseException) -> str:
    """One line: the exception type and message, plus the innermost frame of the project's code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


__all__ = ["LoopConfig", "LoopData", "LocalSession", "TuneSession", "TrainSession", "ProcessGroupSession",
           "run_training", "train_worker", "materialize", "epoch_batches", "epoch_steps", "check_world", "ddp_wrap",
           "certify_selection", "describe_exception", "CHECKPOINT_FILE"]
