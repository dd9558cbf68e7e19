"""GLEAN's certification: the latent smoothed classifier g(x) = argmax_c P(beta(Psi(x) + eps) = c) with
class-space sampling, the radius sigma * Phi^-1(pA_lower) / L and the deterministic certificate of the linear head
(see trainables/glean.py's module docstring for the method)."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainables.smoothing import ALPHA, BATCH_SIZE, N, N0, CertRow, Smooth

if TYPE_CHECKING:
    from trainables.glean import GleanNet


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
    radius when a == label (its own prediction: not zeroed when the Monte-Carlo run abstains), else 0 -- so
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
        ok = int(a[0]) == label          # the deterministic certificate stands on its own prediction
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
        denom = norms[a] * self.lipschitz
        # rows with W_a == W_b: the margin to b does not depend on z -- never crossed if positive, 0 if a tie
        ratio = torch.where(denom > 0, margin / denom.clamp_min(1e-300),
                            torch.where(margin > 0, torch.full_like(margin, math.inf), torch.zeros_like(margin)))
        ratio[torch.arange(len(a)), a] = math.inf
        radius = ratio.min(dim=1).values
        return a, torch.where(torch.isfinite(radius) | (radius > 0), radius, torch.zeros_like(radius))
