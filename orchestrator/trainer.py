"""The one place a Ray Train `TorchTrainer` is built (sweep trials with --workers >= 2, and orchestrator.train).

Fault tolerance: `FailureConfig(max_failures)` restarts the worker group after a worker (or its node) dies; the
loop resumes from `ray.train.get_checkpoint()`. The run's name is stable (per trial / per MLflow run), so a
trainer built again with the same name and storage (a restarted Tune trial, `orchestrator.train --resume`)
finds its own checkpoints there.
"""
from __future__ import annotations

from typing import Any, Sequence

#: default retries of a trial / a Train worker group (--max-failures)
DEFAULT_MAX_FAILURES = 2


def build_torch_trainer(cfg, data_ref, *, workers: int, use_gpu: bool, resources_per_worker: dict[str, float],
                        storage: str, name: str, max_failures: int = DEFAULT_MAX_FAILURES,
                        callbacks: Sequence[Any] = (), resume_from=None):
    """A TorchTrainer running orchestrator.train_loop.train_worker on `workers` DDP workers.

    data_ref: the LoopData's ObjectRef (put in the object store once by the driver; never a second ray.put).
    storage: a storage URI (orchestrator.storage). callbacks: Ray Train callbacks (TuneReportCallback inside a
    Tune trial, orchestrator.mlflow_callback.MLflowTrainCallback in orchestrator.train). resume_from: a
    ray.train.Checkpoint in the storage to start from (orchestrator.train --resume).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator import storage as st
    from orchestrator.train_loop import train_worker

    return TorchTrainer(
        train_worker, train_loop_config={"cfg": cfg, "data": data_ref},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=dict(resources_per_worker) or {"CPU": 1}),
        run_config=RunConfig(name=name, failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=list(callbacks), **st.run_config_kwargs(storage)),
        **({"resume_from_checkpoint": resume_from} if resume_from is not None else {}))
