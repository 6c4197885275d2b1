"""Weight-collapse guard: one warning naming the step, on all-low or constant weights, checked every k steps."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import CollapseMonitor, MetaReweighter, WeightCollapseWarning


class ScaledNet(nn.Module):
    """Raw weights ``scale * f(loss)``, held fixed: zero (``scale=0``), constant (``vary=False``) or varying."""

    def __init__(self, scale: float = 1.0, vary: bool = True) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.unused = nn.Parameter(torch.zeros(()))  # the meta optimizer needs a parameter
        self.vary = vary

    def forward(self, loss, logits, targets):
        base = torch.sigmoid(loss) if self.vary else torch.ones_like(loss)
        return self.scale * base + 0 * self.unused


def _run(net, steps: int, monitor: CollapseMonitor | None = None, **kwargs) -> tuple[MetaReweighter, list]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    meta = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g))]
    rw = MetaReweighter(model, opt, meta, net=net, seed=0, **kwargs)
    if monitor is not None:
        rw.collapse_monitor = monitor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            logits = model(x)
            weights = rw.step(x, y, logits)
            opt.zero_grad()
            (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
            opt.step()
    return rw, [w for w in caught if issubclass(w.category, WeightCollapseWarning)]


@pytest.mark.parametrize("normalization", ["sum", "none"])
def test_all_zero_weights_warn_once_naming_the_step(normalization):
    rw, caught = _run(ScaledNet(scale=0.0), 30, CollapseMonitor(every=5, patience=2), normalization=normalization)
    assert len(caught) == 1  # once, although every later check is positive too
    message = str(caught[0].message)
    assert "at step 5:" in message and "below 0.001" in message  # checks on steps 0 and 5
    assert "meta learning rate" in message and "normalization='class' or 'sum'" in message and "meta set" in message
    assert rw.collapse_monitor.fired_at == 5


def test_low_weights_warn_with_normalization_none_only_below_the_threshold():
    _, caught = _run(
        ScaledNet(scale=1e-4), 4, CollapseMonitor(threshold=1e-3, every=1, patience=1), normalization="none"
    )
    assert len(caught) == 1 and "below 0.001" in str(caught[0].message)
    _, caught = _run(
        ScaledNet(scale=1e-4), 4, CollapseMonitor(threshold=1e-5, every=1, patience=1), normalization="none"
    )
    assert not caught
    # the same net under "sum": mean weight 1, nothing collapsed
    _, caught = _run(ScaledNet(scale=1e-4), 4, CollapseMonitor(threshold=1e-3, every=1, patience=1))
    assert not caught


def test_constant_weights_warn():
    _, caught = _run(ScaledNet(vary=False), 3, CollapseMonitor(every=1, patience=2))
    assert len(caught) == 1 and "constant" in str(caught[0].message) and "at step 1:" in str(caught[0].message)


@pytest.mark.parametrize("net", ["lossnet", "logitnet", "metainfonet"])
def test_healthy_training_does_not_warn(net):
    # no meta warm-up: the net moves at its full lr from the first update, so the weights of step 0 already
    # vary (from the default uniform start, warmed up, they stay within 1e-4 of each other for the first steps,
    # which is by design and which a check on every step with patience 1 reads as constant weights)
    _, caught = _run(net, 20, CollapseMonitor(every=1, patience=1), num_classes=3, meta_warmup=0)
    assert not caught


@pytest.mark.parametrize("net", ["lossnet", "logitnet", "metainfonet"])
def test_the_default_monitor_does_not_flag_the_uniform_start(net):
    """With every default (uniform start, meta warm-up, the default monitor) the check of step 0 finds the
    weights constant by design; the net has moved by the next check, so no warning."""
    rw, caught = _run(net, 101, num_classes=3)  # checks on steps 0, 50 and 100
    assert rw.collapse_monitor is not None and rw.collapse_monitor.patience == 2
    assert not caught


@pytest.mark.parametrize("interval", [6, 10])
def test_the_default_monitor_does_not_flag_the_uniform_start_under_an_interval(interval):
    """With a meta update every ``interval`` steps the warmed-up net is still within 1e-4 of uniform at the
    checks of steps 0, 50 and 100: by design, not a collapse. The constant-weights check starts when the meta
    warm-up ends."""
    rw, caught = _run("lossnet", 101, num_classes=3, interval=interval)
    assert rw.collapse_monitor is not None and rw.collapse_monitor.constant_after == rw.options.meta_warmup == 300
    assert not caught


def test_constant_weights_are_flagged_from_constant_after_on():
    monitor = CollapseMonitor(every=1, patience=1, constant_after=3)
    flat, losses = torch.ones(4), torch.tensor([0.5, 1.0, 2.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            monitor.observe(step, flat, losses)
    expected = r"at step 3: the weights are constant \(1 to 1\) over a batch whose losses vary \(0.5 to 4\)"
    with pytest.warns(WeightCollapseWarning, match=expected):
        monitor.observe(3, flat, losses)


def test_checks_only_every_k_steps():
    monitor = CollapseMonitor(every=10)
    calls = []
    reason = monitor._reason
    monitor._reason = lambda *args: calls.append(1) or reason(*args)
    _run("lossnet", 35, monitor)
    assert len(calls) == 4  # steps 0, 10, 20, 30: one host sync each


def test_a_passing_check_resets_the_patience():
    monitor = CollapseMonitor(every=1, patience=2)
    low, ok, losses = torch.zeros(3), torch.tensor([0.5, 1.0, 1.5]), torch.tensor([1.0, 2.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, w in enumerate([low, ok, low, ok, ok]):
            monitor.observe(step, w, losses)
    with pytest.warns(WeightCollapseWarning, match="at step 6"):
        monitor.observe(5, low, losses)
        monitor.observe(6, low, losses)
    monitor.reset()
    assert monitor.fired_at is None


def test_disabled_and_validation():
    rw, caught = _run(ScaledNet(scale=0.0), 3, collapse_threshold=None)
    assert rw.collapse_monitor is None and not caught
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    with pytest.raises(ValueError, match="threshold"):
        MetaReweighter(model, opt, meta, collapse_threshold=-1.0)
    with pytest.raises(TypeError, match="threshold"):
        MetaReweighter(model, opt, meta, collapse_threshold="high")
    with pytest.raises(ValueError, match="every"):
        CollapseMonitor(every=0)
    with pytest.raises(TypeError, match="patience"):
        CollapseMonitor(patience=1.5)


def test_effective_sample_size_values():
    from reweight.monitor import effective_sample_size

    assert float(effective_sample_size(torch.ones(8))) == pytest.approx(1.0)
    assert float(effective_sample_size(torch.tensor([4.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))) == pytest.approx(0.25)
    assert float(effective_sample_size(torch.zeros(4))) == 0.0


def test_collapse_onto_a_few_samples_warns_after_a_sustained_stretch():
    monitor = CollapseMonitor(every=1, patience=3, min_ess=0.1)
    losses = torch.linspace(0.1, 2.0, 20)
    peaked = torch.zeros(20)
    peaked[0] = 20.0  # one sample carries the batch: ESS 1/20
    healthy = torch.linspace(0.5, 1.5, 20)
    for step in range(2):
        monitor.observe(step, peaked, losses)
    monitor.observe(2, healthy, losses)  # the streak is broken: no warning yet
    assert monitor.fired_at is None
    expected = r"effective sample size 5% of the batch, below 10%.*min_ess at its default 0.2"
    with pytest.warns(WeightCollapseWarning, match=expected):
        for step in range(3, 6):
            monitor.observe(step, peaked, losses)
    assert monitor.fired_at == 5


class ZeroForClass0(nn.Module):
    """Raw weights ``sigmoid(loss)``, but exactly zero for every sample labelled 0 (a class whose outputs have
    underflowed)."""

    requires_logits = True

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, loss, logits, targets):
        return torch.sigmoid(loss) * (targets != 0) + 0 * self.unused


def test_a_class_with_all_weights_zero_warns_under_the_class_normalisation():
    rw, caught = _run(ZeroForClass0(), 12, CollapseMonitor(every=5, patience=2), normalization="class")
    assert len(caught) == 1 and rw.collapse_monitor.fired_at == 5
    message = str(caught[0].message)
    assert "samples belong to classes whose weights are all zero" in message and "normalization='class'" in message
    # under "sum" a zero weight is the net's choice for a sample, not a class losing its share: no warning
    _, caught = _run(ZeroForClass0(), 12, CollapseMonitor(every=5, patience=2), normalization="sum")
    assert caught == []


def test_zero_class_count_with_soft_targets_and_absent_classes():
    from reweight.monitor import _in_zero_classes

    w = torch.tensor([0.0, 0.0, 1.5, 1.5])
    assert _in_zero_classes(w, torch.tensor([0, 0, 1, 1]), 4) == 2  # classes 2 and 3 are absent, not dead
    assert _in_zero_classes(w, torch.tensor([1, 0, 0, 1]), 4) == 0  # each class has a zero and a positive weight
    soft = torch.tensor([[1.0, 0.0], [0.7, 0.3], [0.0, 1.0], [0.0, 1.0]])
    assert _in_zero_classes(w, soft, 2) == 2  # class 0 is dead; sample 1 also belongs to class 1
    assert _in_zero_classes(w, None, None) == 0
