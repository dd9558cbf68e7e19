"""The certification pool's actor (`CertifyWorker`) and what each actor is given (`actor_resources`): one
actor per CPU of the cluster, or per GPU where there are GPUs (see orchestrator/pool.py's docstring)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch

from orchestrator.pool_manifest import CertifyInputError
from trainables import checkpoint
from trainables.device import HOST, accelerator_type, session_device


#: glibc malloc settings of the actors. A fresh process serves every allocation above 128 KiB (each batch of
#: noise and activations) from a new mmap and returns it on free, so every forward pass page-faults its
#: buffers in again; a long-lived process has raised that threshold dynamically. Measured on the 2-core CPU
#: (MNIST LeNet, n = 10,000): 0.95 s/image in a fresh actor vs 0.59 in-process, 0.56 with these settings.
ACTOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}

class CertifyWorker:
    """One Ray actor: loads the model once, then certifies shards with `trainable.certifier().certify_many`
    (GLEAN's latent certifier and the input-space Smooth alike)."""

    def __init__(self, model_bytes: bytes, threads: int, device: str, *more_bytes: bytes):
        model_bytes = b"".join((model_bytes, *more_bytes))      # the checkpoint in chunks: see _run_pool
        """device: a spec for trainables.device.session_device ("auto": the GPU Ray assigned, else the CPU)."""
        torch.set_num_threads(threads)
        device = session_device(device)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            path.write_bytes(model_bytes)
            trainable, _ = checkpoint.load(path, device=device)
        self.certifier = trainable.certifier()
        self.device = device

    def certify(self, xs: torch.Tensor, labels: Sequence[int], indices: Sequence[int], n0: int, n: int,
                alpha: float, batch: int, seed: int) -> tuple[int, list]:
        """CertRows of one shard, with this process's pid (tests use it to see an actor was replaced)."""
        rows = self.certifier.certify_many(xs.to(self.device), list(labels), list(indices), n0=n0, n=n,
                                           alpha=alpha, batch_size=batch, seed=seed)
        return os.getpid(), rows

    def pid(self) -> int:
        return os.getpid()


def actor_resources(actors: int | None, cluster: Mapping[str, float] | None = None, device: str = "auto"
                    ) -> tuple[int, dict[str, float], int, str]:
    """(actors, Ray resource options per actor, torch threads per actor, device type) for the running cluster
    (or for `cluster`, a `ray.cluster_resources()`-like mapping). The device type ("cpu"/"cuda", from
    trainables.device) is a manifest setting; each actor resolves its own device from what Ray assigned."""
    if cluster is None:
        import ray
        cluster = ray.cluster_resources()
    res = cluster
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    kind = torch.device(device).type if device not in (None, "auto") else None
    if kind == HOST.type:
        gpus = 0.0                      # --device cpu: the actors never ask for a GPU
    elif kind is not None and gpus < 1e-9:
        raise CertifyInputError(f"--device {device} was asked for but the Ray cluster has no GPU")
    if actors is None:
        actors = max(1, int(gpus)) if gpus >= 1 else max(1, int(cpus))
    if actors < 1:
        raise CertifyInputError(f"actors must be >= 1, got {actors}")
    per_cpu = min(1.0, cpus / actors)   # one core each; a share when there are more actors than CPUs
    options: dict[str, float] = {"num_cpus": per_cpu}
    if gpus > 0:
        options["num_gpus"] = min(1.0, gpus / actors)   # Ray: a whole GPU or a fraction; never 1.5 GPUs
    return actors, options, 1, accelerator_type() if gpus > 0 else HOST.type


__all__ = ["ACTOR_ENV", "CertifyWorker", "actor_resources"]
