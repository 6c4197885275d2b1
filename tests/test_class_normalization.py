"""``normalization="class"``: the weights normalised within each class of the targets, the default for the
per-sample weighting of class labels (its gradient against an independent reference on every engine is in
``test_meta_gradient.py``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from reweight import ClassNormalizationWarning, ClassShareWarning, MetaReweighter
from reweight.class_checks import ClassChecks
from reweight.distributed import DataParallelGroup
from reweight.net_slot import class_members, class_normalize

CLASSES = 3


def _parts(out: int = CLASSES):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out))
    g = torch.Generator().manual_seed(0)
    meta = [(torch.randn(6, 4, generator=g), torch.randint(0, CLASSES, (6,), generator=g)) for _ in range(3)]
    return model, torch.optim.SGD(model.parameters(), lr=0.1), meta


class ByLoss(nn.Module):
    """A user's net with unequal weights: ``exp(loss)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))

    def forward(self, loss, logits=None, targets=None):
        return torch.exp(self.a * loss.to(self.a.dtype))


def _mse(pred, target):
    return (pred.squeeze(-1) - target) ** 2


class ByLogits(ByLoss):
    requires_logits = True


@pytest.mark.parametrize("net", ["auto", "gated", "logitnet", "metainfonet", "l2rw", "module"])
def test_the_default_is_class_for_nets_that_read_the_logits_and_l2rw_under_cross_entropy(net):
    model, opt, meta = _parts()
    spec = ByLogits() if net == "module" else net
    assert MetaReweighter(model, opt, meta, net=spec).normalization == "class"
    assert MetaReweighter(model, opt, meta, net=spec, normalization="sum").normalization == "sum"


@pytest.mark.parametrize("net", ["lossnet", "module"])
def test_the_default_is_sum_for_the_loss_alone(net):
    model, opt, meta = _parts()
    spec = ByLoss() if net == "module" else net
    assert MetaReweighter(model, opt, meta, net=spec).normalization == "sum"
    assert MetaReweighter(model, opt, meta, net=spec, normalization="class").normalization == "class"


def test_the_default_is_sum_for_other_losses_and_for_the_group_net():
    model, opt, meta = _parts(out=1)
    assert MetaReweighter(model, opt, meta, loss_fn=_mse, net="lossnet").normalization == "sum"
    meta = [(x, y.float()) for x, y in meta]
    rw = MetaReweighter(model, opt, meta, loss_fn=_mse, net="l2rw")
    assert rw.normalization == "auto"  # L2RW under a loss of the user's: the first batch's targets decide
    x = torch.randn(6, 4)
    rw.step(x, torch.randn(6), model(x))
    assert (rw.normalization, rw.options.min_ess) == ("sum", 0.2)
    model, opt, meta = _parts()
    for kwargs in ({"num_groups": 2}, {"num_groups": 2, "within": "logitnet"}):
        assert MetaReweighter(model, opt, meta, net="groups", net_kwargs=kwargs).normalization == "sum"


def test_each_class_keeps_its_count_and_the_ranking_within_it():
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, net=ByLogits(), min_ess=0, veto=math.inf, seed=0)
    x, y = torch.randn(30, 4), torch.arange(30) % CLASSES
    y[:6] = 0  # unequal class counts
    w = rw.step(x, y, model(x))
    losses = nn.functional.cross_entropy(model(x), y, reduction="none").detach()
    for c in range(CLASSES):
        members = y == c
        torch.testing.assert_close(w[members].sum(), members.sum().to(w.dtype))
        expected = torch.exp(losses[members]) / torch.exp(losses[members]).mean()
        torch.testing.assert_close(w[members], expected)


def test_uniform_raw_weights_stay_uniform_and_a_zero_class_stays_zero():
    group = DataParallelGroup(None)
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    members = class_members(y, CLASSES, torch.float64)
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(class_normalize(ones, members, group), ones)
    raw = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    w = class_normalize(raw, members, group)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.5, 1.0], dtype=torch.float64))


def test_soft_targets_keep_the_batch_total():
    group = DataParallelGroup(None)
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(8, CLASSES, generator=g), -1).double()
    raw = torch.rand(8, generator=g).double() + 0.1
    w = class_normalize(raw, class_members(soft, CLASSES, torch.float64), group)
    torch.testing.assert_close(w.sum(), torch.tensor(8.0).double())
    ones = class_normalize(torch.ones(8, dtype=torch.float64), class_members(soft, CLASSES, torch.float64), group)
    torch.testing.assert_close(ones, torch.ones(8, dtype=torch.float64))
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, net=ByLogits(), min_ess=0, seed=0)
    x = torch.randn(8, 4)
    out = rw.step(x, soft.float(), model(x))
    torch.testing.assert_close(out.sum(), torch.tensor(8.0))


def test_targets_that_are_not_class_labels_are_refused_naming_the_option():
    model, opt, meta = _parts(out=1)
    meta = [(torch.randn(6, 4), torch.randn(6))]
    rw = MetaReweighter(model, opt, meta, loss_fn=_mse, net="lossnet", normalization="class", seed=0)
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="normalization='class'.*needs class labels.*normalization='sum'"):
        rw.step(x, torch.randn(8), model(x))
    assert rw.step_count == 0
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(b, p.detach(), rtol=0, atol=0)


def test_batches_with_many_samples_alone_in_their_class_warn_once():
    model, opt, meta = _parts(out=10)
    meta = [(torch.randn(6, 4), torch.randint(0, 10, (6,)))]
    rw = MetaReweighter(model, opt, meta, net="logitnet", seed=0, veto=math.inf)  # the normalisation's own weights
    x = torch.randn(8, 4)
    with pytest.warns(ClassNormalizationWarning, match="8 of the batch's 8 samples are the only one of their class"):
        weights = rw.step(x, torch.arange(8), model(x))
    torch.testing.assert_close(weights, torch.ones(8))  # alone in its class: weight 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClassNormalizationWarning)
        rw.step(x, torch.arange(8), model(x))  # once only
        rw2 = MetaReweighter(model, opt, meta, net="logitnet", seed=0)
        rw2.step(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), model(x))  # every class has company: no warning


def _long_tail_run(train_labels, meta_labels, steps: int, **kwargs) -> list[warnings.WarningMessage]:
    """``steps`` reweighted steps of batch 30 whose labels cycle through ``train_labels``, against meta batches
    of 30 drawn from ``meta_labels``; the warnings they raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = [(torch.randn(30, 4), meta_labels[i * 30 : (i + 1) * 30]) for i in range(len(meta_labels) // 30)]
    rw = MetaReweighter(model, opt, meta, net="logitnet", seed=0, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            x, y = torch.randn(30, 4), train_labels[(i * 30) % len(train_labels) :][:30]
            rw.step(x, y, model(x))
    return [w for w in caught if issubclass(w.category, ClassShareWarning)]


def test_training_class_shares_unlike_the_meta_sets_warn_once_with_the_alternative():
    tail = torch.tensor([0] * 24 + [1] * 5 + [2] * 1)  # 80% / 17% / 3% of every training batch
    balanced = torch.arange(150) % CLASSES
    # 150 samples per side reach 50 per class after the 5th step; no warning before it, one after
    assert _long_tail_run(tail, balanced, 4) == []
    caught = _long_tail_run(tail, balanced, 12)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "class 0 holds 80% of the training samples and 33% of the meta samples" in message
    assert "pass normalization='sum'" in message
    assert "with clean labels veto=math.inf as well" in message  # the veto cost the long tail's gain (results.md)
    assert caught[0].filename == __file__  # points at the caller of step
    assert _long_tail_run(tail, balanced, 12, normalization="sum") == []  # 'sum' can rebalance: nothing to say


def test_balanced_classes_with_label_noise_do_not_warn():
    g = torch.Generator().manual_seed(1)
    noisy = torch.randint(0, CLASSES, (360,), generator=g)  # uniform noise keeps the classes' shares
    assert _long_tail_run(noisy, torch.arange(150) % CLASSES, 12) == []
    # the same long tail in both sets: the normalisation keeps the shares the meta set has too
    tail = torch.tensor([0] * 24 + [1] * 5 + [2] * 1)
    assert _long_tail_run(tail, tail.repeat(5), 12) == []


def test_class_shares_distance_and_soft_meta_targets():
    checks = ClassChecks(per_class=1, threshold=0.2)
    checks.meta(torch.full((3, CLASSES), 1 / CLASSES), CLASSES)  # soft meta targets count by probability
    torch.testing.assert_close(checks.meta_counts, torch.ones(CLASSES))
    with pytest.warns(ClassShareWarning, match="total variation 0.67"):
        checks.train(torch.tensor([0, 0, 0]), CLASSES)  # all class 0 against a uniform meta set: 1 - 1/3
    assert checks.done


def test_l2rw_weights_each_class_among_itself_and_a_class_it_zeroes_is_not_a_collapse():
    """L2RW's weights (the clamped coefficients) sum to each class's count where any is positive; a class whose
    samples all pull against the meta batch gets none, by L2RW's rule, and the collapse monitor stays quiet."""
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, net="l2rw", min_ess=0, seed=0)
    rw.collapse_monitor.every, rw.collapse_monitor.patience = 1, 1
    x, y = torch.randn(30, 4), torch.arange(30) % CLASSES
    zeroed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a WeightCollapseWarning fails the test
        for _ in range(20):
            w = rw.step(x, y, model(x))
            for c in range(CLASSES):
                total = float(w[y == c].sum())
                assert total == pytest.approx(10.0, abs=1e-4) or total == 0.0
                zeroed += total == 0.0
            assert (w >= 0).all()
            opt.zero_grad()
            (w * nn.functional.cross_entropy(model(x), y, reduction="none")).mean().backward()
            opt.step()
    assert zeroed > 0  # the case the monitor must not call a collapse did occur


def _own_cross_entropy(logits, targets):
    """A user's per-sample cross-entropy: not the library's function, the same loss."""
    return nn.functional.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("net", ["gated", "metainfonet", "logitnet", "l2rw"])
def test_a_users_own_cross_entropy_gets_the_class_default_from_the_first_batch(net):
    """The default follows the labels, not the loss function's identity: a user's own cross-entropy on class
    indices gets ``"class"`` (and L2RW its floor of 0.4) at the first step, with the same weights as the
    library's cross-entropy on every step."""
    runs = []
    for loss_fn in (None, _own_cross_entropy):
        model, opt, meta = _parts()
        rw = MetaReweighter(model, opt, meta, net=net, loss_fn=loss_fn, seed=0)
        assert rw.normalization == ("class" if loss_fn is None else "auto")
        weights = []
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(12, 4, generator=g), torch.randint(0, CLASSES, (12,), generator=g)
            w = rw.step(x, y, model(x))
            weights.append(w)
            opt.zero_grad()
            (w * nn.functional.cross_entropy(model(x), y, reduction="none")).mean().backward()
            opt.step()
        assert rw.normalization == "class"
        assert rw.options.min_ess == (0.4 if net == "l2rw" else 0.2)
        runs.append(weights)
    for library, own in zip(*runs, strict=True):
        torch.testing.assert_close(own, library, rtol=0, atol=0)


class _Tokens(nn.Module):
    """Token logits ``(batch, 2, 5)``: one loss per sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 5)

    def forward(self, x):
        return self.inner(x).reshape(-1, 1, 5).expand(-1, 2, 5)


def _loss_of_any_target(out, t):
    if out.ndim == 3:
        return nn.functional.cross_entropy(out.transpose(1, 2), t, reduction="none").mean(1)
    if t.ndim == 2:
        return nn.functional.cross_entropy(out, t, reduction="none")
    return (out[:, 0] - t.float()) ** 2


@pytest.mark.parametrize("case", ["soft targets", "binary logits", "float labels", "token logits"])
def test_targets_that_are_not_class_indices_settle_the_default_to_sum(case):
    torch.manual_seed(0)
    model = _Tokens() if case == "token logits" else nn.Linear(4, 1 if case == "binary logits" else CLASSES)
    x = torch.randn(6, 4)
    y = {
        "soft targets": torch.softmax(torch.randn(6, CLASSES), -1),
        "binary logits": torch.randint(0, 2, (6,)),
        "float labels": torch.rand(6),
        "token logits": torch.randint(0, 5, (6, 2)),
    }[case]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(model, opt, [(x, y)], net="l2rw", loss_fn=_loss_of_any_target, seed=0)
    assert rw.normalization == "auto"
    rw.step(x, y, model(x))
    assert (rw.normalization, rw.options.min_ess) == ("sum", 0.2)


def test_a_first_step_that_fails_its_checks_settles_nothing():
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, net="metainfonet", loss_fn=_own_cross_entropy, seed=0)
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        rw.step(x, torch.randint(0, CLASSES, (5,)), model(x))
    assert rw.normalization == "auto"
    rw.step(x, torch.randint(0, CLASSES, (6,)), model(x))
    assert rw.normalization == "class"
