"""What `orchestrator.train` and `orchestrator.sweep` share: input errors, data, Ray start-up, final certification.

Bad input raises UsageError; `run_main` turns it into one line on stderr and exit code 2, before anything is
written (the commands check names, ranges, data and the cluster address before they touch MLflow or Ray).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

#: fraction of the test split held out for oracle selection (DomainBed: 20% of the test domain), drawn with a
#: fixed seed so every sweep holds out the same examples
ORACLE_FRACTION = 0.2
ORACLE_SEED = 0
#: seed of the data subsampling (max_train/max_val): fixed, so sweeps with different --seed see the same data
DATA_SEED = 0


class UsageError(Exception):
    """Bad input: reported as one line and exit code 2."""


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    try:
        return main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def parse_sets(items: Sequence[str] | None, flag: str = "--set") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


# --- data -----------------------------------------------------------------------------------------------------
def load_splits(dataset: str, data_root: str | None, budget):
    """The dataset's splits at the budget's size; missing data -> UsageError naming what to do."""
    from trainables.data import load_dataset

    try:
        return load_dataset(dataset, data_root, max_train=budget.max_train, max_val=budget.max_val,
                            seed=DATA_SEED)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as exc:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UsageError(" ".join(msg.split())) from None


def spread(indices: Sequence[int], k: int | None) -> list[int]:
    """k of `indices` spread evenly (Cohen's --skip); all of them when k is None or too large."""
    indices = list(indices)
    if k is None or k >= len(indices):
        return indices
    picks = np.linspace(0, len(indices) - 1, num=k).round().astype(int)
    return [indices[i] for i in picks]


@dataclass
class Selection:
    """Which examples choose the model and which ones report it (DomainBed's two model-selection methods).

    train-domain: chosen on the validation split of the training domains; reported on the test split.
    oracle: chosen on a fixed 20% hold-out of the test split (test domain); reported on the other 80%.
    """

    method: str
    sel_split: str                 # "val" | "test_holdout"
    sel_indices: list[int]         # indices into the selection split's dataset
    test_indices: list[int]        # indices into splits.test reported by the final certification
    test_label: str                # "test" | "test_minus_holdout"


def make_selection(splits, method: str, search_examples: int | None, final_examples: int | None) -> Selection:
    n_test = len(splits.test)
    if method == "train-domain":
        if len(splits.val) == 0:
            raise UsageError("the validation split is empty: train-domain selection needs one (use a larger budget)")
        return Selection(method, "val", spread(range(len(splits.val)), search_examples),
                         spread(range(n_test), final_examples), "test")
    if method == "oracle":
        perm = torch.randperm(n_test, generator=torch.Generator().manual_seed(ORACLE_SEED)).tolist()
        k = max(1, int(round(ORACLE_FRACTION * n_test)))
        holdout, rest = sorted(perm[:k]), sorted(perm[k:])
        return Selection(method, "test_holdout", spread(holdout, search_examples), spread(rest, final_examples),
                         "test_minus_holdout")
    raise UsageError(f"unknown selection method {method!r}; use train-domain or oracle")


def loop_data(splits, selection: Selection):
    """LoopData for trials: the training split and the selection examples as tensors."""
    from orchestrator.train_loop import LoopData

    source = splits.val if selection.sel_split == "val" else splits.test
    items = [source[i] for i in selection.sel_indices]
    xs = torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items])
    ys = torch.as_tensor([int(it[1]) for it in items])
    return LoopData(splits.info, splits.train, xs, ys, list(selection.sel_indices), selection.sel_split)


# --- Ray ------------------------------------------------------------------------------------------------------
def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (UsageError) when `host:port` or `ray://host:port` does not accept connections: ray.init
    itself retries for minutes."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
                         "`ray start --head` or fix --address / RAY_ADDRESS") from None


def init_ray(address: str | None) -> bool:
    """Connect to `address` (or RAY_ADDRESS), else start a private local Ray (never someone else's cluster
    by accident). Returns True when this call started/connected Ray (and so should shut it down)."""
    import ray

    if address:
        check_reachable(address)  # an explicit address is checked even when Ray already runs in this process
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    check_reachable(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, configure_logging=True, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise UsageError(f"cannot connect to Ray at {address}: {exc}") from None
    return True


def cluster_cpus_gpus() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


# --- final certification --------------------------------------------------------------------------------------
def certify_split(model, dataset, indices: Sequence[int], *, split: str, n0: int, n: int, alpha: float,
                  batch: int, seed: int, out_dir: str | os.PathLike | None = None, device: str = "auto"):
    """Certified rows (CertRow list or Cohen DataFrame) of `dataset[i]` for i in `indices`.

    model: a Trainable, or a path to a trainables.checkpoint file. THE ONE PLACE the final test certification
    of train and sweep runs. Where Ray is running (a sweep, or train with --workers >= 2) it is sharded over
    the certification actor pool (orchestrator.pool.certify_with_pool: fault tolerant, resumable through
    `out_dir`); a one-process train run certifies in-process and spares itself a Ray start-up. Both give the
    same rows: example i's noise is seeded by (seed, i) wherever it is computed.
    """
    import ray

    if ray.is_initialized():
        from orchestrator.pool import certify_with_pool

        return certify_with_pool(model, dataset, list(indices), out_dir=out_dir, split=split, n0=n0, n=n,
                                 alpha=alpha, batch=batch, seed=seed, progress=False, device=device)
    from trainables import checkpoint as ckpt_io
    from trainables.device import resolve_device

    trainable = (ckpt_io.load(model, device=resolve_device(device))[0] if isinstance(model, (str, os.PathLike))
                 else model)
    items = [dataset[i] for i in indices]
    xs = torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items])
    labels = [int(it[1]) for it in items]
    return trainable.certifier().certify_many(xs, labels, list(indices), n0=n0, n=n, alpha=alpha,
                                              batch_size=batch, seed=seed)


def format_table(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
