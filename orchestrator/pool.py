"""Cohen et al.'s CERTIFY over a dataset split, sharded across a fault-tolerant, resumable pool of Ray actors.

    df = certify_with_pool(trainable_or_checkpoint, data, indices, n0=..., n=..., alpha=..., batch=...,
                           seed=..., actors=None, out_dir="certify-out/x")

Guarantees
- Results do not depend on sharding or on the number of actors: example `idx` is certified with noise from a
  generator seeded by (seed, idx) (`Smooth.certify_many`), so 1 actor and 3 actors give the same rows
  (apart from the `time` column).
- Fault tolerance: actors are `@ray.remote(max_restarts=3, max_task_retries=3)`. An actor that dies is
  restarted by Ray (its `__init__` runs again and reloads the model) and its in-flight shard is rerun; a shard
  whose actor dies more often than that (or whose certification raises) ends the run with `ShardFailedError`
  naming the shard and its examples (finished shards stay on disk: a rerun resumes).
- Resumability: every finished shard is written to `out_dir/shards/` as soon as it completes, atomically
  (temporary file + `os.replace`), by the driver. A rerun with the same `out_dir` reads the finished shards
  and computes only the others, so a killed driver loses at most the shards that were in flight.
  The driver, not the actor, writes shards: `out_dir` need not be visible from the worker nodes, and a retried
  task's result reaches the driver once, so writes are idempotent by construction.
- `out_dir/manifest.json` records the model's fingerprint (a hash of its weights, not of the file holding
  them) and every setting that changes the rows (split, indices, n0, n, alpha, batch, seed, shard size,
  device type). An output directory holding another model's or other settings' shards is refused
  (`CertifyInputError`), never mixed.
- The final TSV (`out_dir/<split>.tsv`, Cohen's columns sorted by idx) is written only once every shard is
  done; until then only `shards/` and a manifest with `"complete": false` exist.

Resources (choices; the issue leaves them open): by default one actor per CPU of the cluster (one per GPU when
the cluster has GPUs). Each actor holds one CPU (a share, CPUs / actors, when there are more actors than CPUs,
so that all of them can be scheduled) and runs torch with one thread: one single-threaded process per core is
what measured fastest on this machine (shared/notes/ray-2.60-on-2-cpus.md; benchmarks/RESULTS.md). With GPUs
each actor also gets min(1, GPUs / actors) of a GPU (Ray accepts whole GPUs or a fraction below 1; more actors
than GPUs share them) and works on the GPU Ray assigned it (trainables.device.session_device).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from orchestrator.cli_common import install_signal_handlers
from orchestrator.pool_actors import ACTOR_ENV, CertifyWorker, actor_resources
from orchestrator.pool_manifest import (DATA_COMPARED, LOCK_FILE, MANIFEST, MANIFEST_FORMAT, SHARD_DIR,  # noqa: F401
                                        CertifyInputError, atomic_write_text, atomic_write_tsv, check_out_dir,
                                        check_resume, exclusive_lock, prepare_out_dir, read_manifest, shard_path)
from orchestrator.provenance import example
from orchestrator.provenance import examples_sha256  # noqa: F401  (certify imports it from here)
from trainables import checkpoint
from trainables.device import HOST
from trainables.smoothing import ALPHA, BATCH_SIZE, N, N0, min_certify_n

#: default work per shard, in noise samples: 1e6 is about a minute of LeNet on one CPU core (seconds on a
#: GPU), so a killed driver or actor loses little while the per-shard overhead (milliseconds) stays small.
SAMPLES_PER_SHARD = 1_000_000
#: bytes per chunk of the checkpoint sent to an actor (below Ray's 100 KiB inlining threshold)
MODEL_CHUNK = 64 << 10
#: restarts of a dying actor (and retries of its shard) before the run fails naming the shard
MAX_RESTARTS = 3
#: a certification of at most this many noise samples in all (examples x (n0 + n)) runs in the driver's process
#: when no actor count was asked for: starting actors (a Python process each, importing torch and loading the
#: model: 10-20 s on 2 CPU cores) costs more than the work, ~5 s of LeNet on one core. The rows are the same as
#: the pool's (each example's noise comes from its own generator seeded by (seed, idx)), and so are the shards,
#: the manifest and the TSV, so a resume may continue it either way.
LOCAL_SAMPLES = 50_000


class ShardFailedError(RuntimeError):
    """A shard could not be certified: its actor died more than MAX_RESTARTS times, or certification raised."""


# --- settings -----------------------------------------------------------------------------------------------
def validate_settings(n0: int, n: int, alpha: float, batch: int, seed: int = 0) -> None:
    """Raise CertifyInputError saying what is wrong with these CERTIFY settings and what to do."""
    if not 0 < alpha < 1:
        raise CertifyInputError(f"alpha must be in (0, 1), got {alpha}")
    if n0 < 1:
        raise CertifyInputError(f"n0 must be >= 1, got {n0}")
    if n < n0:
        raise CertifyInputError(f"n ({n}) must be >= n0 ({n0}): n0 samples only select the class, "
                                f"n samples estimate its probability (Cohen et al. use n0=100, n=100,000)")
    if n < min_certify_n(alpha):
        raise CertifyInputError(f"n={n} is too small for alpha={alpha}: no example could ever be certified "
                                f"(needs n >= {min_certify_n(alpha)}); raise --n or --alpha")
    if batch < 1:
        raise CertifyInputError(f"batch must be >= 1, got {batch}")
    if seed < 0:
        raise CertifyInputError(f"seed must be >= 0, got {seed}")


def default_shard_size(num_examples: int, n0: int, n: int) -> int:
    """Examples per shard: about SAMPLES_PER_SHARD noise samples, and at least 16 shards when there are
    enough examples, so that the actors stay balanced. Depends only on the settings (not on the number of
    actors), so a run can be resumed with a different --actors."""
    by_work = max(1, SAMPLES_PER_SHARD // (n0 + n))
    by_balance = max(1, math.ceil(num_examples / 16))
    return min(by_work, by_balance)


# --- model identity and transport ---------------------------------------------------------------------------
def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def model_fingerprint(trainable) -> str:
    """sha256 of what defines the certified model: trainable name, hyperparameters and network weights.

    Computed from the weights, not the file, so the same model saved twice (or passed in memory by a sweep)
    has the same fingerprint. Optimiser state is deliberately left out: it does not change predictions."""
    h = hashlib.sha256()
    _feed(h, [trainable.NAME, dict(trainable.hparams), dataclasses.asdict(trainable.info)])
    _feed(h, trainable.net.state_dict())
    return h.hexdigest()


def _checkpoint_bytes(trainable) -> bytes:
    """The trainable as checkpoint bytes, to ship to actors through Ray's object store."""
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(Path(tmp) / "model.pt", trainable, epoch=trainable.epochs)
        return path.read_bytes()


def load_model(model) -> tuple[Any, bytes]:
    """(trainable, checkpoint bytes) from a trainable or a checkpoint path; CertifyInputError if unusable
    (missing, corrupt, or weights that do not fit the architecture the checkpoint names)."""
    if isinstance(model, (str, os.PathLike)):
        try:
            trainable, _ = checkpoint.load(model)
        except (checkpoint.CheckpointError, ValueError, KeyError) as exc:
            raise CertifyInputError(str(exc)) from None
        return trainable, Path(model).read_bytes()
    return model, _checkpoint_bytes(model)


@dataclasses.dataclass(frozen=True)
class ShardDone:
    """What `on_shard` receives after each computed shard is persisted (monitoring, fault injection)."""

    shard: int
    indices: tuple[int, ...]
    pid: int                    # process that computed it
    actor: int                  # index into `actors`
    actors: tuple               # all actor handles of the pool
    busy: dict[int, int]        # actor index -> the shard it is computing now (result not ready yet)
    computed: int               # shards computed so far in this call
    remaining: int              # shards not finished yet


# --- the pool -----------------------------------------------------------------------------------------------
def certify_with_pool(model, data, indices: Sequence[int], *, out_dir: str | os.PathLike | None,
                      split: str = "test",
                      n0: int = N0, n: int = N, alpha: float = ALPHA, batch: int = BATCH_SIZE, seed: int = 0,
                      actors: int | None = None, resume: bool = True, progress: bool = True,
                      shard_size: int | None = None, source: str = "", extra: dict | None = None,
                      on_shard: Callable[[ShardDone], None] | None = None,
                      timeout_s: float | None = None,
                      data_identity: Mapping[str, Any] | None = None, device: str = "auto") -> pd.DataFrame:
    """Certify `data[i]` for i in `indices` on a pool of Ray actors; return Cohen's rows sorted by idx.

    model: a Trainable (e.g. a sweep's selected model) or a checkpoint path; each actor loads it once.
    data: a map-style dataset yielding (x, y, d) or (x, y) with x of shape info.input_shape in [0,1].
    out_dir: shards, manifest.json and, when complete, `<split>.tsv` (see the module docstring); None: a
      temporary directory, removed afterwards (nothing to resume).
    Results depend on batch and on the device type (CPU and CUDA generators differ): both are settings.
    resume: reuse the finished shards of a matching out_dir (False: refuse an out_dir that has some).
    source: a human-readable model identity for the manifest (run id or checkpoint path); extra: more
      JSON-able information for the manifest (not compared on resume; the CLI stores its arguments there).
    on_shard: called after each computed shard is persisted (ShardDone); timeout_s: fail with TimeoutError
      when no shard finishes for this long (None: wait forever; tests set it).
    data_identity: where the data came from (dataset, split, recipe = the loader's options and subsets, root,
      source); recorded in manifest["data"] with the content hash of the examples (examples_sha256), and a
      resume on other data is refused (DATA_COMPARED). out_dir is locked (fcntl) while the pool runs.
    device: "auto" (the cluster's GPUs when it has some), "cpu" (never a GPU) or "cuda" (GPUs required:
      CertifyInputError on a cluster without one).
    Starts Ray locally if it is not running. The returned DataFrame's `attrs` hold "shards_computed",
    "shards_reused", "tsv", "manifest" and "fingerprint".
    Raises CertifyInputError for bad settings, an unusable model or a mismatching out_dir.
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="certify-") as tmp:
            return certify_with_pool(model, data, indices, out_dir=tmp, split=split, n0=n0, n=n, alpha=alpha,
                                     batch=batch, seed=seed, actors=actors, resume=resume, progress=progress,
                                     shard_size=shard_size, source=source, extra=extra, on_shard=on_shard,
                                     timeout_s=timeout_s, data_identity=data_identity, device=device)
    validate_settings(n0, n, alpha, batch, seed)
    indices = [int(i) for i in indices]
    if not indices:
        raise CertifyInputError("no examples to certify (check --skip/--max)")
    if len(set(indices)) != len(indices):
        raise CertifyInputError("indices must be unique")
    if min(indices) < 0 or max(indices) >= len(data):
        raise CertifyInputError(f"indices must lie in [0, {len(data)}) for this {split} split of {len(data)} "
                                f"examples, got {min(indices)}..{max(indices)}")
    if shard_size is not None and shard_size < 1:
        raise CertifyInputError(f"shard size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    check_out_dir(out)
    trainable, model_bytes = load_model(model)
    fingerprint = model_fingerprint(trainable)
    shard_size = shard_size or default_shard_size(len(indices), n0, n)
    data_prov = {"dataset": trainable.info.name, "split": split, **dict(data_identity or {}),
                 "num_examples": len(indices)}
    if "examples_sha256" not in data_prov:     # the CLI computed it already, to check a resume before Ray
        data_prov["examples_sha256"] = examples_sha256(data, indices)
    check_resume(out, fingerprint, data_prov)
    import ray
    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=False)
        install_signal_handlers()      # ray.init replaced the SIGTERM handler (C7)
    resources = actor_resources(actors, device=device)
    settings = {"split": split, "device": resources[3], "n0": int(n0), "n": int(n), "alpha": float(alpha),
                "batch": int(batch), "seed": int(seed), "shard_size": int(shard_size),
                "indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest(),
                "num_examples": len(indices), "first_index": indices[0], "last_index": indices[-1]}
    if not source and isinstance(model, (str, os.PathLike)):
        source = str(model)
    manifest = {"format": MANIFEST_FORMAT, "complete": False,
                "model": {"fingerprint": fingerprint, "trainable": trainable.NAME, "sigma": trainable.sigma,
                          "dataset": trainable.info.name, "source": source},
                "settings": settings, "data": data_prov, "extra": extra or {}}
    with exclusive_lock(out):
        prepare_out_dir(out, manifest, resume)
        return _certify_locked(out, manifest, model_bytes, data, indices, shard_size, resources, split, progress,
                               on_shard, timeout_s, local=actors is None and on_shard is None)


def _certify_locked(out: Path, manifest: dict, model_bytes: bytes, data, indices: list[int], shard_size: int,
                    resources, split: str, progress: bool, on_shard, timeout_s, local: bool = False
                    ) -> pd.DataFrame:
    """The pool's work once `out` is locked and its manifest matches: compute the missing shards, then the TSV.
    local: a small certification (LOCAL_SAMPLES) may run in this process."""
    settings, fingerprint = manifest["settings"], manifest["model"]["fingerprint"]
    n0, n, alpha, batch, seed = (settings[k] for k in ("n0", "n", "alpha", "batch", "seed"))

    shards = [indices[i:i + shard_size] for i in range(0, len(indices), shard_size)]
    todo = [k for k in range(len(shards)) if not shard_path(out, k).exists()]
    reused = len(shards) - len(todo)
    if todo:
        cert = dict(n0=int(n0), n=int(n), alpha=float(alpha), batch=int(batch), seed=int(seed))
        samples = sum(len(shards[k]) for k in todo) * (int(n0) + int(n))
        if local and samples <= LOCAL_SAMPLES and resources[3] == HOST.type:
            _run_local(model_bytes, data, shards, todo, out, cert)
        else:
            _run_pool(model_bytes, data, shards, todo, out, resources, cert, split, progress, on_shard, timeout_s)

    from trainables.metrics import read_tsv

    parts = []
    for k, shard in enumerate(shards):
        part = read_tsv(shard_path(out, k))
        if sorted(part["idx"].tolist()) != sorted(shard):
            raise CertifyInputError(f"{shard_path(out, k)} does not hold examples {shard[0]}..{shard[-1]}; "
                                    "the output directory was modified by hand: choose another --out")
        parts.append(part)
    df = pd.concat(parts, ignore_index=True).sort_values("idx", kind="stable").reset_index(drop=True)
    tsv = out / f"{split}.tsv"
    model = manifest["model"]
    meta = {"trainable": model["trainable"], "dataset": model["dataset"], "sigma": model["sigma"],
            **{k: settings[k] for k in ("split", "n0", "n", "alpha", "batch", "seed", "device")},
            "fingerprint": fingerprint, "source": model["source"],
            "examples_sha256": manifest["data"]["examples_sha256"]}
    atomic_write_tsv(df, tsv, meta=meta)          # the JSON sidecar keeps numbers as numbers
    manifest["complete"] = True
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    df.attrs.update(shards_computed=len(todo), shards_reused=reused, tsv=str(tsv), manifest=manifest,
                    fingerprint=fingerprint)
    return df


def shard_tensors(data, shard: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(x stacked [len(shard), ...], labels) of a shard's examples: what CertifyWorker.certify takes."""
    xs, labels = zip(*(example(data, i) for i in shard))
    return torch.stack(xs), labels


def _run_local(model_bytes: bytes, data, shards: list[list[int]], todo: list[int], out: Path,
               settings: dict) -> None:
    """Certify the shards in `todo` in this process (see LOCAL_SAMPLES), persisting each as the pool does, with
    one torch thread like an actor (so that the logits, hence the counts, are the pool's bit for bit)."""
    threads = torch.get_num_threads()
    try:
        worker = CertifyWorker(model_bytes, 1, HOST.type)
        for k in todo:
            _, rows = worker.certify(*shard_tensors(data, shards[k]), shards[k], **settings)
            atomic_write_tsv(rows, shard_path(out, k))
    finally:
        torch.set_num_threads(threads)


def _run_pool(model_bytes: bytes, data, shards: list[list[int]], todo: list[int], out: Path,
              resources: tuple[int, dict[str, float], int, str], settings: dict, split: str, progress: bool,
              on_shard: Callable[[ShardDone], None] | None, timeout_s: float | None,
              max_restarts: int = MAX_RESTARTS, worker_cls: type = CertifyWorker) -> None:
    """Hand the shards in `todo` to actors, one in flight per actor, persisting each result as it arrives.
    worker_cls: the actor class (tests inject a failing one)."""
    import ray
    from tqdm.auto import tqdm

    num_actors, options, threads, device_type = resources
    device = "auto" if "num_gpus" in options else HOST.type   # the actor takes the GPU Ray assigned it
    num_actors = min(num_actors, len(todo))   # no actor would get a shard
    remote_cls = ray.remote(max_restarts=max_restarts, max_task_retries=max_restarts)(worker_cls)
    # The checkpoint travels inside the actor's creation task, as chunks small enough to be inlined (Ray puts an
    # argument above 100 KiB in the object store, and then logs an alarming "actor restart will fail" error for
    # every restartable actor; inlined, a restart finds its arguments in the task spec at the GCS).
    chunks = [model_bytes[i:i + MODEL_CHUNK] for i in range(0, len(model_bytes), MODEL_CHUNK)] or [b""]
    pool = tuple(remote_cls.options(**options, runtime_env={"env_vars": ACTOR_ENV})
                 .remote(chunks[0], threads, device, *chunks[1:])
                 for _ in range(num_actors))
    done_examples = sum(len(s) for s in shards) - sum(len(shards[k]) for k in todo)
    bar = tqdm(total=sum(len(s) for s in shards), initial=done_examples, unit="img", desc=f"certify {split}",
               disable=not progress, smoothing=0.1)
    pending = list(todo)
    inflight: dict[Any, tuple[int, int]] = {}   # ObjectRef -> (shard, actor index)
    idle = list(range(num_actors))
    computed = 0
    try:
        # wait until every actor has loaded the model, so that the shards are spread from the start
        ray.get([a.pid.remote() for a in pool], timeout=timeout_s)
        while pending or inflight:
            while idle and pending:
                a, k = idle.pop(0), pending.pop(0)
                ref = pool[a].certify.remote(*shard_tensors(data, shards[k]), shards[k], **settings)
                inflight[ref] = (k, a)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout_s)
            if not ready:
                raise TimeoutError(f"no shard finished within {timeout_s} s ({len(inflight)} in flight)")
            for ref in ready:
                k, a = inflight.pop(ref)
                try:
                    pid, rows = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise ShardFailedError(
                        f"certification shard {k} (examples {shards[k][0]}..{shards[k][-1]}, {split} split) "
                        f"failed after up to {max_restarts} actor restarts: {type(exc).__name__}: {first}; "
                        f"finished shards are kept, rerun to resume") from None
                atomic_write_tsv(rows, shard_path(out, k))
                computed += 1
                idle.append(a)
                bar.update(len(shards[k]))
                if on_shard is not None:   # busy: actors whose shard is still being computed
                    running = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)[1] \
                        if inflight else []
                    on_shard(ShardDone(shard=k, indices=tuple(shards[k]), pid=pid, actor=a, actors=pool,
                                       busy={inflight[r][1]: inflight[r][0] for r in running},
                                       computed=computed, remaining=len(pending) + len(inflight)))
    finally:
        bar.close()
        for actor in pool:
            ray.kill(actor)  # frees their CPUs at once; no_restart=True by default
