"""GLEAN (Qiao, Yin, Chen & Ma, AAAI-25): certified causal defense with a Lipschitz encoder, IRM and
randomized smoothing in the latent space.

Network. x (pixels in [0,1]) -> Psi -> z -> beta -> logits. Psi starts with the normaliser and, with
`lipschitz=True`, uses only orthogonal layers and MaxMin (GroupSort) activations:
- cmnist: Psi = [Normalize, Flatten, OrthoLinear(392, hidden), MaxMin, OrthoLinear(hidden, hidden), MaxMin],
  beta = Linear(hidden, 2) with bias (the paper's "three-layer MLP ... final linear layer as beta").
- celeba / domainnet: Psi = 4 Cayley-orthogonal convolutions (Trockman & Kolter 2021; the second with stride 2 as
  an orthogonal pixel-unshuffle) each followed by MaxMin, then global average pooling; beta = Linear.
`lipschitz=False` (the paper's "w/o Lipschitz" ablation) swaps in free nn.Linear / nn.Conv2d layers and ReLU.
L = the Lipschitz constant of Psi is always computed from the layers (`trainables.lipschitz`): spectral norms
(for free layers an upper bound: product of spectral norms; a free convolution is bounded by the sum of its
taps' spectral norms), times 1/min std of the normaliser; it is reported (`lipschitz` metric) and never assumed.

Training objective (paper Eq. 8), per step on a batch grouped by training environment d:
    mean_d [ CE(beta(z + eps), y)  +  w_t * penalty_d ]  +  l2 * ||theta_l2||^2,   eps ~ N(0, sigma^2 I)
with the risk and the IRM penalty both computed on the noisy latent (the paper's "Gaussian augmentation to z").
Choices where the paper is silent (stated, and tested in tests/test_glean.py):
- mean over environments, as the IRM reference code. Eq. 8 sums; the sum is |D| times the mean, so for a
  given lam the two have the same minimiser -- only the relative weight of the L2 term moves (sum with l2 c
  == mean with l2 c/|D|) and Adam is nearly invariant to the overall scale.
- the full-batch (biased) penalty of the IRM reference by default; `penalty_estimator="two_half"` gives DomainBed's
  unbiased estimate (trainables.irm).
- annealing as the IRM reference: penalty weight w_t = min(1, lam) for the first `anneal_steps` optimisation
  steps, then lam; when w_t > 1 the whole loss (L2 term included) is divided by w_t. min(1, lam) makes lam = 0
  exactly ERM on noisy latents (the paper's "w/o invariance" ablation).
- the L2 term (IRM reference: all parameters) covers the free parameters only: beta's weight and every bias
  with lipschitz=True (an orthogonal weight has a fixed norm; penalising its unconstrained pre-image would
  mean nothing); every parameter with lipschitz=False.
- binary tasks use 2 logits and 2-class cross-entropy instead of the reference's single logit with BCE: the
  smoothed classifier needs num_classes logits, and CE(w*[l0, l1]) = BCE(w*(l1 - l0)), so risk and penalty are
  exactly the reference's on the logit l1 - l0.
- starting settings: the IRM reference's argparse defaults (hidden 256, l2 0.001, Adam lr 0.001, anneal 100
  steps, full batch, penalty weight 10,000 -- the paper's lam), not its reproduction script's tuned values
  (hidden 390, l2 0.0011, lr 0.00049, anneal 190, weight 91,257): the paper's lam = 10,000 is the argparse
  default, and anneal 100 leaves 150 penalised steps in the CPU budget's 250 (orchestrator/budgets.py); after
  190 annealing steps the penalty needs ~100 more steps to move the test accuracy (scratch runs in
  benchmarks/RESULTS.md). sigma = 0.12 (paper).
- the normaliser is the dataset's (trainables.data: mean 0, std 1 on cmnist, celeba and domainnet, so pixels
  enter unchanged as in the IRM reference). It is counted in L all the same: dividing by a std s would multiply
  L by 1/s, i.e. make the latent sigma an input-space sigma*s.

Certification (`certifier()` -> LatentSmooth): g(x) = argmax_c P(beta(Psi(x) + eps) = c), eps ~ N(0, sigma^2 I),
the latent smoothing of the paper's procedure and text (its Theorem 2 prints input-space noise); CERTIFY's
radius sigma * Phi^-1(pA_lower) / L (Theorem 2's CR_z / L). Psi runs once per example; because beta is linear the
n Monte-Carlo samples are drawn in the class dimension (see LatentSmooth). The deterministic certificate of the
base classifier is reported next to it as `det_radius` / `det_predict` (see LatentSmooth.det_certificates).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.base import Trainable
from trainables.data import DataInfo
from trainables.hparams import HParam
from trainables.device import HOST
from trainables.distributed import global_env_terms
from trainables.irm import ESTIMATORS
from trainables.lipschitz import (CayleyConv2d, GlobalAvgPool, MaxMin, lipschitz_constant, orthogonal_linear)
from trainables.models import Normalize
from trainables.smoothing import ALPHA, BATCH_SIZE, N, N0, CertRow, Smooth

SIGMAS = (0.12, 0.25, 0.5, 1.0)

HPARAMS: dict[str, HParam] = {
    "sigma": HParam(0.12, choices=SIGMAS, check="> 0",
                    doc="latent noise std in training and certification (paper: 0.12; study 0.12-1.0)"),
    "lam": HParam(10_000.0, 10.0, 1e6, log=True, check=">= 0",
                  doc="IRM penalty weight lambda of Eq. 8 (paper: 10,000; study 10..1e6; 0 = no invariance)"),
    "anneal_steps": HParam(100, 0, 300, integer=True, check=">= 0",
                           doc="steps with penalty weight min(1, lam) before lam (IRM reference default: 100)"),
    "lr": HParam(0.001, 1e-4, 1e-2, log=True, check="> 0", doc="Adam learning rate (IRM reference default)"),
    "l2": HParam(0.001, 1e-5, 1e-2, log=True, check=">= 0",
                 doc="L2 weight on the free parameters, divided by the penalty weight with the rest (IRM default)"),
    "hidden": HParam(256, 64, 512, log=True, integer=True, check=">= 1",
                     doc="MLP hidden units on cmnist (IRM reference default: 256)"),
    "width": HParam(32, 16, 64, log=True, integer=True, check=">= 1",
                    doc="channels of the first convolution on celeba/domainnet (then 2x width)"),
    "lipschitz": HParam(True, choices=(True, False),
                        doc="orthogonal layers + MaxMin (True) or free layers + ReLU ('w/o Lipschitz' ablation)"),
    "penalty_estimator": HParam("full_batch", choices=ESTIMATORS,
                                doc="IRM penalty: full_batch (IRM reference, biased) or two_half (DomainBed)"),
    "batch_size": HParam(60_000, check=">= 1",
                         doc="examples per step; the default exceeds CMNIST's training set: full batch as IRM"),
}


class GleanNet(nn.Module):
    """x -> logits = head(encoder(x) + sigma * eps). encoder = Psi (normaliser first), head = beta (linear)."""

    def __init__(self, encoder: nn.Sequential, head: nn.Linear, input_shape: Sequence[int]):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor, sigma: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """noise: standard normal [B, k] to scale by sigma (default: drawn here from torch's generator)."""
        z = self.encoder(x)
        if sigma:
            z = z + sigma * (torch.randn_like(z) if noise is None else noise)
        return self.head(z)

    @torch.no_grad()
    def frozen(self) -> "GleanNet":
        """A copy computing the same function with each orthogonal linear weight materialised as a plain
        nn.Linear (no Cayley map recomputed per forward pass): for inference-heavy use such as input-space
        sampling. (Rebuilt layer by layer: deep-copying a parametrized module and removing its parametrization
        would edit the class it shares with the original.)"""
        import copy
        from torch.nn.utils import parametrize
        layers = []
        for layer in self.encoder:
            if isinstance(layer, nn.Linear) and parametrize.is_parametrized(layer):
                plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                plain.weight.copy_(layer.weight)
                if layer.bias is not None:
                    plain.bias.copy_(layer.bias)
                layers.append(plain.to(layer.weight.device))
            else:
                layers.append(copy.deepcopy(layer))
        return GleanNet(nn.Sequential(*layers), copy.deepcopy(self.head), self.input_shape).eval()

    def lipschitz(self) -> float:
        """The Lipschitz constant (upper bound) of the encoder, normaliser included, from the current weights."""
        return lipschitz_constant(self.encoder, self.input_shape)


def build_glean_net(info: DataInfo, hidden: int, width: int, lipschitz: bool) -> GleanNet:
    """The paper's networks: a 3-layer MLP on cmnist, a 4-layer CNN on image datasets (module docstring)."""
    normalize = Normalize(info.mean, info.std)
    act = MaxMin if lipschitz else nn.ReLU
    c, h, w = info.input_shape
    if info.name == "cmnist":
        lin = orthogonal_linear if lipschitz else nn.Linear
        flat = c * h * w
        encoder = nn.Sequential(normalize, nn.Flatten(), lin(flat, hidden), act(), lin(hidden, hidden), act())
        latent = hidden
    else:
        if h != w or h % 2:
            raise ValueError(f"GLEAN's CNN needs square images of even side, got {info.input_shape}")
        if lipschitz:
            convs = [CayleyConv2d(c, width, 3, h), CayleyConv2d(width, 2 * width, 3, h, stride=2),
                     CayleyConv2d(2 * width, 2 * width, 3, h // 2), CayleyConv2d(2 * width, 2 * width, 3, h // 2)]
        else:
            convs = [nn.Conv2d(c, width, 3, 1, 1), nn.Conv2d(width, 2 * width, 3, 2, 1),
                     nn.Conv2d(2 * width, 2 * width, 3, 1, 1), nn.Conv2d(2 * width, 2 * width, 3, 1, 1)]
        layers: list[nn.Module] = [normalize]
        for conv in convs:
            layers += [conv, act()]
        encoder = nn.Sequential(*layers, GlobalAvgPool())
        latent = 2 * width
    head = nn.Linear(latent, info.num_classes)
    nn.init.xavier_uniform_(head.weight)   # as the IRM reference
    nn.init.zeros_(head.bias)
    return GleanNet(encoder, head, info.input_shape)


class Glean(Trainable):
    NAME = "glean"
    HPARAMS = HPARAMS
    DEFAULT_DATASET = "cmnist"
    DATASETS = ("cmnist", "celeba", "domainnet")

    def __init__(self, hparams, info: DataInfo, epochs: int = 1, device=HOST):
        if info.num_train_domains < 2:
            raise ValueError(
                f"glean needs >= 2 training environments (IRM needs >= 2 training environments to compare "
                f"risks across them); dataset {info.name!r} has {info.num_train_domains}. "
                f"Use one of {', '.join(self.DATASETS)}.")
        super().__init__(hparams, info, epochs, device)

    def build_net(self) -> GleanNet:
        h = self.hparams
        return build_glean_net(self.info, h["hidden"], h["width"], h["lipschitz"])

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams["lr"])

    def l2_parameters(self) -> list[torch.Tensor]:
        """The parameters under the L2 term (module docstring): all when free, else beta's weight + biases."""
        if not self.hparams["lipschitz"]:
            return list(self.net.parameters())
        return [self.net.head.weight] + [p for name, p in self.net.named_parameters() if name.endswith("bias")]

    def penalty_weight(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        lam = float(self.hparams["lam"])
        return lam if step >= self.hparams["anneal_steps"] else min(1.0, lam)

    def objective(self, logits: torch.Tensor, y: torch.Tensor, d: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 8 as stated in the module docstring for logits already computed on noisy latents."""
        # per-environment terms over the GLOBAL batch (all ranks' examples: the full-batch estimator of one
        # process; identity without data parallelism), trainables/distributed.py
        rows = self.batch_keys.rows if self.batch_keys is not None else None
        risks, penalties, accs = global_env_terms(logits, y, d, self.info.num_train_domains,
                                                  self.hparams["penalty_estimator"], rows)
        risk, penalty = risks.mean(), penalties.mean()
        l2 = sum(p.pow(2).sum() for p in self.l2_parameters())
        weight = self.penalty_weight()
        loss = risk + self.hparams["l2"] * l2 + weight * penalty
        if weight > 1.0:
            loss = loss / weight   # keeps gradients in range (IRM reference)
        return loss, {"risk": risk.item(), "penalty": penalty.item(), "penalty_weight": weight,
                      "train_acc": accs.mean().item()}

    def update(self, x, y, d):
        self.model.train()
        x, y, d = x.to(self.device), y.to(self.device), d.to(self.device)
        logits = self.model(x, self.sigma, self.example_noise(x, shape=(self.net.head.in_features,)))
        loss, metrics = self.objective(logits, y, d)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), **metrics}

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {"lipschitz": self.net.lipschitz(), "penalty_weight": self.penalty_weight()}

    def certifier(self, sigma: float | None = None) -> "LatentSmooth":
        self.net.eval()
        return LatentSmooth(self.net, self.info.num_classes, self.sigma if sigma is None else sigma)

    def input_certifier(self, sigma: float | None = None):
        """Input-space smoothing of the same network (Smooth with noise on x, the frozen copy of the network):
        for speed comparisons only -- its radius sigma * Phi^-1(pA) is not GLEAN's certificate."""
        return Smooth(self.net.frozen(), self.info.num_classes, self.sigma if sigma is None else sigma)


# ------------------------------------------------------------------------------------------------------------
@dataclass
class LatentCertRow(CertRow):
    """A CertRow with GLEAN's deterministic certificate (LatentSmooth's docstring defines both fields)."""

    det_predict: int = -1
    det_radius: float = 0.0


class LatentSmooth(Smooth):
    """GLEAN's smoothed classifier g(x) = argmax_c P(beta(Psi(x) + eps) = c), eps ~ N(0, sigma^2 I_k).

    trainables.smoothing.Smooth with its hooks overridden (same statistics, same API and CertRows): `_prepare`
    runs the encoder once per example, `_sample_counts` samples in the class dimension, `_radius` divides by L.

    Class-space sampling: with beta(z) = W z + b, the argmax only depends on the logit differences to class 0,
    Delta = D z + db + D eps with D = W[1:] - W[0], db = b[1:] - b[0], and D eps ~ N(0, sigma^2 D D^T).
    D D^T = U diag(lam) U^T (eigh) gives the factor A = U_r sqrt(lam_r) over its r = rank <= C - 1 positive
    eigenvalues (rank deficiency handled: null directions carry no noise), so Delta = D z + db + sigma A g,
    g ~ N(0, I_r): the same distribution of predictions as latent sampling at O(r) instead of O(kC) per sample.
    For two classes, one normal per sample compared with a threshold. Noise is drawn in chunks of up to 2^20
    samples (`batch_size` does not apply: there is no forward pass); the rows depend on (seed, idx), not on how
    examples are split into calls or threads.

    Radius (Theorem 2): sigma * Phi^-1(pA_lower) / L, L = the encoder's Lipschitz constant computed from the
    layers when the certifier is built (attribute `lipschitz`).

    Deterministic certificate (beyond the paper; its own columns, never mixed with the Monte-Carlo radius):
    the base classifier f = beta o Psi predicts a = argmax(W z + b) and keeps it within
        det_radius = min_{b != a} ((W_a - W_b) z + b_a - b_b) / (L ||W_a - W_b||)
    of x (an L-Lipschitz encoder moves z by at most L r; the margin to class b shrinks by at most ||W_a - W_b||
    per unit of z). No failure probability, no Monte-Carlo cap. In the rows: det_predict = a; det_radius = that
    radius when a == the smoothed prediction == label, else 0 -- so det_radius, like radius, counts only where
    the row is `correct` (trainables.metrics.summarize reports det_acr / det_certacc_r<r> from these columns).
    For two classes a == g(x) unless CERTIFY abstains (or fails, probability <= alpha), and det_radius equals the
    exact radius of the latent smoothed classifier, sigma Phi^-1(Phi(margin / (sigma ||W_1 - W_0||))) / L.
    """

    CHUNK = 1 << 20

    def __init__(self, net: GleanNet, num_classes: int, sigma: float, lipschitz: float | None = None):
        super().__init__(net, num_classes, sigma, input_shape=net.input_shape)
        self.net = net
        net.eval()
        self.lipschitz = float(net.lipschitz() if lipschitz is None else lipschitz)
        if not (self.lipschitz > 0 and math.isfinite(self.lipschitz)):
            raise ValueError(f"the encoder's Lipschitz constant must be finite and > 0, got {self.lipschitz}")
        with torch.no_grad():
            w, b = net.head.weight.detach().double().cpu(), net.head.bias.detach().double().cpu()
            lam, u = torch.linalg.eigh((w[1:] - w[0]) @ (w[1:] - w[0]).T)
            keep = lam > lam.max().clamp_min(0) * 1e-12
            self.factor = (u[:, keep] * lam[keep].sqrt()).float()     # A  [C-1, r]
            self.diff_w = (w[1:] - w[0]).float()                       # D  [C-1, k]
            self.diff_b = (b[1:] - b[0]).float()                       # db [C-1]
            self._w, self._b = w.float(), b.float()

    # --- Smooth's hooks -------------------------------------------------------------------------------------
    def _prepare(self, xs: torch.Tensor) -> torch.Tensor:
        """z = Psi(x): [B, *input_shape] -> [B, k] on the CPU, the encoder run once per example."""
        return torch.cat([self.net.encoder(xs[i:i + 4096].to(self.device, torch.float32)).float().cpu()
                          for i in range(0, len(xs), 4096)])

    def _sample_counts(self, z: torch.Tensor, num: int, batch_size: int,
                       generator: torch.Generator | None) -> torch.Tensor:
        return torch.from_numpy(self.class_counts(z, num, generator))

    def _radius(self, pA_lower: float) -> float:
        return super()._radius(pA_lower) / self.lipschitz

    def _make_row(self, idx, label, prediction, radius, seconds, z) -> LatentCertRow:
        a, r = self.det_certificates(z[None])
        ok = int(a[0]) == label == prediction
        return LatentCertRow(idx=idx, label=label, predict=prediction, radius=radius,
                             correct=int(prediction == label), time=seconds,
                             det_predict=int(a[0]), det_radius=float(r[0]) if ok else 0.0)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)   # the class-space noise is drawn on the CPU

    def certify_many(self, xs, labels, indices, n0: int = N0, n: int = N, alpha: float = ALPHA,
                     batch_size: int = BATCH_SIZE, seed: int = 0) -> list[LatentCertRow]:
        """Smooth.certify_many, the examples shared out over torch.get_num_threads() threads (contiguous
        shards; each example has its own generator, so the rows are those of one sequential call)."""
        k = max(1, min(torch.get_num_threads(), len(xs)))
        labels, indices = list(labels), list(indices)
        bounds = [round(i * len(xs) / k) for i in range(k + 1)]
        sup = super().certify_many

        def shard(s: int) -> list:
            lo, hi = bounds[s], bounds[s + 1]
            return sup(xs[lo:hi], labels[lo:hi], indices[lo:hi], n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                       seed=seed)

        was_training = self.net.training
        self.net.eval()   # once for all threads (each shard's own eval/restore would race)
        try:
            if k == 1:
                return shard(0)
            with ThreadPoolExecutor(max_workers=k) as pool:
                return [row for part in pool.map(shard, range(k)) for row in part]
        finally:
            self.net.train(was_training)

    # --- sampling -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def class_counts(self, z: torch.Tensor, num: int, generator: torch.Generator | None = None) -> np.ndarray:
        """Counts [C] of beta(z + eps) over `num` samples, drawn in the class dimension (class docstring)."""
        mean = self.diff_w @ z.cpu().float() + self.diff_b
        r = self.factor.shape[1]
        if self.factor.shape == (1, 1):
            # two classes: class 1 iff mean + sigma * a * g > 0, i.e. g beyond a threshold
            a = float(self.factor[0, 0])
            thr = -float(mean[0]) / (self.sigma * a)
            ones = 0
            for start in range(0, num, self.CHUNK):
                g = torch.randn(min(self.CHUNK, num - start), generator=generator)
                ones += int((g > thr).sum() if a > 0 else (g < thr).sum())
            return np.array([num - ones, ones], dtype=np.int64)
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        step = max(1, self.CHUNK // max(r, 1))
        for start in range(0, num, step):
            m = min(step, num - start)
            delta = mean + self.sigma * (torch.randn(m, r, generator=generator) @ self.factor.T)
            best, arg = delta.max(dim=1)
            counts += torch.bincount(torch.where(best > 0, arg + 1, 0), minlength=self.num_classes)
        return counts.numpy()

    @torch.no_grad()
    def latent_counts(self, z: torch.Tensor, num: int, generator: torch.Generator | None = None,
                      chunk: int = 10_000) -> np.ndarray:
        """The same counts by the definition, beta(z + eps) with eps drawn in the latent space (slower; the
        tests compare it with `class_counts`)."""
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        z = z.cpu().float()
        for start in range(0, num, chunk):
            m = min(chunk, num - start)
            eps = torch.randn(m, z.shape[0], generator=generator) * self.sigma
            counts += torch.bincount(((z + eps) @ self._w.T + self._b).argmax(dim=1), minlength=self.num_classes)
        return counts.numpy()

    @torch.no_grad()
    def det_certificates(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction a [B], radius [B]) of the deterministic certificate for latents z [B, k] (class doc)."""
        logits = z.float() @ self._w.T + self._b                           # [B, C]
        a = logits.argmax(dim=1)
        margin = logits.gather(1, a[:, None]) - logits                      # [B, C], >= 0
        norms = torch.cdist(self._w, self._w)                               # ||W_a - W_b||  [C, C]
        ratio = margin / (norms[a] * self.lipschitz)
        ratio[torch.arange(len(a)), a] = math.inf
        return a, ratio.min(dim=1).values
