"""DRF (AAAI-24, "distributional robustness framework"): SmoothAdv and Consistency with a learnt soft ball.

DRF solves Eq. 13, inf_{θ, λ≥0} { λε + E[ sup_x' E_δ[L_θ(x', y, δ)] - λ‖x' - x‖₂ ] }, by alternating:

1. inner maximisation (Eq. 14, Algorithm 1 lines 3-9), per example
       x̂_i ≈ argmax_x' CE_i(x') - λ ‖x' - x_i‖₂,    CE_i = -log((1/m) Σ_j softmax F(x' + δ_j))_{y_i}
   (SmoothAdv's smoothed cross-entropy over the m noises) by `trainables.attacks.soft_ball_ascent`: from x̂ = x,
   T PGD steps on a ball growing by α = 2ε_t/T per step (the path of ball-constrained maximisers, reaching the
   2ε_t-ball; *no* fixed ε-ball), then each example's point of that path that scores best on Eq. 14 itself --
   so x̂ is never worse than x and a larger λ never selects a farther point. Algorithm 1 line 6 literally
   subtracts the scalar λ‖x̂ - x‖ from every pixel; the attack's docstring says why we read it this way.
   Both variants attack with this objective (Eq. 14 uses the CE only), in eval mode, on the bare network;
2. the θ step on the variant's outer loss at x̂ with the same m noises: SmoothAdv's mean cross-entropy
   (`drf-smoothadv`), or adversarial Consistency's CE + lbd·KL + eta·H (`drf-consistency`);
3. the λ step (Algorithm 1 line 14, λ ≥ 0 from Eq. 13):  λ <- max(0, λ - ζ (ε_t - Δ_κ)),
   Δ_κ = the mean ‖x̂_i - x_i‖₂ over the κ most recently attacked examples.

Choices where the paper is silent (stated here, tested in tests/test_trainables.py):
- "a batch of κ adversarial examples" is a FIFO buffer of the last κ distances, refilled after every θ step;
  the λ step runs once per θ step (Algorithm 1's iteration). While fewer than κ distances exist (the first
  steps of a run, or κ larger than the chunk) Δ_κ is the mean of those present; a chunk larger than κ keeps
  its last κ. The buffer is part of `state_dict`, so a resumed run continues the same trajectory.
- the ε warm-up applies: ε_t = ε·min(1, (epoch+1)/W) sets both the attack step 2ε_t/T and the λ target ε_t,
  so early epochs ask for proportionally smaller distances, as SmoothAdv's early epochs allow smaller balls
  (the paper keeps "the same configurations as the original works", whose warm-up is 10 of 90 epochs).
- everything else is the base method's (m = 4, ε = 255/256, T = 10, batch split into m chunks with one θ step
  each, lr schedule); λ₀ = 1.0 (SmoothAdv) / 2.0 (Consistency), ζ = 0.02, κ = 100 (DRF paper, MNIST).

`end_epoch` reports `drf_lambda_epoch_end` (λ at the end of the epoch) and `adv_distance_epoch` (mean ‖x̂ - x‖₂
over the epoch's attacked examples), with `epsilon` (ε_t) and `lr`. Per optimiser step (contract C3): `step_metrics()`
returns [(global step, {"drf_lambda": λ after the step, "adv_distance": the chunk's mean ‖x̂ - x‖₂,
"drf_delta_kappa": Δ_κ})] since the last call, and `write_artifacts(dir)` plots the whole trajectory as
`lambda_trajectory.png` (λ and Δ_κ against ε_t). The trajectory is part of `state_dict`, so a resumed run
plots all of it.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Mapping

from pathlib import Path

import torch

from trainables.attacks import l2_distance, soft_ball_ascent
from trainables.distributed import gather_in_order
from trainables.consistency import Consistency
from trainables.hparams import HParam
from trainables.smoothadv import SmoothAdv


def drf_hparams(lam0: float) -> dict[str, HParam]:
    """DRF's own hyperparameters; `lam0` differs per variant (DRF paper, MNIST: 1.0 SmoothAdv, 2.0 Consistency)."""
    return {
        "lam0": HParam(lam0, 0.1, 10.0, log=True, check=">= 0", doc=f"initial lambda (DRF MNIST: {lam0})"),
        "zeta": HParam(0.02, 1e-3, 0.1, log=True, check=">= 0", doc="learning rate of lambda (DRF: 0.02)"),
        "kappa": HParam(100, 10, 1000, log=True, integer=True, check=">= 1",
                        doc="adversarial examples whose mean distance drives the lambda step (DRF: 100)"),
    }


def lambda_step(lam: float, zeta: float, eps: float, distances: "deque[float] | list[float]") -> float:
    """Algorithm 1 line 14 with Eq. 13's λ ≥ 0: max(0, λ - ζ(ε - mean(distances))). No distances: λ unchanged."""
    if not len(distances):
        return lam
    return max(0.0, lam - zeta * (eps - sum(distances) / len(distances)))


class _Drf:
    """The DRF attack and λ update, mixed into SmoothAdv / Consistency (which supply the outer loss)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lam = float(self.hparams["lam0"])
        self.recent: deque[float] = deque(maxlen=int(self.hparams["kappa"]))
        #: every θ step's (global step, λ after it, the chunk's mean distance, Δ_κ, ε_t): the plotted trajectory
        self.trajectory: list[tuple[int, float, float, float, float]] = []
        self._unreported: list[tuple[int, dict[str, float]]] = []

    def perturb(self, x, y, noises):
        eps, steps = self.epsilon_now, int(self.hparams["num_steps"])
        return soft_ball_ascent(self.net, x, y, noises, steps=steps, step_size=2 * eps / steps, lam=self.lam)

    def after_step(self, x, x_in):
        # data-parallel: every rank adds the whole global chunk's distances in one process's order, so λ is
        # the same on every rank and equal to one process's λ (trainables/distributed.py)
        rows = self.batch_keys.rows if self.batch_keys is not None else torch.arange(len(x))
        distances = gather_in_order(l2_distance(x_in, x), rows).tolist()
        self.update_lambda(distances)
        eps, delta = self.epsilon_now, sum(self.recent) / len(self.recent)
        chunk = sum(distances) / max(len(distances), 1)
        self.trajectory.append((self.step, self.lam, chunk, delta, eps))
        self._unreported.append((self.step, {"drf_lambda": self.lam, "adv_distance": chunk,
                                             "drf_delta_kappa": delta}))

    def update_lambda(self, distances: "list[float]") -> None:
        """Algorithm 1 line 14: the newest distances enter the κ-buffer, then one λ step toward Δ_κ = ε_t.
        (The one place λ changes; a data-parallel run passes every rank's distances, gathered in global order.)"""
        self.recent.extend(distances)
        self.lam = lambda_step(self.lam, float(self.hparams["zeta"]), self.epsilon_now, self.recent)

    def step_metrics(self):
        out, self._unreported = self._unreported, []
        return out

    def write_artifacts(self, directory):
        return [plot_lambda_trajectory(self.trajectory, Path(directory) / "lambda_trajectory.png",
                                       title=f"{self.NAME}, sigma={self.sigma:g}")] if self.trajectory else []

    def end_epoch(self, epoch):
        # per-epoch names differ from the per-step ones (C3): MLflow logs epochs at step = epoch and steps at
        # step = global step, which must not share a metric name
        out = super().end_epoch(epoch)
        if "adv_distance" in out:
            out["adv_distance_epoch"] = out.pop("adv_distance")
        return {**out, "drf_lambda_epoch_end": self.lam}

    def state_dict(self):
        return {**super().state_dict(), "drf_lambda": self.lam, "drf_recent": list(self.recent),
                "drf_trajectory": torch.tensor(self.trajectory, dtype=torch.float64).reshape(-1, 5)}

    def load_state_dict(self, state: Mapping[str, Any]):
        super().load_state_dict(state)
        if "drf_lambda" in state:
            self.lam = float(state["drf_lambda"])
            self.recent = deque(state.get("drf_recent", ()), maxlen=int(self.hparams["kappa"]))
            rows = state.get("drf_trajectory")
            self.trajectory = [(int(r[0]), *map(float, r[1:])) for r in rows.tolist()] if rows is not None else []


def plot_lambda_trajectory(trajectory, path: Path, title: str = "") -> Path:
    """λ (left axis) and the mean distance Δ_κ with the target ε_t (right axis) per optimiser step, as a PNG.
    At the dual optimum of Eq. 13, Δ_κ settles at ε (the λ update stops moving)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, lam, _, delta, eps = zip(*trajectory)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, lam, color="tab:blue", label="λ")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("λ", color="tab:blue")
    ax.set_yscale("symlog", linthresh=1e-3)
    right = ax.twinx()
    right.plot(steps, delta, color="tab:orange", label="Δ_κ (mean ‖x̂ - x‖₂)")
    right.plot(steps, eps, color="tab:gray", ls="--", label="ε_t")
    right.set_ylabel("l2 distance")
    right.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class DrfSmoothAdv(_Drf, SmoothAdv):
    NAME = "drf-smoothadv"
    HPARAMS = {**SmoothAdv.HPARAMS, **drf_hparams(1.0)}


class DrfConsistency(_Drf, Consistency):
    NAME = "drf-consistency"
    # always adversarial (DRF's attack); `adversarial` would be a switch without effect, so it is not declared
    HPARAMS = {**{k: v for k, v in Consistency.HPARAMS.items() if k != "adversarial"}, **drf_hparams(2.0)}
