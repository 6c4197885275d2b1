"""The defaults that need no knob: nets that start from uniform weights, a net update that does not depend on the
scale of the training lr (the coefficients divided by their sum of magnitudes), and the meta lr's warm-up."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter
from reweight.nets import create_weighting_net

from conftest import tiny_classifier

CLASSES = 3
NAMED = ["lossnet", "logitnet", "metainfonet", "gated"]


def _parts(seed: int = 0):
    return tiny_classifier(seed, CLASSES)


def _batch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(8, 4, generator=g), torch.randint(0, CLASSES, (8,), generator=g)


def _train(rw: MetaReweighter, model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        x, y = _batch(t)
        logits = model(x)
        weights = rw.step(x, y, logits)
        opt.zero_grad()
        (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()


# ------------------------------------------------------------------------------------------ uniform start


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("train", [True, False])
def test_each_named_net_starts_with_the_same_weight_for_every_sample(name, train):
    torch.manual_seed(0)
    net = create_weighting_net(name, CLASSES).train(train)  # MetaInfoNet samples its bottleneck in train mode
    losses = torch.tensor([0.01, 0.5, 2.0, 7.0, 30.0])
    logits = 5 * torch.randn(5, CLASSES)
    targets = torch.tensor([0, 1, 2, 0, 1])
    out = net(losses, logits, targets)
    weights = out.weights if hasattr(out, "weights") else out
    assert weights.shape == (5,)
    torch.testing.assert_close(weights, torch.full((5,), 0.5), rtol=0, atol=0)  # sigmoid(0), for every sample
    # uniform_start=False keeps the random start: the same inputs then get different weights
    torch.manual_seed(0)
    random = create_weighting_net(name, CLASSES, uniform_start=False).train(train)
    out = random(losses, logits, targets)
    assert (out.weights if hasattr(out, "weights") else out).std() > 1e-4


@pytest.mark.parametrize("name", NAMED)
def test_the_reweighters_first_weights_are_uniform_before_the_net_moves(name):
    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # a meta lr of 0 and no veto: the first step's weights are the initial net's, normalised
    rw = MetaReweighter(
        model, opt, meta, net=name, seed=0, veto=math.inf, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.0)
    )
    x, y = _batch(0)
    torch.testing.assert_close(rw.step(x, y, model(x)), torch.ones(8), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- the update's scale independence


def _built_slot(name: str, seed: int = 0):
    """A reweighter whose net (random start, so that every layer has a gradient) is built, and the inputs of one
    update: the net's differentiable weights and penalty on a batch, and coefficients with mixed signs."""
    model, meta = _parts(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(
        model,
        opt,
        meta,
        net=name,
        net_kwargs={"uniform_start": False},
        seed=seed,
        meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),  # the net stays put: the updates are comparable
        meta_warmup=0,
        # one normalisation for every net: within classes the last layer's bias gets a near-zero gradient whose
        # float32 rounding is larger than a relative tolerance on it (the class normalisation's gradient is
        # checked against a float64 reference in test_meta_gradient.py)
        normalization="sum",
    )
    x, y = _batch(0)
    rw.step(x, y, model(x))  # builds the net
    logits = model(x).detach()
    losses = F.cross_entropy(logits, y, reduction="none")
    return rw, opt, (losses, logits, y)


def _net_grad(rw, opt, inputs, coefficients) -> list[torch.Tensor]:
    slot = rw._slot
    slot.net.train()
    torch.manual_seed(7)  # MetaInfoNet's bottleneck noise: the same draw for every call
    raw, penalty = slot.raw_weights(*inputs)
    slot.update(coefficients, slot.normalize(raw, inputs), penalty, None, 0, opt, None)
    return [p.grad.clone() for p in slot.net.parameters()]


@pytest.mark.parametrize("name", ["lossnet", "logitnet"])
def test_net_update_does_not_depend_on_the_coefficients_scale(name):
    """c and 1000 * c (the coefficients of a training lr 1000 times larger, in the small-lr regime) give the
    same .grad; the gradient is not trivial (every parameter gets one) and 2 c - 1 (another direction) differs.
    (MetaInfoNet's KL penalty is divided by the same scale, so its balance with the meta-gradient, the one its
    kl_weight was chosen with, follows the lr as in Algorithm 1.)"""
    rw, opt, inputs = _built_slot(name)
    c = torch.randn(8, generator=torch.Generator().manual_seed(3)) * 1e-6
    small, large = _net_grad(rw, opt, inputs, c), _net_grad(rw, opt, inputs, 1000 * c)
    for a, b in zip(small, large):  # equal up to float32 rounding of the sums
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert all(g.abs().max() > 0 for g in small), "a layer got no gradient"
    other = _net_grad(rw, opt, inputs, c.flip(0))
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(small, other))


def test_net_update_is_the_gradient_of_the_normalised_surrogate():
    """.grad is the gradient of sum_i c_i w_i / sum_i |c_i| (LossNet has no penalty)."""
    rw, opt, inputs = _built_slot("lossnet")
    c = torch.randn(8, generator=torch.Generator().manual_seed(4)) * 1e-3
    got = _net_grad(rw, opt, inputs, c)
    slot = rw._slot
    raw, _ = slot.raw_weights(*inputs)
    want = torch.autograd.grad((c / c.abs().sum() * slot.normalize(raw, inputs)).sum(), list(slot.net.parameters()))
    for a, b in zip(got, want):  # float32: the division before or after the sum rounds differently
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_training_lrs_1000_times_apart_move_the_net_alike():
    """End to end: two reweighters on the same data, training SGD lr 1e-3 and 1e-6 (both where the look-ahead is
    linear in the lr), move the net alike in their first update. The net's optimizer is SGD, which (unlike Adam)
    passes the gradient's scale on: without the division by sum |c| the second would move 1000 times less."""
    nets = {}
    for lr, meta_lr in ((1e-3, 1.0), (1e-6, 1.0), (1e-3, 0.0)):  # meta lr 0: the net's start
        model, meta = _parts()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        rw = MetaReweighter(
            model,
            opt,
            meta,
            net="lossnet",
            net_kwargs={"uniform_start": False},
            meta_optimizer=lambda p, meta_lr=meta_lr: torch.optim.SGD(p, lr=meta_lr),
            meta_warmup=0,
            seed=0,
        )
        x, y = _batch(0)
        rw.step(x, y, model(x))
        nets[lr, meta_lr] = torch.cat([p.detach().flatten() for p in rw.net.parameters()])
    start = nets[1e-3, 0.0]
    large, small = nets[1e-3, 1.0] - start, nets[1e-6, 1.0] - start
    assert large.abs().max() > 1e-3  # the net moved
    torch.testing.assert_close(small, large, rtol=0, atol=1e-3 * float(large.abs().max()))


# ------------------------------------------------------------------------------------------ meta warm-up


def _two_group_adamw(params):
    params = list(params)
    return torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 4e-3}], lr=1e-3)


def _warmup_run(warmup: int, seed: int = 0):
    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(model, opt, meta, meta_optimizer=_two_group_adamw, meta_warmup=warmup, seed=seed)
    return rw, model, opt


def test_meta_lr_warms_up_linearly_then_stays():
    warmup = 6
    rw, model, opt = _warmup_run(warmup)
    for k in range(1, 10):
        _train(rw, model, opt, range(k - 1, k))
        assert rw.step_count == k
        groups = rw.meta_optimizer.param_groups
        assert [g["reweight_lr"] for g in groups] == [1e-3, 4e-3]  # each group's own base lr, kept
        for g in groups:
            assert g["lr"] == pytest.approx(g["reweight_lr"] * min(1.0, k / warmup), rel=1e-12), k


def test_the_default_warms_up_over_300_steps_and_0_disables_it():
    rw, model, opt = _warmup_run(300)
    _train(rw, model, opt, range(3))
    assert [g["lr"] for g in rw.meta_optimizer.param_groups] == pytest.approx([1e-3 * 3 / 300, 4e-3 * 3 / 300])
    model, meta = _parts()
    assert MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta).options.meta_warmup == 300
    rw, model, opt = _warmup_run(0)
    _train(rw, model, opt, range(3))
    assert [g["lr"] for g in rw.meta_optimizer.param_groups] == [1e-3, 4e-3]


def _save(rw: MetaReweighter, model: nn.Module, opt: torch.optim.Optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save({"rw": rw.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    return buffer.getvalue()


def test_a_resume_mid_warm_up_continues_exactly():
    warmup, stop, steps = 8, 3, 11
    rw, model, opt = _warmup_run(warmup)
    _train(rw, model, opt, range(steps))
    want_net = copy.deepcopy(rw.net.state_dict())
    want_lrs = [g["lr"] for g in rw.meta_optimizer.param_groups]

    rw, model, opt = _warmup_run(warmup)
    _train(rw, model, opt, range(stop))
    saved = _save(rw, model, opt)
    lrs_at_stop = [g["lr"] for g in rw.meta_optimizer.param_groups]
    assert lrs_at_stop == pytest.approx([1e-3 * stop / warmup, 4e-3 * stop / warmup])  # mid-warm-up

    state = torch.load(io.BytesIO(saved), weights_only=False)
    rw, model, opt = _warmup_run(warmup, seed=1)  # another seed: the net and its RNG must come from the state
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rw.load_state_dict(state["rw"])
    assert [g["lr"] for g in rw.meta_optimizer.param_groups] == lrs_at_stop
    assert [g["reweight_lr"] for g in rw.meta_optimizer.param_groups] == [1e-3, 4e-3]
    _train(rw, model, opt, range(stop, steps))
    assert [g["lr"] for g in rw.meta_optimizer.param_groups] == want_lrs == [1e-3, 4e-3]
    for key, value in want_net.items():
        assert torch.equal(rw.net.state_dict()[key], value), key


def test_meta_lr_follows_the_training_lrs_decay_from_its_peak():
    """With ``meta_follows_lr`` the meta lr is its warmed-up value times the training lr over the largest
    training lr seen so far: a warm-up of the training lr leaves it whole, a decay scales it down."""
    warmup = 4
    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(model, opt, meta, meta_optimizer=_two_group_adamw, meta_warmup=warmup, meta_follows_lr=True)
    assert rw.options.meta_follows_lr is True
    training_lrs = [0.05, 0.1, 0.2, 0.2, 0.02, 0.02, 0.002, 0.2]
    for k, lr in enumerate(training_lrs, start=1):
        for group in opt.param_groups:
            group["lr"] = lr
        _train(rw, model, opt, range(k - 1, k))
        ratio = lr / max(training_lrs[:k])
        for g, base in zip(rw.meta_optimizer.param_groups, (1e-3, 4e-3)):
            assert g["lr"] == pytest.approx(base * min(1.0, k / warmup) * ratio, rel=1e-12), k
            assert g["reweight_peak_lr"] == max(training_lrs[:k])
    with pytest.raises(TypeError, match="meta_follows_lr must be a bool"):
        MetaReweighter(model, opt, meta, meta_follows_lr=1)


def test_a_resume_keeps_the_peak_training_lr_the_meta_lr_follows():
    """The largest training lr seen travels in the meta optimizer's state: a run resumed after the training lr
    decayed continues with the same meta lrs and ends with the same net as one run straight through."""
    schedule = [0.1, 0.1, 0.2, 0.05, 0.05, 0.01, 0.01, 0.002]
    stop = 5

    def build(seed=0):
        model, meta = _parts()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rw = MetaReweighter(model, opt, meta, meta_warmup=2, meta_follows_lr=True, seed=seed)
        return rw, model, opt

    def train(rw, model, opt, steps):
        for t in steps:
            for group in opt.param_groups:
                group["lr"] = schedule[t]
            _train(rw, model, opt, range(t, t + 1))

    rw, model, opt = build()
    train(rw, model, opt, range(len(schedule)))
    want_net, want_lrs = copy.deepcopy(rw.net.state_dict()), [g["lr"] for g in rw.meta_optimizer.param_groups]

    rw, model, opt = build()
    train(rw, model, opt, range(stop))
    state = torch.load(io.BytesIO(_save(rw, model, opt)), weights_only=False)
    rw, model, opt = build(seed=1)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rw.load_state_dict(state["rw"])
    assert [g["reweight_peak_lr"] for g in rw.meta_optimizer.param_groups] == [0.2]
    train(rw, model, opt, range(stop, len(schedule)))
    assert [g["lr"] for g in rw.meta_optimizer.param_groups] == want_lrs == [pytest.approx(1e-3 * 0.002 / 0.2)]
    for key, value in want_net.items():
        assert torch.equal(rw.net.state_dict()[key], value), key
