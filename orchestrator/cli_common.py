"""What `orchestrator.train` and `orchestrator.sweep` share: input errors, data, Ray start-up, final certification.

Bad input raises UsageError; `run_main` turns it into one line on stderr and exit code 2, before anything is
written (the commands check names, ranges, data and the cluster address before they touch MLflow or Ray).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

#: seed of the data subsampling (max_train/max_val): fixed, so sweeps with different --seed see the same data
DATA_SEED = 0


class UsageError(Exception):
    """Bad input: reported as one line and exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError: one line (not usage + error) and exit code 2 via run_main."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived (C7). A KeyboardInterrupt, so every `except BaseException` path that marks an
    MLflow run KILLED and every `finally` that shuts Ray down runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: the first SIGTERM/SIGINT `run_main` saw (None: none); the exit code is 128 + it
received_signal: int | None = None
#: True once the handler raised Interrupted (not when a library's own handler took the signal)
_raised = False


def _on_signal(signum: int, frame) -> None:
    """First signal: raise Interrupted in the main thread, or, when a library has installed its own graceful
    SIGINT handler meanwhile (Ray Tune saves the experiment state on SIGINT so that --resume works), let that
    handler end the work. Second signal: exit at once."""
    global received_signal, _raised
    name = signal.Signals(signum).name
    if received_signal is not None:
        print(f"{_prog}: {name} again: exiting at once (runs may be left RUNNING)", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    received_signal = signum
    current = signal.getsignal(signal.SIGINT)
    if signum == signal.SIGTERM and callable(current) and current is not _on_signal:
        current(signal.SIGINT, frame)       # e.g. Tune's handler: stop the trials, save state, return
        return
    _raised = True
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise Interrupted again for a signal whose exception was swallowed. Python runs a signal handler between
    two bytecodes of the main thread; when those belong to a finalizer (a weakref callback, `__del__`) the
    handler's exception is printed as "Exception ignored in ..." and the work goes on, so a SIGTERM could leave
    a run training to the end (measured: the train command ran past its 90 s). Long loops call this at each
    step; after a delivered exception no loop body runs again, so it raises at most once more."""
    if _raised and received_signal is not None:
        raise Interrupted(received_signal)


def _unraisable(hook):
    """sys.unraisablehook for run_main: an Interrupted a finalizer swallowed is not printed (a traceback would
    break C7's one line; raise_if_interrupted delivers it again); anything else goes to `hook`."""
    def quiet(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, Interrupted):
            return
        hook(unraisable)
    return quiet


_prog = "orchestrator"
_running = False          # inside run_main: only then are the handlers ours to install


def install_signal_handlers() -> dict:
    """Install C7's SIGTERM/SIGINT handler (main thread only); returns the handlers it replaced. Call it again
    after `ray.init`: Ray's core worker installs its own SIGTERM handler in the driver (it prints a stack and
    aborts), which would otherwise skip the clean-up. A no-op outside `run_main` (a library caller, a test)."""
    previous = {}
    if _running and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    return previous


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
             prog: str | None = None) -> int:
    """Run a command's `main(argv)`: bad input (UsageError) -> one line on stderr, exit code 2.

    C7 signals: SIGTERM and SIGINT raise `Interrupted` (a KeyboardInterrupt: the command marks its MLflow run
    KILLED and shuts Ray down on the way out); then one line on stderr and exit code 143 (SIGTERM) / 130
    (SIGINT). A second signal exits at once. Handlers are installed only in the main thread and restored after.
    """
    global received_signal, _prog, _running, _raised
    _prog = prog or (Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "orchestrator")
    outer_signal = received_signal, _raised
    received_signal, _raised = None, False
    outer, _running = _running, True
    previous = install_signal_handlers()
    outer_hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    try:
        code = main(argv)
        if received_signal is not None:   # a library (Tune) ended the work gracefully; main said how
            return 128 + received_signal
        return code
    except UsageError as exc:
        print(f"{prog + ': ' if prog else ''}error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None) or received_signal or signal.SIGINT
        print(f"{_prog}: interrupted by {signal.Signals(signum).name}: stopped (MLflow runs marked KILLED, Ray "
              f"shut down, finished work kept); exit code {128 + signum}", file=sys.stderr)
        return 128 + signum
    finally:
        _running = outer
        received_signal, _raised = outer_signal   # a signal belongs to this call: later callers must not see it
        sys.unraisablehook = outer_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
#: examples certified between two checks for a swallowed signal (raise_if_interrupted) in certify_split
IN_PROCESS_CHUNK = 32


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
    certifier, rows, indices = trainable.certifier(), [], list(indices)
    for start in range(0, len(indices), IN_PROCESS_CHUNK):   # (example i's noise is seeded by (seed, i): exact)
        raise_if_interrupted()
        chunk = indices[start:start + IN_PROCESS_CHUNK]
        items = [dataset[i] for i in chunk]
        xs = torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items])
        rows += certifier.certify_many(xs, [int(it[1]) for it in items], chunk, n0=n0, n=n, alpha=alpha,
                                       batch_size=batch, seed=seed)
    return rows


def format_table(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
