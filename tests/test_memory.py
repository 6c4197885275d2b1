"""Long runs: no graph kept alive between steps, no memory growth (reduced scale; full scale: benchmarks/memory.py)."""

from __future__ import annotations

import gc
import sys
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter


def _setup(net: str, engine: str = "forward", interval: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    meta = [(torch.randn(8, 32, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    rw = MetaReweighter(model, opt, meta, net=net, engine=engine, interval=interval, seed=0, num_classes=3)
    data = [(torch.randn(64, 32, generator=g), torch.randint(0, 3, (64,), generator=g)) for _ in range(5)]
    return model, opt, rw, data


def _train_step(model, opt, rw, x, y) -> None:
    logits = model(x)
    weights = rw.step(x, y, logits)
    opt.zero_grad()
    (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
    opt.step()


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("engine", ["forward", "reverse"])
@pytest.mark.parametrize("net", ["lossnet", "metainfonet", "l2rw"])
def test_no_graph_or_batch_kept_alive_after_a_step(net, engine):
    model, opt, rw, data = _setup(net, engine)
    _train_step(model, opt, rw, *data[0])
    x, y = data[1][0].clone(), data[1][1].clone()
    logits = model(x)
    weights = rw.step(x, y, logits)
    assert weights.grad_fn is None and not weights.requires_grad
    assert rw.last_meta_loss.grad_fn is None and not rw.last_meta_loss.requires_grad
    if rw.net is not None:
        assert all(p.grad is not None and p.grad.grad_fn is None for p in rw.net.parameters())
    refs = [weakref.ref(t) for t in (x, y, logits, weights)]
    (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
    del x, y, logits, weights
    gc.collect()
    assert all(r() is None for r in refs), "the reweighter keeps a reference to the batch, its outputs or weights"


@pytest.mark.filterwarnings("ignore::reweight.monitor.WeightCollapseWarning")  # L2RW on random labels
@pytest.mark.parametrize("net, interval", [("lossnet", 1), ("metainfonet", 3), ("l2rw", 1)])
def test_live_tensor_count_is_constant_over_steps(net, interval):
    model, opt, rw, data = _setup(net, interval=interval)
    for i in range(10):
        _train_step(model, opt, rw, *data[i % len(data)])
    before = _live_tensors()
    for i in range(60):
        _train_step(model, opt, rw, *data[i % len(data)])
    assert _live_tensors() == before


@pytest.mark.filterwarnings("ignore::reweight.monitor.WeightCollapseWarning")  # random labels: uniform weights
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set size from /proc")
def test_resident_memory_is_flat_over_a_long_run():
    """1,500 steps of a 64-sample batch: an autograd graph kept per step would add about 50 MiB."""
    model, opt, rw, data = _setup("lossnet")
    for i in range(200):
        _train_step(model, opt, rw, *data[i % len(data)])
    gc.collect()
    start = _rss_mib()
    for i in range(1500):
        _train_step(model, opt, rw, *data[i % len(data)])
    gc.collect()
    assert _rss_mib() - start < 16, f"RSS grew from {start:.1f} MiB to {_rss_mib():.1f} MiB"
