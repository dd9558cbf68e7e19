"""Soundness of the certification core (trainables/smoothing.py) against closed forms.

The base classifier is linear and binary, f(x) = 1[w.x + b > 0], so under x + N(0, sigma^2 I) the probability
of its class at x is p_A = Phi(|w.x + b| / (sigma ||w||)) and the smoothed classifier's exact l2 radius is
|w.x + b| / ||w|| (Cohen et al. Sec. 3.1: the bound is tight for linear classifiers). Each statistical test
certifies thousands of examples with a large alpha (0.1), so that violations happen often enough to be
counted, and a one-sided binomial test checks that their rate is consistent with <= alpha; a deliberately
unsound certifier shows the same check fails when it should.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from trainables.data import DataInfo
from trainables.models import build_model
from trainables.smoothing import (ABSTAIN, ALPHA, N, N0, CertRow, Smooth, example_seed,
                                  lower_confidence_bound, min_certify_n, min_predict_n)

D = 8           # input dimension of the linear classifier
SIGMA = 0.5
ALPHA_TEST = 0.1  # large, so that a 1-in-10 failure rate is observable in a few thousand examples
P_REJECT = 1e-3  # significance of the binomial checks (a sound certifier fails them with probability 1e-3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards: a second OpenMP thread only spins against the other work on a shared 2-core machine
    (measured: 12x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LinearBinary(nn.Module):
    """Logits [0, w.x + b]: class 1 iff w.x + b > 0. Input [B, D]."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.lin = nn.Linear(w.numel(), 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.stack([torch.zeros_like(w), w]))
            self.lin.bias.copy_(torch.tensor([0.0, b]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def linear_problem(m: int, seed: int = 0, margin_lo: float = 0.05, margin_hi: float = 1.5):
    """A linear classifier and m inputs whose true radii |w.x+b|/||w|| are spread over [margin_lo, margin_hi]
    (times sigma): p_A from ~0.52 to ~0.93, where Monte-Carlo bounds are least conservative."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g)
    b = 0.3
    xs = torch.randn(m, D, generator=g)
    # move every x along w so that its signed distance to the boundary is the chosen radius
    target = SIGMA * (margin_lo + (margin_hi - margin_lo) * torch.rand(m, generator=g))
    target = target * torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    dist = (xs @ w + b) / w.norm()
    xs = xs + (target - dist)[:, None] * (w / w.norm())[None, :]
    true_class = ((xs @ w + b) > 0).long()
    true_radius = ((xs @ w + b).abs() / w.norm()).double().numpy()
    return LinearBinary(w, b), xs, true_class, true_radius


def rate_exceeds(violations: int, trials: int, alpha: float) -> bool:
    """True when `violations` in `trials` is significantly (P_REJECT) more than a rate of alpha."""
    return binomtest(violations, trials, alpha, alternative="greater").pvalue < P_REJECT


def certify_violations(smooth: Smooth, xs, true_class, true_radius, n0: int,
                       n: int) -> tuple[int, int, list[CertRow]]:
    """Cohen et al.'s guarantee fails for an example when it is not abstained and either the class is not g(x)
    or the radius exceeds the true radius (equivalently, for the right class, pA_lower > p_A)."""
    labels = true_class.tolist()
    rows = smooth.certify_many(xs, labels, list(range(len(xs))), n0=n0, n=n, alpha=ALPHA_TEST, batch_size=n,
                               seed=7)
    bad = wrong = 0
    for r, c, rad in zip(rows, labels, true_radius):
        if r.predict == ABSTAIN:
            continue
        if r.predict != c:
            wrong += 1
        if r.predict != c or r.radius > rad:
            bad += 1
    return bad, wrong, rows


# --- coverage of CERTIFY ------------------------------------------------------------------------------------
def test_certify_coverage_linear_classifier():
    m = 3000
    model, xs, true_class, true_radius = linear_problem(m)
    smooth = Smooth(model, 2, SIGMA)
    bad, wrong, rows = certify_violations(smooth, xs, true_class, true_radius, n0=20, n=100)
    abstained = sum(r.predict == ABSTAIN for r in rows)
    assert abstained < m  # the check is not vacuous: most examples get a radius
    assert not rate_exceeds(bad, m, ALPHA_TEST), f"{bad}/{m} certificates fail (alpha={ALPHA_TEST})"
    # the radius exceeds the true radius no more often than alpha
    over = sum(r.radius > rad for r, rad in zip(rows, true_radius))
    assert not rate_exceeds(over, m, ALPHA_TEST)
    # and violations do occur at a rate near alpha (the bound is not vacuous either): at least a few percent
    assert bad > 0.01 * m


@pytest.mark.parametrize("flaw", ["one-sided 1 - 2 alpha bound", "radius 30% too large"])
def test_coverage_check_catches_an_unsound_certifier(flaw, monkeypatch):
    """The same check fails on a certifier with a classic flaw: the coverage test above can fail."""
    import trainables.smoothing as smoothing

    class Inflated(Smooth):
        def _radius(self, pA_lower: float) -> float:
            return 1.3 * super()._radius(pA_lower)

    if flaw.startswith("one-sided"):
        sound = smoothing.lower_confidence_bound
        monkeypatch.setattr(smoothing, "lower_confidence_bound",
                            lambda n_a, n, alpha: sound(n_a, n, 2 * alpha))
    cls = Inflated if flaw.startswith("radius") else Smooth
    m = 1500
    model, xs, true_class, true_radius = linear_problem(m, seed=1)
    bad, _, _ = certify_violations(cls(model, 2, SIGMA), xs, true_class, true_radius, n0=20, n=100)
    assert rate_exceeds(bad, m, ALPHA_TEST)


def test_lower_confidence_bound_is_clopper_pearson_with_coverage():
    # the bound is the lower end of the two-sided exact (Clopper-Pearson) 1 - 2 alpha interval
    for n_a, n in [(1, 10), (37, 100), (100, 100), (99_000, 100_000)]:
        ci = binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * 0.001, method="exact")
        assert lower_confidence_bound(n_a, n, 0.001) == pytest.approx(ci.low, rel=1e-9, abs=1e-12)
    assert lower_confidence_bound(0, 50, 0.001) == 0.0
    # coverage, vectorised: P(bound > p) <= alpha for several p (200,000 binomial draws each)
    rng = np.random.default_rng(0)
    n, trials = 100, 200_000
    for p in (0.55, 0.7, 0.9, 0.97):
        n_a = rng.binomial(n, p, size=trials)
        bound = np.where(n_a > 0, beta.ppf(ALPHA_TEST, np.maximum(n_a, 1), n - n_a + 1), 0.0)
        assert not rate_exceeds(int((bound > p).sum()), trials, ALPHA_TEST)
        # the one-sided 1 - 2 alpha bound (a classic slip) fails the same check at some p
    n_a = rng.binomial(n, 0.7, size=trials)
    loose = beta.ppf(2 * ALPHA_TEST, np.maximum(n_a, 1), n - n_a + 1)
    assert rate_exceeds(int((loose > 0.7).sum()), trials, ALPHA_TEST)


def test_monte_carlo_radius_approaches_closed_form():
    model, xs, true_class, true_radius = linear_problem(3, seed=2, margin_lo=0.6, margin_hi=1.2)
    smooth = Smooth(model, 2, SIGMA)
    rows = smooth.certify_many(xs, true_class.tolist(), [0, 1, 2], n0=100, n=400_000, alpha=0.001,
                               batch_size=100_000, seed=0)
    for r, c, rad in zip(rows, true_class.tolist(), true_radius):
        assert r.predict == c
        # at n = 400,000 the bound sits ~3.1 standard errors below p_A: a relative radius gap of about 1-2%
        assert r.radius <= rad
        assert r.radius == pytest.approx(rad, rel=0.03)


def test_predict_guarantee_linear_classifier():
    """PREDICT returns a class other than g(x) with probability <= alpha."""
    m = 3000
    model, xs, true_class, _ = linear_problem(m, seed=3, margin_lo=0.0, margin_hi=0.3)
    smooth = Smooth(model, 2, SIGMA)
    wrong = answered = 0
    g = torch.Generator()
    for i in range(m):
        g.manual_seed(example_seed(11, i))
        pred = smooth.predict(xs[i], 60, ALPHA_TEST, 60, generator=g)
        if pred != ABSTAIN:
            answered += 1
            wrong += int(pred != int(true_class[i]))
    assert answered > m // 10  # not vacuous
    assert wrong > 0  # near the boundary PREDICT does err sometimes: the count is informative
    assert not rate_exceeds(wrong, m, ALPHA_TEST)


def test_subclass_hooks_class_space_sampling():
    """The hooks a latent smoother overrides (GLEAN): for a linear classifier, sampling the signed distance
    d + N(0, sigma^2) in one dimension is the same distribution as sampling the input, so the certificates
    keep their coverage; rows carry the subclass's extra field; shard independence holds for the subclass
    too."""
    from dataclasses import asdict, dataclass

    from trainables import metrics

    @dataclass
    class DistRow(CertRow):
        det_radius: float = 0.0

    model, xs, true_class, true_radius = linear_problem(2000, seed=4)
    w, b = model.lin.weight[1], model.lin.bias[1]

    class MarginSmooth(Smooth):
        def _prepare(self, xs):
            return (xs @ w + b) / w.norm()                      # [B] signed distances: "the encoder", once

        def _sample_counts(self, d, num, batch_size, generator):
            ones = int((d + self.sigma * torch.randn(num, generator=generator) > 0).sum())
            return torch.tensor([num - ones, ones])

        def _make_row(self, idx, label, prediction, radius, seconds, d):
            row = super()._make_row(idx, label, prediction, radius, seconds, d)
            return DistRow(**asdict(row), det_radius=abs(float(d)))

    smooth = MarginSmooth(model, 2, SIGMA)
    bad, _, rows = certify_violations(smooth, xs, true_class, true_radius, n0=20, n=100)
    assert all(isinstance(r, DistRow) for r in rows)
    assert [r.det_radius for r in rows] == pytest.approx(true_radius.tolist(), rel=1e-5)
    assert not rate_exceeds(bad, len(rows), ALPHA_TEST) and bad > 0
    assert "det_acr" in metrics.summarize(rows, [0.0])
    kw = dict(n0=20, n=100, alpha=ALPHA_TEST, seed=1)
    labels, idx = true_class[:5].tolist(), list(range(5))
    whole = smooth.certify_many(xs[:5], labels, idx, **kw)
    parts = (smooth.certify_many(xs[:2], labels[:2], idx[:2], **kw)
             + smooth.certify_many(xs[2:5], labels[2:], idx[2:], **kw))
    assert _no_time(whole) == _no_time(parts)


# --- determinism and shard independence ---------------------------------------------------------------------
LENET_INFO = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))


def _no_time(rows):
    return [(r.idx, r.label, r.predict, r.radius, r.correct) for r in rows]


@pytest.mark.parametrize("arch", ["lenet", "linear"])
def test_certify_many_shard_independence(arch):
    torch.manual_seed(0)
    if arch == "lenet":
        model, xs = build_model("lenet", LENET_INFO), torch.rand(6, 1, 28, 28)
        num_classes, labels = 10, [3, 1, 4, 1, 5, 9]
    else:
        model, xs, true_class, _ = linear_problem(6)
        num_classes, labels = 2, true_class.tolist()
    smooth = Smooth(model, num_classes, 0.25)
    idx = [10, 11, 12, 13, 14, 15]
    kw = dict(n0=50, n=300, alpha=0.01, batch_size=128, seed=3)
    whole = smooth.certify_many(xs, labels, idx, **kw)
    parts = (smooth.certify_many(xs[:2], labels[:2], idx[:2], **kw)
             + smooth.certify_many(xs[2:], labels[2:], idx[2:], **kw))
    assert _no_time(whole) == _no_time(parts)
    # a shuffled batch gives every example the same row
    perm = [4, 0, 5, 2, 1, 3]
    shuffled = smooth.certify_many(xs[perm], [labels[i] for i in perm], [idx[i] for i in perm], **kw)
    assert sorted(_no_time(shuffled)) == sorted(_no_time(whole))
    # certify_many's row for idx equals certify with the generator seeded by (seed, idx)
    g = torch.Generator().manual_seed(example_seed(3, idx[2]))
    assert smooth.certify(xs[2], 50, 300, 0.01, 128, generator=g) == (whole[2].predict, whole[2].radius)
    # and another seed gives other noise (the seed is used)
    other = smooth.certify_many(xs, labels, idx, **{**kw, "seed": 4})
    assert [r.radius for r in other] != [r.radius for r in whole]


def test_certify_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = build_model("lenet", LENET_INFO)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Smooth(model, 10, 0.25).certify_many(torch.rand(2, 1, 28, 28), [0, 1], [0, 1], n0=10, n=50, alpha=0.1)
    assert model.training
    assert all(torch.equal(before[k], v) and v.is_contiguous() for k, v in model.state_dict().items())


def test_channels_last_and_slicing_change_speed_not_results():
    """The CPU fast path (channels-last copy, forward slices) computes the same base classifier: on the same
    noise its counts equal the plain network's (LeNet outputs differ by ~1e-7; a flipped argmax would need a
    near-exact tie)."""
    torch.manual_seed(0)
    model = build_model("lenet", LENET_INFO)
    x = torch.rand(1, 28, 28)
    fast = Smooth(model, 10, 0.25)
    plain = Smooth(model, 10, 0.25, channels_last=False, forward_batch=10_000)
    assert fast.channels_last and not plain.channels_last
    counts = []
    for s in (fast, plain):
        with s._certifying():
            counts.append(s._sample_counts(x, 2000, 1000, torch.Generator().manual_seed(0)).tolist())
    # equal here; one flipped argmax (a near-exact tie on another CPU's kernels) is tolerated
    assert sum(abs(a - b) for a, b in zip(*counts)) <= 2
    assert sum(counts[0]) == 2000 and max(counts[0]) < 2000  # several classes occur: the comparison has teeth


def test_minimum_n():
    assert min_certify_n(0.001) == 10  # 0.001 ** (1/10) = 0.501 >= 0.5 > 0.001 ** (1/9)
    assert min_predict_n(0.001) == 11  # 2 * 0.5 ** 11 = 0.00098 <= 0.001
    for alpha in (0.5, 0.1, 0.001, 1e-6):
        n = min_certify_n(alpha)
        assert lower_confidence_bound(n, n, alpha) >= 0.5
        assert n == 1 or lower_confidence_bound(n - 1, n - 1, alpha) < 0.5
    # at the minimum n a unanimous example is certified; below it the call is refused
    model, xs, true_class, _ = linear_problem(1, margin_lo=5, margin_hi=5)
    smooth = Smooth(model, 2, SIGMA)
    pred, radius = smooth.certify(xs[0], 5, 10, 0.001, 10, generator=torch.Generator().manual_seed(0))
    assert pred == int(true_class[0]) and radius == pytest.approx(SIGMA * norm.ppf(0.001 ** 0.1))


# --- bad arguments ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(n0=0), "n0 must be"), (dict(n=0), "n must be"), (dict(n=9, alpha=0.001), "needs n >= 10"),
    (dict(alpha=0.0), "alpha must be in"), (dict(alpha=1.0), "alpha must be in"), (dict(alpha=-0.1), "alpha"),
    (dict(batch_size=0), "batch_size"), (dict(n=10.5), "n must be"), (dict(seed=-1), "seed"),
])
def test_certify_many_rejects_bad_arguments(kwargs, message):
    model, xs, true_class, _ = linear_problem(2)
    args = dict(n0=N0, n=200, alpha=ALPHA, batch_size=100, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        Smooth(model, 2, SIGMA).certify_many(xs, true_class.tolist(), [0, 1], **args)


@pytest.mark.parametrize("sigma", [0.0, -0.25, float("nan"), "0.25"])
def test_bad_sigma(sigma):
    model, *_ = linear_problem(1)
    with pytest.raises(ValueError, match="sigma"):
        Smooth(model, 2, sigma)


def test_bad_shapes_and_lengths():
    torch.manual_seed(0)
    smooth = Smooth(build_model("lenet", LENET_INFO), 10, 0.25)
    xs = torch.rand(3, 1, 28, 28)
    with pytest.raises(ValueError, match="ONE example"):
        smooth.certify(xs, N0, 100, ALPHA)            # a batch where one example is expected
    with pytest.raises(ValueError, match="ONE example"):
        smooth.certify(xs[0, 0], N0, 100, ALPHA)      # [H, W]: the channel is missing
    with pytest.raises(ValueError, match="ONE example"):
        smooth.predict(torch.rand(1, 14, 14), 100, ALPHA)  # another dataset's shape
    with pytest.raises(ValueError, match="batch"):
        smooth.certify_many(xs[0], [0], [0])          # one example where a batch is expected
    with pytest.raises(ValueError, match="same length"):
        smooth.certify_many(xs, [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="distinct"):
        smooth.certify_many(xs, [0, 1, 2], [0, 0, 1])
    with pytest.raises(ValueError, match="floating-point"):
        smooth.certify((xs[0] * 255).to(torch.uint8), N0, 100, ALPHA)
    with pytest.raises(ValueError, match="num_classes"):
        Smooth(build_model("lenet", LENET_INFO), 3, 0.25).certify(xs[0], N0, 100, ALPHA)
    declared = Smooth(build_model("lenet", LENET_INFO), 10, 0.25, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"expected an example of shape \[1, 28, 28\]"):
        declared.certify(torch.rand(1, 27, 28), N0, 100, ALPHA)


def test_defaults_are_cohens():
    assert (N0, N, ALPHA, ABSTAIN) == (100, 100_000, 0.001, -1)
    assert math.isclose(min_certify_n(ALPHA), 10)
