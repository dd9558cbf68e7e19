"""GLEAN: Lipschitz guarantees, the IRM objective, latent certification against closed forms, bad input.

No dataset is needed: the networks are built from DataInfo shapes (cmnist's, and a small image dataset for the
CNN) and trained a few steps on uniform random pixels; certification is checked against exact formulas.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom, chi2_contingency, norm

from trainables import checkpoint, metrics
from trainables.data import DataInfo
from trainables.glean import Glean, LatentSmooth
from trainables.irm import irm_penalty, penalty_gradient_closed_form
from trainables.glean import environment_batches
from trainables.lipschitz import (CayleyConv2d, jacobian_norm, largest_singular_value, layer_lipschitz,
                                  orthogonal_layers)
from trainables.registry import get_trainable

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one torch thread is faster here (~8 s vs ~60 s for the module on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CMNIST = DataInfo("cmnist", 2, (2, 14, 14), (0.0, 0.0), (1.0, 1.0), train_domains=("+80%", "+90%"),
                  test_domains=("-90%",))
IMAGES = DataInfo("celeba", 2, (3, 8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train_domains=("a", "b"),
                  test_domains=("c",))
MNIST = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))


def _batch(info: DataInfo, n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *info.input_shape, generator=g)
    y = torch.randint(0, info.num_classes, (n,), generator=g)
    d = torch.arange(n) % 2
    return x, y, d


def _lipschitz_holds(t: Glean, pairs: int, seed: int = 0, expected: float | None = None) -> None:
    """||Psi(x) - Psi(x')|| <= (1 + 1e-5) L ||x - x'|| on random pairs (half far apart, half close), and every
    orthogonal layer's largest singular value <= 1 + 1e-5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(pairs, *t.info.input_shape, generator=g)
    far = torch.rand(pairs // 2, *t.info.input_shape, generator=g)
    near = x[pairs // 2:] + 1e-2 * torch.randn(pairs - pairs // 2, *t.info.input_shape, generator=g)
    x2 = torch.cat([far, near])
    t.net.eval()
    with torch.no_grad():
        dz = (t.net.encoder(x) - t.net.encoder(x2)).flatten(1).norm(dim=1)
    dx = (x - x2).flatten(1).norm(dim=1)
    lip = t.net.lipschitz()
    assert lip > 0
    worst = float((dz / dx).max())
    assert worst <= (1 + 1e-5) * lip, f"encoder stretches a pair by {worst} > L = {lip}"
    for layer in orthogonal_layers(t.net):
        assert largest_singular_value(layer) <= 1 + 1e-5
    if expected is not None:   # orthogonal layers and MaxMin: only the normaliser and the pooling count
        assert len(orthogonal_layers(t.net)) >= 2
        assert lip == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("info,hp,pairs,expected", [
    (CMNIST, {"hidden": 64}, 10_000, 1.0),
    (CMNIST, {"hidden": 64, "lipschitz": False}, 10_000, None),   # free layers: L is an upper bound
    (IMAGES, {"width": 4}, 4_000, 1 / 0.5),                       # 1/std; the pooling is 1-Lipschitz
    (IMAGES, {"width": 4, "lipschitz": False}, 4_000, None),      # free convolutions: sum-of-taps bound
])
def test_encoder_is_L_lipschitz_at_init_after_training_and_after_reload(tmp_path, info, hp, pairs, expected):
    torch.manual_seed(0)
    t = Glean({**hp, "anneal_steps": 1, "lr": 0.01}, info, epochs=3)
    _lipschitz_holds(t, pairs, expected=expected)
    x, y, d = _batch(info)
    for _ in range(3):
        t.update(x, y, d)
    _lipschitz_holds(t, pairs, seed=1, expected=expected)
    path = checkpoint.save(tmp_path / "glean.pt", t, epoch=3)
    t2, _ = checkpoint.load(path)
    assert t2.net.lipschitz() == pytest.approx(t.net.lipschitz(), rel=1e-6)
    with torch.no_grad():
        t.net.eval()
        assert torch.allclose(t2.net(x), t.net(x), atol=1e-5)
    _lipschitz_holds(t2, pairs, seed=2, expected=expected)


def test_irm_penalty_matches_hand_computation():
    # dCE(w*l, y)/dw at w=1 is mean_i sum_c (p_ic - y_ic) l_ic; for 2 classes only l1 - l0 matters:
    # example 1: logits (2, 0), y = 0 -> (p0 - 1) * 2 = -2 sigmoid(-2); example 2: (0, 1), y = 1 -> -sigmoid(-1)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    s = lambda v: 1 / (1 + math.exp(-v))
    g1, g2 = -2 * s(-2), -s(-1)
    assert irm_penalty(logits, y).item() == pytest.approx(((g1 + g2) / 2) ** 2, rel=1e-6)
    assert irm_penalty(logits, y, "two_half").item() == pytest.approx(g1 * g2, rel=1e-6)
    assert penalty_gradient_closed_form(logits, y).item() == pytest.approx((g1 + g2) / 2, rel=1e-6)
    # 2-class CE on (l0, l1) is the reference's BCE on l1 - l0, penalty included
    scale = torch.ones((), requires_grad=True)
    bce = F.binary_cross_entropy_with_logits(scale * (logits[:, 1] - logits[:, 0]), y.float())
    (g_bce,) = torch.autograd.grad(bce, scale)
    assert irm_penalty(logits, y).item() == pytest.approx(g_bce.item() ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="estimator"):
        irm_penalty(logits, y, "bogus")


def test_objective_is_mean_over_environments_with_annealing():
    t = Glean({"hidden": 16, "lam": 100.0, "anneal_steps": 2, "l2": 0.01, "head": "two_logit", "l2_scope": "free"},
              CMNIST)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 2, generator=g)
    y = torch.randint(0, 2, (10,), generator=g)
    d = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])   # unequal environment sizes
    risk = (F.cross_entropy(logits[:3], y[:3]) + F.cross_entropy(logits[3:], y[3:])) / 2
    pen = (irm_penalty(logits[:3], y[:3]) + irm_penalty(logits[3:], y[3:])) / 2
    l2 = sum(p.pow(2).sum() for p in [t.net.head.weight] + [p for n, p in t.net.named_parameters()
                                                               if n.endswith("bias")])
    loss, m = t.objective(logits, y, d)
    assert m["penalty_weight"] == 1.0                          # annealing: min(1, lam) before anneal_steps
    assert loss.item() == pytest.approx((risk + 0.01 * l2 + pen).item(), rel=1e-5)
    t.step = 2
    loss, m = t.objective(logits, y, d)
    assert m["penalty_weight"] == 100.0                        # then lam, and the loss is divided by it
    assert loss.item() == pytest.approx(((risk + 0.01 * l2 + 100 * pen) / 100).item(), rel=1e-5)


def test_lam_zero_is_erm_on_noisy_latents():
    """lam = 0: the gradient equals plain cross-entropy's on the same noisy latents (equal-size environments)."""
    torch.manual_seed(0)
    t = Glean({"hidden": 32, "lam": 0.0, "l2": 0.0, "anneal_steps": 0}, CMNIST)
    assert t.penalty_weight(0) == 0.0
    x, y, d = _batch(CMNIST, 40)
    torch.manual_seed(1)
    loss, _ = t.objective(t.net(x, t.sigma), y, d)
    grads = torch.autograd.grad(loss, list(t.net.parameters()))
    torch.manual_seed(1)
    ce = F.cross_entropy(t.net(x, t.sigma), y)
    ref = torch.autograd.grad(ce, list(t.net.parameters()))
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-6)
    # and with lam > 0 it is not ERM (the test can fail)
    t2 = Glean({"hidden": 32, "lam": 10.0, "l2": 0.0, "anneal_steps": 0}, CMNIST)
    t2.net.load_state_dict(t.net.state_dict())
    torch.manual_seed(1)
    loss2, _ = t2.objective(t2.net(x, t2.sigma), y, d)
    assert not math.isclose(loss2.item(), ce.item(), rel_tol=1e-6)


def _smoother_with_margins(sigma: float, margins: np.ndarray, lipschitz: float = 1.0):
    """A 2-class LatentSmooth whose latents z_i have exactly the logit margins `margins` (class 1 - class 0)."""
    t = Glean({"hidden": 8, "head": "two_logit"}, CMNIST)
    with torch.no_grad():
        t.net.head.weight.copy_(torch.tensor([[0.3, -0.2, 0.1, 0, 0, 0, 0, 0], [-0.5, 0.4, 0.0, 0.2, 0, 0, 0, 0]]))
        t.net.head.bias.copy_(torch.tensor([0.05, -0.05]))
    smooth = LatentSmooth(t.net, 2, sigma, lipschitz=lipschitz)
    dw = (t.net.head.weight[1] - t.net.head.weight[0]).detach()
    db = float((t.net.head.bias[1] - t.net.head.bias[0]).detach())
    z = torch.tensor(margins - db, dtype=torch.float32)[:, None] * dw / dw.dot(dw)
    return smooth, z, float(dw.norm())


def test_monte_carlo_certificate_against_closed_form():
    sigma, n, n0, alpha, lip = 0.25, 10_000, 100, 0.01, 2.0
    margins = np.linspace(0.05, 1.5, 150)
    smooth, z, dnorm = _smoother_with_margins(sigma, margins, lip)
    p_exact = norm.cdf(margins / (sigma * dnorm))            # P(class 1) in closed form
    r_exact = margins / (dnorm * lip)                         # = sigma * Phi^-1(p_exact) / L
    cap = sigma * norm.ppf(alpha ** (1 / n)) / lip            # the largest radius CERTIFY can return
    below, radii = 0, []
    for i in range(len(margins)):
        pred, radius = smooth._certify_prepared(z[i], n0, n, alpha, 1000, torch.Generator().manual_seed(i))
        radii.append(radius)
        p_low = norm.cdf(radius * lip / sigma) if pred == 1 else 0.0
        below += pred != 1 or p_low <= p_exact[i] + 1e-12
        if pred == 1 and r_exact[i] < 0.8 * cap:
            # the Clopper-Pearson bound is within a few standard errors of the truth
            se = math.sqrt(p_exact[i] * (1 - p_exact[i]) / n)
            assert p_exact[i] - p_low <= 6 * se + 3 / n
    misses = len(margins) - below
    assert misses <= binom.ppf(1 - 1e-6, len(margins), alpha), f"{misses} bounds above the truth"
    # deterministic certificate: the exact radius, no cap
    rows_pred, rows_rad = smooth.det_certificates(z)
    assert (rows_pred == 1).all()
    assert np.allclose(rows_rad.numpy(), r_exact, rtol=1e-4)
    assert max(radii) <= cap + 1e-9


def test_class_space_sampling_has_the_latent_distribution():
    """Counts drawn in the class dimension vs eps drawn in the latent space: a chi-square test of homogeneity,
    for 2 classes (rank 1) and 4 classes with a rank-deficient head (rank 2 of 3 differences)."""
    t = Glean({"hidden": 6}, CMNIST)
    z = torch.tensor([0.3, -0.1, 0.2, 0.05, 0.0, 0.1])
    smooth = LatentSmooth(t.net, 2, 0.5)
    a = smooth.class_counts(z, 100_000, torch.Generator().manual_seed(0))
    b = smooth.latent_counts(z, 100_000, torch.Generator().manual_seed(1))
    assert 0.05 < a[0] / a.sum() < 0.95
    assert chi2_contingency(np.stack([a, b])).pvalue > 1e-4
    info4 = DataInfo("cmnist", 4, (2, 14, 14), (0.0, 0.0), (1.0, 1.0), train_domains=("a", "b"))
    t4 = Glean({"hidden": 6}, info4)
    with torch.no_grad():   # row 3 = 2*row 1 - row 0 (+ shift): D D^T has rank 2
        w = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
        w[3] = 2 * w[1] - w[0]
        t4.net.head.weight.copy_(w)
    smooth4 = LatentSmooth(t4.net, 4, 0.5)
    assert smooth4.factor.shape[1] == 2
    a = smooth4.class_counts(z, 100_000, torch.Generator().manual_seed(0))
    b = smooth4.latent_counts(z, 100_000, torch.Generator().manual_seed(1))
    assert (a > 1000).sum() >= 2
    assert chi2_contingency(np.stack([a, b])[:, (a + b) > 0]).pvalue > 1e-4
    # a wrong sampler (noise scale off by 20%) is detected by the same test
    wrong = LatentSmooth(t4.net, 4, 0.6).class_counts(z, 100_000, torch.Generator().manual_seed(2))
    assert chi2_contingency(np.stack([wrong, b])[:, (wrong + b) > 0]).pvalue < 1e-4


def test_certify_many_rows_are_reproducible_and_carry_the_deterministic_certificate():
    torch.manual_seed(0)
    t = get_trainable("glean")({"hidden": 16, "anneal_steps": 0}, CMNIST)
    x, y, d = _batch(CMNIST, 8)
    cert = t.certifier()
    assert isinstance(cert, LatentSmooth) and cert.lipschitz == pytest.approx(1.0, abs=1e-4)
    rows = cert.certify_many(x, y.tolist(), list(range(8)), n0=50, n=2000, alpha=0.01, seed=3)
    again = cert.certify_many(x[4:], y[4:].tolist(), list(range(4, 8)), n0=50, n=2000, alpha=0.01, seed=3)
    assert [(r.predict, r.radius) for r in rows[4:]] == [(r.predict, r.radius) for r in again]
    for r in rows:
        assert r.det_radius >= 0 and r.det_predict in (0, 1)
        assert r.det_radius == 0 or r.det_predict == r.label     # on its own prediction
    summary = metrics.summarize(rows, (0.0, 0.1))
    assert {"acr", "det_acr", "det_certacc_r0", "det_certacc_r0.1"} <= set(summary)
    assert cert.certify(x[0], n0=50, n=2000, alpha=0.01, generator=torch.Generator().manual_seed(0))[0] in (-1, 0, 1)
    assert cert.predict(x[0], n=2000, alpha=0.01) in (-1, 0, 1)
    # the input-space smoother (speed comparisons) runs the same function on a frozen copy
    with torch.no_grad():
        assert torch.allclose(t.input_certifier().base_classifier(x), t.net(x), atol=1e-5)
    assert t.net.lipschitz() == pytest.approx(1.0, abs=1e-4)   # the original is untouched


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="IRM needs >= 2 training environments"):
        Glean(None, MNIST)
    with pytest.raises(ValueError, match="lam"):
        Glean({"lam": -1.0}, CMNIST)
    for bad in (0.0, -0.12):
        with pytest.raises(ValueError, match="sigma"):
            Glean({"sigma": bad}, CMNIST)
    t = Glean({"hidden": 8}, CMNIST)
    with pytest.raises(ValueError, match="sigma"):
        t.certifier(sigma=0.0)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        Glean({"lamda": 1.0}, CMNIST)


# --- certificate hardening: the computed L against float64 Jacobians ----------------------------------------

def _jacobian_violations(t: Glean, points: int = 3, seed: int = 0) -> list[str]:
    """Layers (and the whole encoder) whose float64 Jacobian at random inputs has a spectral norm above the
    computed Lipschitz bound * (1 + 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    enc = t.net.encoder.eval()
    bad = []
    for _ in range(points):
        x = torch.rand(1, *t.info.input_shape, generator=g)
        h = x
        for i, layer in enumerate(enc):
            bound = layer_lipschitz(layer, h.shape[1:])
            got = jacobian_norm(layer, h[0])
            if got > bound * (1 + 1e-6):
                bad.append(f"layer {i} {type(layer).__name__}: {got} > {bound}")
            with torch.no_grad():
                h = layer(h)
        got, lip = jacobian_norm(enc, x[0]), t.net.lipschitz()
        if got > lip * (1 + 1e-6):
            bad.append(f"encoder: {got} > L = {lip}")
    return bad


@pytest.mark.parametrize("info,hp", [(CMNIST, {"hidden": 16}), (IMAGES, {"width": 4}),
                                     (IMAGES, {"width": 4, "lipschitz": False})])
def test_float64_jacobian_never_exceeds_the_computed_L(info, hp):
    torch.manual_seed(0)
    t = Glean({**hp, "anneal_steps": 0, "lr": 0.01}, info)
    x, y, d = _batch(info, 16)
    for _ in range(2):
        t.update(x, y, d)
    assert _jacobian_violations(t) == []


def test_an_understated_L_is_caught():
    """The mutation the issue names: one CayleyConv2d's output scaled by 1.25 (its computed L still 1)."""
    torch.manual_seed(0)
    t = Glean({"width": 4}, IMAGES)
    class Scaled(CayleyConv2d):
        def forward(self, v):
            return 1.25 * super().forward(v)

    conv = next(m for m in t.net.encoder if isinstance(m, CayleyConv2d))
    conv.__class__ = Scaled                 # this one layer now stretches by 1.25; its weights (and L) unchanged
    bad = _jacobian_violations(t, points=1)
    assert any(b.startswith("layer 1 Scaled") for b in bad) and any(b.startswith("encoder") for b in bad), bad


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3, 3)])
def test_maxmin_has_torch_maximum_minimum_values_and_gradients(shape):
    """MaxMin's own backward (trainables/lipschitz.py: faster than torch.maximum/minimum's) gives the same values
    and gradients as torch.maximum/minimum away from ties, and passes float64 grad- and gradgradcheck (IRM's
    penalty differentiates through it)."""
    from trainables.lipschitz import MaxMin

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    k = shape[1] // 2
    a, b = x[:, :k], x[:, k:2 * k]
    reference = torch.cat([torch.maximum(a, b), torch.minimum(a, b), x[:, 2 * k:]], dim=1)
    w = torch.randn(*shape, dtype=torch.float64)
    assert torch.equal(MaxMin()(x), reference)
    assert torch.equal(torch.autograd.grad((MaxMin()(x) * w).sum(), x)[0],
                       torch.autograd.grad((reference * w).sum(), x)[0])
    assert torch.autograd.gradcheck(MaxMin(), (x,)) and torch.autograd.gradgradcheck(MaxMin(), (x,))


def test_L_is_float64_with_a_rounding_margin():
    from trainables.lipschitz import ROUNDING_MARGIN
    t = Glean({"hidden": 16}, CMNIST)
    lip = t.net.lipschitz()
    assert isinstance(lip, float) and (1 + ROUNDING_MARGIN) ** 2 * (1 - 1e-6) < lip < (1 + ROUNDING_MARGIN) ** 2 * (1 + 1e-6)


def test_det_radius_is_zero_not_nan_on_ties_and_stands_on_its_own_prediction():
    t = Glean({"hidden": 4, "head": "two_logit"}, CMNIST)
    with torch.no_grad():
        t.net.head.weight.copy_(torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))   # identical rows
        t.net.head.bias.zero_()
    smooth = LatentSmooth(t.net, 2, 0.12, lipschitz=1.0)
    a, r = smooth.det_certificates(torch.randn(5, 4))
    assert torch.equal(r, torch.zeros(5))                               # tie everywhere: 0, never NaN
    with torch.no_grad():
        t.net.head.bias.copy_(torch.tensor([0.0, 1.0]))                 # same rows, class 1 always ahead
    smooth = LatentSmooth(t.net, 2, 0.12, lipschitz=1.0)
    a, r = smooth.det_certificates(torch.randn(5, 4))
    assert (a == 1).all() and torch.isinf(r).all()
    # a deterministic certificate survives a Monte-Carlo abstention (n too small to certify anything)
    t2 = Glean({"hidden": 16}, CMNIST)
    x, y, _ = _batch(CMNIST, 8)
    cert = t2.certifier(sigma=1e4)          # noise swamps every margin: the Monte-Carlo run abstains
    z = cert._prepare(x)
    a, _ = cert.det_certificates(z)
    rows = cert.certify_many(x, a.tolist(), list(range(8)), n0=100, n=100, alpha=0.001, seed=0)
    assert all(row.predict == -1 for row in rows)
    assert all(row.det_radius > 0 for row in rows)
    assert metrics.summarize(rows, (0.0,))["det_certacc_r0"] == 1.0


# --- mini-batches holding every environment -----------------------------------------------------------------

def test_environment_batches_hold_every_environment_in_proportion():
    domains = torch.tensor([0] * 700 + [1] * 250 + [2] * 50)
    batches = list(environment_batches(domains, 100, seed=0, epoch=0))
    assert len(batches) == 10
    for b in batches:
        counts = torch.bincount(domains[b], minlength=3).tolist()
        assert counts == [70, 25, 5]
    assert len(set(torch.cat(batches).tolist())) == 1000                 # one epoch covers the data
    again = list(environment_batches(domains, 100, seed=0, epoch=0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    full = list(environment_batches(domains, 60_000, seed=0, epoch=0))   # full batch = everything once
    assert len(full) == 1 and sorted(full[0].tolist()) == list(range(1000))
    for rank in (0, 1):                                                  # DDP shards keep every environment
        for b in environment_batches(domains, 100, seed=0, epoch=0, rank=rank, world=2):
            assert set(domains[b].tolist()) == {0, 1, 2}
    # a tiny environment is cycled, never missing from a batch
    tiny = torch.tensor([0] * 998 + [1] * 2)
    assert all(set(tiny[b].tolist()) == {0, 1} for b in environment_batches(tiny, 50, seed=0, epoch=0))


def test_a_batch_without_every_environment_is_an_error():
    t = Glean({"hidden": 8}, CMNIST)
    x, y, _ = _batch(CMNIST, 8)
    with pytest.raises(ValueError, match=r"lacks training environment\(s\) \[1\]"):
        t.update(x, y, torch.zeros(8, dtype=torch.long))
