"""The one device rule (contract C1): where a process trains or certifies, decided in one place.

    resolve_device(spec)   "auto" -> the first CUDA device when CUDA is available, else the host CPU;
                           "cpu", "cuda", "cuda:K" as written; a ValueError with one clear line for a CUDA
                           spec on a machine without CUDA (the CLIs turn it into exit 2).
    session_device(spec)   where the current process should work:
                           - inside a Ray Train worker: `ray.train.torch.get_device()` (the GPU Ray Train gave
                             this rank, or the CPU);
                           - inside a Ray task / actor / Tune trial that Ray assigned a GPU (fractional shares
                             included): that GPU, found through `ray.get_gpu_ids()` and CUDA_VISIBLE_DEVICES;
                             one Ray assigned no GPU: the CPU (it must not take a GPU another process holds);
                           - else resolve_device(spec), where "auto"/"cuda" inside a torch.distributed group
                             (torchrun) means this rank's GPU, cuda:LOCAL_RANK.
                           An explicit "cpu" spec always wins (a user may keep a GPU node's job on its CPU).

No other module of the project names a device type literally: they use `HOST` (the CPU, where data loading,
checkpoint loading and CPU-generated noise live), `is_host(device)` and `synchronize(device)` from here.
"""
from __future__ import annotations

import os

import torch

_CPU, _CUDA = "cpu", "cuda"
#: the host: checkpoints are loaded here (map_location) before being moved to the working device
HOST = torch.device(_CPU)
#: the values the CLIs accept for --device (cuda:K is accepted too)
DEVICE_CHOICES = ("auto", _CPU, _CUDA)


def check_spec(spec: str | None) -> str:
    """The spec if it names a device this module knows ("auto", "cpu", "cuda", "cuda:K"), else ValueError.
    Checks the spelling only (a cluster's GPUs are not this machine's)."""
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return s
    try:
        kind = torch.device(s).type
    except RuntimeError:
        kind = None
    if kind not in (_CPU, _CUDA):
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:K")
    return s


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A torch.device for "auto" | "cpu" | "cuda" | "cuda:K" (module docstring). ValueError on bad specs."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device(_CUDA, 0) if cuda_available() else HOST
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:K") from None
    if device.type == _CPU:
        return HOST
    if device.type != _CUDA:
        raise ValueError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:K")
    if not cuda_available():
        raise ValueError(f"--device {spec} was asked for but CUDA is not available on this machine "
                         f"(torch {torch.__version__}); use --device auto or cpu")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(_CUDA, index)


def _in_train_worker() -> bool:
    """True inside a Ray Train worker's training function (Train V2, Ray 2.60's default; V1 sessions too)."""
    try:
        import ray
        if not ray.is_initialized():
            return False
    except Exception:
        return False
    try:
        from ray.train.v2._internal.util import _in_ray_train_worker
        if _in_ray_train_worker():
            return True
    except Exception:
        pass
    try:
        from ray.train._internal.session import get_session
        return get_session() is not None and not _in_tune_trial_only()
    except Exception:
        return False


def _in_tune_trial_only() -> bool:
    # V1 Train and Tune function trials share the session object; a Tune trial is not a Train worker
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
        return _in_tune_session()
    except Exception:
        return False


def ray_assigned_gpu() -> torch.device | None:
    """The GPU Ray assigned to this task/actor/trial (None when none or outside Ray)."""
    try:
        import ray
        if not ray.is_initialized():
            return None
        ids = [str(i) for i in ray.get_gpu_ids()]
    except Exception:
        return None
    if not ids or not cuda_available():
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    # Ray normally sets CUDA_VISIBLE_DEVICES to the assigned ids, so the first assigned id is local index 0;
    # with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES the ids are the physical indices.
    index = visible.index(ids[0]) if ids[0] in visible else (int(ids[0]) if not visible else 0)
    return torch.device(_CUDA, index)


def session_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Where this process should train/certify (module docstring gives the order)."""
    explicit = resolve_device(spec) if spec not in (None, "auto") else None
    if explicit is not None and explicit.type == _CPU:
        return explicit
    if _in_train_worker():
        import ray.train.torch
        return ray.train.torch.get_device()
    assigned = ray_assigned_gpu()
    if assigned is not None:
        return assigned
    if _in_ray_worker():
        return HOST if explicit is None else explicit   # a Ray process given no GPU works on its CPU
    device = explicit if explicit is not None else resolve_device("auto")
    if device.type == _CUDA and str(spec or "auto").strip().lower() in ("auto", _CUDA):
        device = torch.device(_CUDA, _local_rank() % torch.cuda.device_count())
    return device


def _local_rank() -> int:
    """This process's rank on its node in a torch.distributed group started without Ray (torchrun sets
    LOCAL_RANK); 0 outside one."""
    import torch.distributed as dist
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() % max(1, torch.cuda.device_count())
    return 0


def _in_ray_worker() -> bool:
    """True in a Ray task, actor or Tune trial (not in a driver)."""
    try:
        import ray
        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        return False


def is_host(device: torch.device | str) -> bool:
    """True for the CPU (host memory)."""
    return torch.device(device).type == _CPU


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == _CUDA


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (timings); nothing to wait for on the host."""
    device = torch.device(device)
    if device.type == _CUDA:
        torch.cuda.synchronize(device)


def collective_device() -> torch.device:
    """Where tensors must be for the default process group's collectives: the current GPU for NCCL, else the
    host (gloo)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(_CUDA, torch.cuda.current_device())
    return HOST


def accelerator_type() -> str:
    """The device type name of a GPU (manifests record which kind of generator drew the noise)."""
    return _CUDA


def ddp_backend(device: torch.device | str) -> str:
    """torch.distributed backend for a device: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if is_cuda(device) else "gloo"


__all__ = ["HOST", "DEVICE_CHOICES", "check_spec", "resolve_device", "session_device", "ray_assigned_gpu", "is_host",
           "is_cuda", "synchronize", "ddp_backend", "collective_device", "accelerator_type", "cuda_available"]
