"""torch.compile: a compiled model's forward and backward are left as compiled (never backpropagated twice,
no capture traced into them, no recompilation), and the weights equal those of the eager model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from reweight import MetaReweighter, _compat
from reweight.engines import runner as runner_module

BACKEND = "aot_eager"  # AOTAutograd's compiled backward (donated buffers) without inductor's compile time


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def train(model, forward, reweighter_model, steps=3, **kw):
    """The user's compiled backward runs first (it donates its buffers), then reweighted steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches(1, seed=9)[0]
    F.cross_entropy(forward(x), y).backward()
    opt.zero_grad()
    reweighter = MetaReweighter(reweighter_model, opt, batches(1, seed=5), seed=0, **kw)
    weights = []
    for x, y in batches(steps):
        logits = forward(x)
        w = reweighter.step(x, y, logits)
        loss = (w * F.cross_entropy(logits, y, reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights.append(w)
    return reweighter, torch.stack(weights)


def eager_weights(**kw):
    model = mlp()
    return train(model, model, model, **kw)[1]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("engine", ["auto", "forward", "finite_difference"])
@pytest.mark.parametrize("given", ["wrapper", "bare"])
def test_compiled_forward_steps_like_the_eager_one_without_graph_breaks_or_recompiles(engine, given):
    eager = eager_weights(engine=engine)
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    reweighter, weights = train(model, compiled, compiled if given == "wrapper" else model, engine=engine)
    torch.testing.assert_close(weights, eager, rtol=1e-4, atol=1e-5)
    assert reweighter._engine.compiled and reweighter._engine.capture is None
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # the capture traced to nothing; no recompilation


def test_module_compiled_in_place_runs_the_lookahead_eagerly():
    eager = eager_weights(engine="ghost")
    model = mlp()
    model.compile(backend=BACKEND)
    reweighter, weights = train(model, model, model, engine="ghost")
    torch.testing.assert_close(weights, eager, rtol=1e-4, atol=1e-5)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert model._compiled_call_impl is not None  # restored after each step


def test_a_compiled_part_deeper_than_the_walk_is_caught_when_backpropagated(monkeypatch):
    monkeypatch.setattr(runner_module, "from_compiled_graph", lambda t: False)
    eager = eager_weights(engine="forward")
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    reweighter, weights = train(model, compiled, model, engine="forward")
    torch.testing.assert_close(weights, eager, rtol=1e-4, atol=1e-5)
    assert reweighter._engine.compiled


@pytest.mark.parametrize("first", ["forward", "reweighter"])
def test_head_lookahead_on_a_compiled_model_whose_forward_the_hook_may_miss(first):
    eager = eager_weights(lookahead="head")
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    if first == "reweighter":  # the hook is registered before the first compilation and traced into it
        MetaReweighter(compiled, torch.optim.SGD(model.parameters(), lr=0.1), batches(1), lookahead="head")
    _, weights = train(model, compiled, compiled, lookahead="head")
    torch.testing.assert_close(weights, eager, rtol=1e-4, atol=1e-5)


def test_compat_compile_helpers():
    model = mlp()
    assert not _compat.is_compiled(model) and _compat.compiled_in_place(model) == []
    assert _compat.is_compiled(torch.compile(copy.deepcopy(model), backend=BACKEND))
    model[0].compile(backend=BACKEND)
    assert _compat.compiled_in_place(model) == [model[0]]
    with _compat.eager_calls([model[0]]):
        assert model[0]._compiled_call_impl is None
    assert model[0]._compiled_call_impl is not None
    y = torch.compile(nn.Linear(3, 3), backend=BACKEND)(torch.randn(2, 3, requires_grad=True))
    assert _compat.from_compiled_graph(nn.Linear(3, 3)(y).sum())
    assert not _compat.from_compiled_graph(nn.Linear(3, 3)(torch.randn(2, 3)))
    assert not _compat.from_compiled_graph(nn.Linear(3, 3)(y).sum(), limit=2)  # beyond the walk
    assert not _compat.from_compiled_graph(torch.zeros(1))
    assert _compat.is_donated_buffer_error(RuntimeError("... non-empty donated buffers ..."))
