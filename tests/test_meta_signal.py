"""MetaSignalMonitor: one warning, naming lookahead_lr, when the meta-gradient is too small for the net to learn."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter
from reweight.monitor import MetaSignalMonitor, WeakMetaGradientWarning

from conftest import make_batch, make_cnn


def net_with_grad(scale: float, decay: float, optimizer=torch.optim.Adam):
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    for p in net.parameters():
        p.grad = torch.full_like(p, scale)
    return net, optimizer(net.parameters(), lr=1e-3, weight_decay=decay)


def observe(monitor, net, meta_opt, updates: int, lookahead_lr=None, weights=None):
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    weights = torch.tensor([0.98, 1.0, 1.02, 1.0]) if weights is None else weights  # near uniform
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for step in range(updates):
            monitor.observe(step, net, meta_opt, opt, lookahead_lr, weights)
    return [r for r in rec if issubclass(r.category, WeakMetaGradientWarning)]


def test_warns_once_after_patience_checks_below_the_decay_pull_naming_the_fix():
    net, meta_opt = net_with_grad(1e-7, 5e-4)
    pull = 5e-4 * torch.cat([p.detach().flatten() for p in net.parameters()]).norm()
    assert pull > 1e-7 * 5**0.5  # the gradient's norm is below the pull
    monitor = MetaSignalMonitor(every=2, patience=3)
    fired = observe(monitor, net, meta_opt, updates=20)
    assert len(fired) == 1
    assert monitor.fired_at == 6  # checks on updates 2, 4, 6 (update 0 is not judged)
    message = str(fired[0].message)
    assert "lr (0.005): pass lookahead_lr=0.1" in message


def test_with_a_large_lookahead_lr_already_the_warning_names_the_decay_instead():
    net, meta_opt = net_with_grad(1e-7, 5e-4)
    fired = observe(MetaSignalMonitor(every=1, patience=2), net, meta_opt, updates=5, lookahead_lr=0.5)
    message = str(fired[0].message)
    assert "lookahead_lr=0.5: give the net a decoupled decay" in message and "pass lookahead_lr" not in message


@pytest.mark.parametrize(
    "scale, decay, optimizer",
    [
        (1e-1, 5e-4, torch.optim.Adam),  # the meta-gradient outweighs the decay
        (1e-7, 5e-4, torch.optim.AdamW),  # decoupled decay does not compete with the gradient
        (1e-7, 0.0, torch.optim.Adam),  # no decay, a small but non-zero gradient: Adam still follows it
    ],
)
def test_no_warning_when_the_gradient_can_steer_the_net(scale, decay, optimizer):
    net, meta_opt = net_with_grad(scale, decay, optimizer)
    assert observe(MetaSignalMonitor(every=1, patience=2), net, meta_opt, updates=10) == []


def test_no_warning_once_the_weights_are_spread_out():
    """A net that learned, whose meta-gradient shrinks with a decaying lr late in training, is left alone."""
    net, meta_opt = net_with_grad(1e-7, 5e-4)
    spread = torch.tensor([0.2, 1.5, 0.3, 2.0])
    assert observe(MetaSignalMonitor(every=1, patience=2), net, meta_opt, updates=10, weights=spread) == []


def test_a_zero_meta_gradient_warns_even_without_weight_decay():
    net, meta_opt = net_with_grad(0.0, 0.0)
    fired = observe(MetaSignalMonitor(every=1, patience=2), net, meta_opt, updates=5, lookahead_lr=0.01)
    assert len(fired) == 1 and "lookahead_lr=0.01" in str(fired[0].message)


@pytest.mark.parametrize("lookahead_lr", [None, 0.5])
def test_reweighter_warns_at_lr_zero_and_not_with_a_lookahead_lr(lookahead_lr):
    model = make_cnn(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # as in the first step of a warm-up from 0
    meta = [make_batch(6, torch.float32, seed=2)]
    rw = MetaReweighter(model, optimizer, meta, net="lossnet", lookahead_lr=lookahead_lr, seed=0)
    rw.signal_monitor = MetaSignalMonitor(every=1, patience=2)
    x, y = make_batch(8, torch.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(4):
            logits = model(x)
            (rw.step(x, y, logits) * F.cross_entropy(logits, y, reduction="none")).mean().backward()
    fired = [r for r in rec if issubclass(r.category, WeakMetaGradientWarning)]
    if lookahead_lr is None:
        assert len(fired) == 1 and "lr (0)" in str(fired[0].message)
    else:
        assert fired == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        MetaSignalMonitor(every=0)
    with pytest.raises(TypeError, match="patience"):
        MetaSignalMonitor(patience=1.5)


def test_weighted_loss_is_the_weighted_mean_and_refuses_a_reduced_loss():
    from reweight import weighted_loss

    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    weights = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0])
    per_sample = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(weighted_loss(weights, per_sample), (weights * per_sample).sum() / 5)
    with pytest.raises(ValueError, match="reduction='none'"):
        weighted_loss(weights, F.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="reduce each sample's token losses first"):
        weighted_loss(weights, torch.ones(5, 7))
    with pytest.raises(TypeError, match="losses must be a Tensor"):
        weighted_loss(weights, 1.0)


def _digits_run(lookahead_lr, epochs: int, **reweighter_kwargs) -> tuple[list[WeakMetaGradientWarning], MetaReweighter]:
    """examples/lookahead_lr.py's run in-process (the quickstart's digits, 40% flipped labels, AdamW lr 5e-3,
    MetaInfoNet) with a monitor that checks every 10 meta updates; the weak-meta-gradient warnings it issued."""
    import importlib.util
    import sys
    from pathlib import Path

    from torch.utils.data import DataLoader, TensorDataset

    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("_quickstart_for_meta_signal", path)
    quickstart = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = quickstart
    spec.loader.exec_module(quickstart)
    (x, y), (xm, ym), _ = quickstart.digits_with_noisy_labels()
    torch.manual_seed(quickstart.SEED)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    meta = DataLoader(TensorDataset(xm, ym), batch_size=50, shuffle=True)
    rw = MetaReweighter(
        model, optimizer, meta, net="metainfonet", lookahead_lr=lookahead_lr, seed=quickstart.SEED, **reweighter_kwargs
    )
    rw.signal_monitor = MetaSignalMonitor(every=10, patience=3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(epochs):
            for xb, yb in train:
                logits = model(xb)
                loss = (rw.step(xb, yb, logits) * F.cross_entropy(logits, yb, reduction="none")).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return [r for r in rec if issubclass(r.category, WeakMetaGradientWarning)], rw


@pytest.mark.slow
def test_normalised_update_is_not_weak_at_an_adam_sized_lr_even_with_coupled_decay():
    """The net's update divides the meta-gradient by sum |dL_meta/dw_i|, so its size no longer scales with the
    training lr: at AdamW's lr 5e-3, without lookahead_lr, the meta-gradient outweighs even a coupled decay.
    The configuration is the old default, spelled out (Adam with coupled decay, no warm-up, a random start),
    under which an unnormalised meta-gradient (norm ~5e-5 against a pull ~2e-3) warned here."""
    old_style = {
        "meta_optimizer": functools.partial(torch.optim.Adam, lr=1e-3, weight_decay=5e-4),
        "meta_warmup": 0,
        "net_kwargs": {"uniform_start": False},
    }
    fired, rw = _digits_run(None, epochs=4, **old_style)
    assert rw.signal_monitor._updates == rw.step_count > 60  # the monitor checked 6 times or more
    assert fired == []


@pytest.mark.slow
def test_lookahead_lr_example_runs_and_does_not_warn_with_the_defaults():
    """examples/lookahead_lr.py with the default meta optimizer (AdamW, normalised update, warm-up): neither
    run's meta-gradient is weak, with or without lookahead_lr."""
    import os
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "lookahead_lr.py")
    out = subprocess.run([sys.executable, example, "--epochs", "8"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lookahead_lr=None: test accuracy" in out.stdout and "lookahead_lr=0.1: test accuracy" in out.stdout
    assert out.stdout.count("WeakMetaGradientWarning: False") == 2, out.stdout
