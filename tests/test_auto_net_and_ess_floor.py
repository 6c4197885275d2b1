"""``net="auto"`` (the default: the gated net on class labels, LossNet otherwise; under a loss of the user's the
first batch decides) and ``min_ess``, the floor on the weights' effective sample size."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter
from reweight.losses import cross_entropy
from reweight.monitor import effective_sample_size
from reweight.nets import GatedNet, LossNet

CLASSES = 3


def _parts(seed: int = 0, out: int = CLASSES):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out))
    g = torch.Generator().manual_seed(seed)
    meta = [(torch.randn(6, 4, generator=g), torch.randint(0, CLASSES, (6,), generator=g)) for _ in range(3)]
    return model, torch.optim.SGD(model.parameters(), lr=0.1), meta


def _batch(t: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(n, 4, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


# ------------------------------------------------------------------------------------------------ net="auto"


@pytest.mark.parametrize("loss_fn", [None, cross_entropy, functools.partial(cross_entropy, label_smoothing=0.1)])
def test_auto_is_the_gated_net_for_cross_entropy_on_class_logits(loss_fn):
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, loss_fn=loss_fn, seed=0)
    assert rw.options.net == "gated" and "net='gated'" in repr(rw)
    x, y = _batch(0)
    rw.step(x, y, model(x))
    assert isinstance(rw.net, GatedNet)


def _mse(pred, target):
    return (pred.squeeze(-1) - target) ** 2


def _own_ce(logits, targets):
    """A user's per-sample cross-entropy: the same loss, not the library's function."""
    return F.cross_entropy(logits, targets, reduction="none")


def _regression_parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    g = torch.Generator().manual_seed(seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), [(torch.randn(6, 4, generator=g), torch.randn(6))]


def test_auto_is_lossnet_for_regression_targets():
    model, opt, meta = _regression_parts()
    rw = MetaReweighter(model, opt, meta, loss_fn=_mse, seed=0)
    assert rw.options.net == "auto" and rw.net is None  # a loss of the user's: the first batch decides
    x = torch.randn(8, 4)
    assert rw.step(x, torch.randn(8), model(x)).shape == (8,)
    assert rw.options.net == "lossnet" and isinstance(rw.net, LossNet) and rw.normalization == "sum"


def _train(rw, model, opt, batches, start: int = 0):
    out, regression = [], isinstance(model, nn.Linear)  # _regression_parts' model: float targets
    for t in range(start, start + batches):
        x, y = _batch(t)
        y = y.float() if regression else y
        w = rw.step(x, y, model(x))
        out.append(w)
        opt.zero_grad()
        (w * rw.loss_fn(model(x), y)).mean().backward()
        opt.step()
    return out


@pytest.mark.parametrize("task", ["classes", "regression"])
def test_auto_under_a_users_loss_is_what_the_labels_call_for_with_the_same_weights(task):
    """A user's own cross-entropy gets the gated net and ``"class"`` (as the library's cross-entropy does), a
    regression loss LossNet and ``"sum"``; the weights are those of naming that net, step for step."""
    runs = []
    for explicit in (False, True):
        if task == "classes":
            model, opt, meta = _parts()
            kwargs = {"loss_fn": cross_entropy if explicit else _own_ce}
        else:
            model, opt, meta = _regression_parts()
            kwargs = {"loss_fn": _mse, **({"net": "lossnet"} if explicit else {})}
        rw = MetaReweighter(model, opt, meta, seed=0, **kwargs)
        runs.append(_train(rw, model, opt, 4))
        assert rw.options.net == ("gated" if task == "classes" else "lossnet")
        assert rw.normalization == ("class" if task == "classes" else "sum")
    for own, named in zip(*runs, strict=True):
        torch.testing.assert_close(own, named, rtol=0, atol=0)


@pytest.mark.parametrize("task", ["classes", "regression"])
def test_a_pending_auto_net_is_settled_by_a_loaded_state_and_resumes_exactly(task):
    def parts():
        return _parts() if task == "classes" else _regression_parts()

    loss = _own_ce if task == "classes" else _mse
    model, opt, meta = parts()
    rw = MetaReweighter(model, opt, meta, loss_fn=loss, seed=0)
    whole = _train(rw, model, opt, 5)

    model, opt, meta = parts()
    first = MetaReweighter(model, opt, meta, loss_fn=loss, seed=0)
    _train(first, model, opt, 3)
    state = first.state_dict()
    resumed = MetaReweighter(model, opt, meta, loss_fn=loss, seed=1)
    assert resumed.options.net == "auto"
    resumed.load_state_dict(state)
    assert resumed.options.net == first.options.net and resumed.normalization == first.normalization
    rest = _train(resumed, model, opt, 2, start=3)
    for a, b in zip(whole[3:], rest, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_state_saved_before_the_first_step_leaves_auto_pending():
    model, opt, meta = _parts()
    state = MetaReweighter(model, opt, meta, loss_fn=_own_ce, seed=0).state_dict()
    rw = MetaReweighter(model, opt, meta, loss_fn=_own_ce, seed=0)
    rw.load_state_dict(state)
    assert rw.options.net == "auto" and rw.net is None
    _train(rw, model, opt, 1)
    assert isinstance(rw.net, GatedNet)


def test_auto_under_a_users_loss_reads_the_history_with_the_net_it_settles_on():
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, loss_fn=_own_ce, loss_history=True, seed=0)
    x, y = _batch(0)
    with pytest.raises(ValueError, match="sample_ids"):
        rw.step(x, y, model(x))
    rw.step(x, y, model(x), sample_ids=torch.arange(16))
    assert isinstance(rw.net, GatedNet) and rw.net.requires_history


def test_auto_with_net_kwargs_is_refused_naming_the_choice():
    model, opt, meta = _parts()
    with pytest.raises(ValueError, match="net='auto' picks one by the labels"):
        MetaReweighter(model, opt, meta, net_kwargs={"hidden": 10})


# -------------------------------------------------------------------------------------------------- min_ess


class Spread(nn.Module):
    """A user's net whose weights ``exp(a * loss)`` are far from uniform (an effective sample size well below
    the batch), so that a floor has work to do."""

    def __init__(self, a: float = 4.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, loss, logits=None, targets=None):
        return torch.exp(self.a * loss.to(self.a.dtype))


@pytest.mark.parametrize("value,error", [(-0.1, ValueError), (1.0, ValueError), ("0.2", TypeError), (True, TypeError)])
def test_min_ess_outside_zero_to_one_is_refused(value, error):
    model, opt, meta = _parts()
    with pytest.raises(error, match="min_ess"):
        MetaReweighter(model, opt, meta, min_ess=value)


def _weights(net: str, min_ess: float, steps: int = 4, **kwargs) -> list[torch.Tensor]:
    model, opt, meta = _parts()
    kwargs.setdefault("normalization", "sum")
    spread = Spread(8.0 if kwargs["normalization"] == "class" else 4.0)  # within classes the spread is smaller
    if net != "l2rw":
        kwargs.setdefault("veto", math.inf)  # the floor on the net's own weights
    rw = MetaReweighter(model, opt, meta, net=spread if net == "spread" else net, min_ess=min_ess, seed=0,
                        **kwargs)  # fmt: skip
    out = []
    for t in range(steps):
        x, y = _batch(t)
        logits = model(x)
        w = rw.step(x, y, logits)
        out.append(w)
        opt.zero_grad()
        (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    return out


@pytest.mark.parametrize("normalization", ["sum", "class"])
@pytest.mark.parametrize("net", ["l2rw", "spread"])
def test_the_floor_holds_and_keeps_the_order_and_the_sum(net, normalization):
    free = _weights(net, 0.0, steps=1, normalization=normalization)[0]
    floored = _weights(net, 0.6, steps=1, normalization=normalization)[0]
    assert float(effective_sample_size(free)) < 0.6  # the floor has work to do
    assert float(effective_sample_size(floored)) >= 0.6 * (1 - 1e-5)
    torch.testing.assert_close(floored.sum(), free.sum())
    # a blend toward the mean: floored = s * free + (1 - s) * mean, the same s for every sample
    s = (floored - floored.mean()) / (free - free.mean())
    torch.testing.assert_close(s, s.mean().expand_as(s))
    assert 0 < float(s.mean()) < 1


def test_the_floor_leaves_weights_above_it_unchanged():
    free = _weights("l2rw", 0.0, steps=1)[0]
    ess = float(effective_sample_size(free))
    torch.testing.assert_close(_weights("l2rw", ess * 0.9, steps=1)[0], free)


def test_a_sample_with_a_non_finite_loss_keeps_weight_zero_under_the_floor():
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, net=Spread(), min_ess=0.9, on_nonfinite="skip", seed=0)
    x, y = _batch(0)
    logits = model(x).detach().clone()
    logits[3, 0] = float("nan")
    w = rw.step(x, y, logits)
    assert w[3] == 0 and torch.isfinite(w).all()
    kept = torch.cat([w[:3], w[4:]])
    assert float(effective_sample_size(kept)) >= 0.9 * (1 - 1e-5)


def test_the_floor_scales_the_nets_meta_gradient_by_one_minus_the_blend():
    """The blend's share carries no gradient: one meta update with the floor moves the net by ``s`` times the
    update without it, ``s`` the share of the net's own weights kept (read from the same net before the update).
    A tiny look-ahead lr keeps the coefficients (which depend on the weights through the look-ahead) equal."""
    deltas, shares = [], []
    for floor in (0.0, 0.9):
        model, opt, meta = _parts()
        net = Spread().double()
        start = [p.detach().clone() for p in net.parameters()]
        rw = MetaReweighter(model, opt, meta, net=net, min_ess=floor, seed=0, meta_warmup=0, lookahead_lr=1e-6,
                            normalization="sum", min_ess_until_evidence=0,
                            meta_optimizer=lambda p: torch.optim.SGD(p, lr=1.0))  # fmt: skip
        x, y = _batch(0)
        logits = model(x)
        with torch.no_grad():
            raw = net(cross_entropy(logits, y))
            free = raw * (raw.numel() / raw.sum())
            floored = rw._slot.floor_ess(free)
        shares.append(float((floored - floored.mean()).norm() / (free - free.mean()).norm()))
        rw.step(x, y, logits)
        deltas.append(torch.cat([(p.detach() - s).flatten() for p, s in zip(net.parameters(), start)]))
    assert shares[0] == pytest.approx(1.0) and 0 < shares[1] < 1
    torch.testing.assert_close(deltas[1], shares[1] * deltas[0], rtol=1e-4, atol=0)


@pytest.mark.parametrize("net", ["auto", "gated", "lossnet", "logitnet", "metainfonet", "l2rw"])
def test_the_default_floor_is_a_fifth_of_the_batch_and_two_fifths_for_l2rw(net):
    model, opt, meta = _parts()
    assert MetaReweighter(model, opt, meta, net=net).options.min_ess == (0.4 if net == "l2rw" else 0.2)
    assert MetaReweighter(model, opt, meta, net=net, min_ess=0).options.min_ess == 0.0
    # L2RW's 0.4 was chosen within classes; under "sum" (or raw weights) it keeps the nets' floor
    for normalization in ("sum", "none"):
        assert MetaReweighter(model, opt, meta, net=net, normalization=normalization).options.min_ess == 0.2


def test_l2rw_weights_under_the_default_are_those_of_the_explicit_floor():
    within = {"normalization": "class"}
    default_w, explicit_w = _weights("l2rw", None, 3, **within), _weights("l2rw", 0.4, 3, **within)
    for default, explicit in zip(default_w, explicit_w, strict=True):
        torch.testing.assert_close(default, explicit, rtol=0, atol=0)
