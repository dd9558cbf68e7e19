"""Collectives that keep data-parallel training the single-process recipe.

Every function is the identity (no communication) when torch.distributed is not initialised or the world has one
process, so trainables call them unconditionally. They work inside any process group: Ray Train's TorchTrainer
(gloo on CPUs, NCCL on GPUs), torchrun, or the test's torch.multiprocessing ranks.

- `gather_in_order(values, rows)`: the values of the whole global batch in global-batch order (DRF's distance
  buffer: every rank then holds the κ distances one process would, so λ is identical on every rank).
- `global_env_terms(...)`: GLEAN's per-environment risk, IRM penalty and accuracy over the GLOBAL batch (the
  full-batch estimator of one process), with gradients arranged so that DDP's gradient average gives the
  full-batch gradient (see `scaled_for_ddp`).
- `mean_metrics(...)`, `gather_objects(...)`: reported metrics averaged over ranks; certification rows gathered.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainables.device import HOST, collective_device


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _active() -> bool:
    return world()[1] > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a (detached) tensor, returned on t's device."""
    if not _active():
        return t
    buf = t.detach().to(collective_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """All ranks' tensors (first dimension may differ between ranks)."""
    dev = collective_device()
    t = t.detach().to(dev)
    n = torch.tensor([len(t)], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world()[1])]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[:len(t)] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [o[:int(s.item())] for o, s in zip(out, sizes)]


def gather_in_order(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Values [b] of this rank's examples at global-batch positions `rows` [b] -> the values of every rank's
    examples, sorted by global position (one process's batch order). Identity in one process."""
    if not _active():
        return values
    vals, pos = torch.cat(_all_gather(values)), torch.cat(_all_gather(rows.to(values.device)))
    return vals[pos.argsort()].to(values.device)


def scaled_for_ddp(t: torch.Tensor) -> torch.Tensor:
    """t with its value unchanged and its gradient multiplied by the world size W.

    A term whose gradient on each rank is only that rank's share of the full-batch gradient must be scaled by W
    before DDP averages the ranks' gradients ((1/W) Σ_r W g_r = Σ_r g_r = the full-batch gradient). Terms
    every rank computes identically (GLEAN's L2 term) are not scaled: their average is themselves."""
    w = world()[1]
    return t if w == 1 else t + (w - 1) * (t - t.detach())


def _globalise(local_sum: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The global value `total` with the gradient of this rank's `local_sum`."""
    return local_sum + (total - local_sum).detach()


def env_ordinals(d: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """For each example, its ordinal among the examples of its environment in the GLOBAL batch order (0, 1, ...;
    the parity splits DomainBed's two halves exactly as `logits[m][0::2]` does in one process)."""
    if not _active() or rows is None:
        out = torch.empty_like(d)
        for env in torch.unique(d):
            m = d == env
            out[m] = torch.arange(int(m.sum()), device=d.device)
        return out
    all_d = torch.cat(_all_gather(d))
    all_rows = torch.cat(_all_gather(rows.to(d.device)))
    order = all_rows.argsort()
    glob = env_ordinals(all_d[order], None)                 # ordinals in global order (one process's view)
    by_row = torch.empty_like(glob)
    by_row[all_rows[order]] = glob                          # ordinal of the example at each global position
    return by_row[rows.to(d.device)]


def global_env_terms(logits: torch.Tensor, y: torch.Tensor, d: torch.Tensor, num_envs: int, estimator: str,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(risks, penalties, accuracies) [E'] over the environments present in the GLOBAL batch, in environment
    order, each the full-batch value one process computes on the union of the ranks' examples.

    risk_e = (1/N_e) Σ CE_i, the IRM penalty from g_e = d/dw (1/N_e) Σ CE(w·l_i) at w = 1 ("full_batch": g_e²;
    "two_half": g_e,even · g_e,odd over the halves of the environment's examples in global-batch order);
    the sums over i run over all ranks' examples (all-reduced). The gradients are those of the full-batch terms,
    times W (`scaled_for_ddp`), for DDP to average. Accuracies are detached."""
    from trainables.irm import ESTIMATORS, penalty_gradient
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown IRM penalty estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if len(d) and int(d.max()) >= num_envs:
        raise ValueError(f"environment index {int(d.max())} >= the {num_envs} training environments")
    halves = ((0, 1) if estimator == "two_half" else (None,))
    ordinal = env_ordinals(d, rows) if estimator == "two_half" else None
    # local sums per (environment, half): counts, CE sums, penalty-gradient sums, correct predictions
    counts = torch.zeros(num_envs, len(halves), dtype=torch.float64, device=logits.device)
    ce_sum, g_sum, correct = [], [], torch.zeros(num_envs, dtype=torch.float64, device=logits.device)
    zero = logits.sum() * 0.0                                 # keeps the graph when an env is absent locally
    for e in range(num_envs):
        m_env = d == e
        correct[e] = (logits[m_env].argmax(1) == y[m_env]).sum()
        ce_row, g_row = [], []
        for h, half in enumerate(halves):
            m = m_env if half is None else m_env & (ordinal % 2 == half)
            counts[e, h] = m.sum()
            if m.any():
                ce_row.append(F.cross_entropy(logits[m], y[m], reduction="sum"))
                g_row.append(penalty_gradient(logits[m], y[m], reduction="sum"))
            else:
                ce_row.append(zero)
                g_row.append(zero)
        ce_sum.append(torch.stack(ce_row))
        g_sum.append(torch.stack(g_row))
    ce_local, g_local = torch.stack(ce_sum), torch.stack(g_sum)           # [E, H]
    counts = all_reduce_sum(counts)
    totals = all_reduce_sum(torch.stack([ce_local.detach(), g_local.detach()]).double()).to(ce_local.dtype)
    correct = all_reduce_sum(correct)
    ce_global, g_global = _globalise(ce_local, totals[0]), _globalise(g_local, totals[1])
    present = counts.sum(1) > 0
    n_env = counts.sum(1).clamp(min=1).to(ce_local.dtype)
    risks = ce_global.sum(1) / n_env
    if estimator == "two_half":
        if bool((counts[present] < 1).any()):
            raise ValueError("the two-half IRM penalty needs >= 2 examples per environment in a batch; "
                             "raise batch_size or use penalty_estimator=full_batch")
        grads = g_global / counts.clamp(min=1).to(g_global.dtype)
        penalties = grads[:, 0] * grads[:, 1]
    else:
        penalties = (g_global[:, 0] / n_env) ** 2
    accs = (correct / counts.sum(1).clamp(min=1)).to(logits.dtype)
    return scaled_for_ddp(risks[present]), scaled_for_ddp(penalties[present]), accs[present]


def average_buffers(module: torch.nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm running statistics) by its mean over the ranks, in place.
    Ranks that normalise their own examples (BatchNorm without SyncBatchNorm) update their running statistics
    from their own shard; evaluation and checkpoints need one model. The running means' average is exactly the
    running mean of the global batch's means (equal shards)."""
    if not _active():
        return
    w = world()[1]
    with torch.no_grad():
        for buf in module.buffers():
            if buf.is_floating_point():
                buf.copy_(all_reduce_sum(buf) / w)


def mean_metrics(metrics: dict[str, float], maximum: Sequence[str] = ()) -> dict[str, float]:
    """Metrics averaged over ranks (keys in `maximum`: the maximum, e.g. wall times). Every rank must pass the
    same keys (each rank's dict comes from the same code); keys missing on a rank are averaged over the others."""
    if not _active():
        return dict(metrics)
    everyone = gather_objects(metrics)
    out: dict[str, float] = {}
    for key in sorted({k for m in everyone for k in m}):
        vals = [float(m[key]) for m in everyone if key in m]
        out[key] = max(vals) if key in maximum else sum(vals) / len(vals)
    return out


def gather_objects(obj: Any) -> list[Any]:
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects; [obj] in one process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s obj on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = ["world", "all_reduce_sum", "gather_in_order", "scaled_for_ddp", "env_ordinals", "global_env_terms",
           "average_buffers",
           "mean_metrics", "gather_objects", "broadcast_object", "HOST"]
