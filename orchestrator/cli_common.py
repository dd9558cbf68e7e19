"""What `orchestrator.train` and `orchestrator.sweep` share: input errors, data, Ray start-up, final certification.

Bad input raises UsageError; `run_main` turns it into one line on stderr and exit code 2, before anything is
written (the commands check names, ranges, data and the cluster address before they touch MLflow or Ray).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

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
def load_splits(dataset: str, data_root: str | None, budget, trainable: str = ""):
    """The dataset's splits at the budget's size (Budget.train_cap for `trainable`); missing data -> UsageError
    naming what to do."""
    from trainables.data import load_dataset

    try:
        return load_dataset(dataset, data_root, max_train=budget.train_cap(trainable, dataset),
                            max_val=budget.max_val, seed=DATA_SEED)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as exc:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UsageError(" ".join(msg.split())) from None


from orchestrator.selection import spread  # noqa: E402,F401  (re-exported: callers import it from here)


@dataclass
class Selection:
    """Which examples score the model and which ones report it (orchestrator/selection.py, DomainBed's two
    protocols). The primary set (`sel_indices` of the validation split) gives `val_acr`; with a held-out test
    domain `oracle_indices` (of the test split) give `oracle_acr` at every evaluation as well; `method` says which
    of the two the search maximises. `test_indices` of the test split report the final figures (the 80% of the
    test domain outside the hold-out when there is one, for either protocol)."""

    method: str
    sel_split: str                 # "val": the primary selection set is the training domains' validation split
    sel_indices: list[int]
    test_indices: list[int]
    test_label: str                # "test" | "test_minus_holdout"
    oracle_indices: list[int] | None = None

    @property
    def metric(self) -> str:
        from orchestrator.selection import METRIC
        return METRIC[self.method]


def make_selection(splits, method: str | None, search_examples: int | None, final_examples: int | None
                   ) -> Selection:
    """The selection for `method` (None: the dataset's default, oracle where it has a held-out test domain);
    a protocol that cannot apply (oracle without a test domain) is a UsageError."""
    from orchestrator import selection as S

    try:
        method = S.check_protocol(method, splits.info)
        sets = S.selection_sets(splits, method, search_examples, final_examples)
    except S.SelectionError as exc:
        raise UsageError(str(exc)) from None
    return Selection(method, "val", sets.val, sets.report, sets.report_label, sets.oracle)


def _stack(source, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [source[i] for i in indices]
    return (torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items]),
            torch.as_tensor([int(it[1]) for it in items]))


def loop_data(splits, selection: Selection):
    """LoopData for trials: the training split, the validation selection examples as tensors, and the oracle's
    test-domain hold-out as an extra set certified at every evaluation (reported as oracle_acr)."""
    from orchestrator.train_loop import LoopData

    xs, ys = _stack(splits.val, selection.sel_indices)
    extra = {}
    if selection.oracle_indices:
        ox, oy = _stack(splits.test, selection.oracle_indices)
        extra["oracle"] = (ox, oy, list(selection.oracle_indices))
    return LoopData(splits.info, splits.train, xs, ys, list(selection.sel_indices), "val", extra_sets=extra)


# --- Ray: moved to orchestrator/cluster.py (the one way to connect); these names stay for callers -------------
def check_reachable(address: str, timeout: float = 3.0) -> None:
    from orchestrator.cluster import check_reachable as check

    check(address, timeout)


def init_ray(address: str | None) -> bool:
    from orchestrator.cluster import connect

    return connect(address)


def cluster_cpus_gpus() -> tuple[float, float]:
    from orchestrator.cluster import cluster_cpus_gpus as cpus_gpus

    return cpus_gpus()


# --- final certification --------------------------------------------------------------------------------------
def certify_split(model, dataset, indices: Sequence[int], *, split: str, n0: int, n: int, alpha: float,
                  batch: int, seed: int, out_dir: str | os.PathLike | None = None):
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
                                 alpha=alpha, batch=batch, seed=seed, progress=False)
    from trainables import checkpoint as ckpt_io

    trainable = ckpt_io.load(model)[0] if isinstance(model, (str, os.PathLike)) else model
    items = [dataset[i] for i in indices]
    xs = torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items])
    labels = [int(it[1]) for it in items]
    return trainable.certifier().certify_many(xs, labels, list(indices), n0=n0, n=n, alpha=alpha,
                                              batch_size=batch, seed=seed)


def format_table(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
