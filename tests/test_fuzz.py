"""Hostile input, fuzzed: every step either works correctly or raises a documented error, untouched.

Documented errors of :meth:`MetaReweighter.step`: ``ValueError`` / ``TypeError`` on bad batches,
:class:`NonFiniteLossError` on NaN / inf with ``on_nonfinite="raise"``, and whatever the meta loader
raises, unchanged. A failed step leaves the model (parameters, buffers, grads, optimizer state), the
weighting net, its optimizer and the step count as they were; a successful one leaves the model as it was.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from reweight import MetaReweighter, NonFiniteLossError
from reweight.meta_stream import MetaBatchStream

from conftest import assert_same, snapshot

DOCUMENTED = (ValueError, TypeError, NonFiniteLossError)
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


class LoaderError(RuntimeError):
    """Raised by a hostile meta loader."""


def net_snapshot(rw: MetaReweighter) -> dict[str, Any]:
    if rw.net is None:
        return {}
    opt = rw.meta_optimizer.state_dict()["state"]
    return {
        "params": {k: v.detach().clone() for k, v in rw.net.state_dict().items()},
        "opt": {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()} for k, s in opt.items()},
    }


def assert_net_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    if not a:
        return  # the net was not built before the step
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(v, b["params"][k]) for k, v in a["params"].items())
    assert a["opt"].keys() == b["opt"].keys()
    for k, s in a["opt"].items():
        for n, t in s.items():
            assert torch.equal(t, b["opt"][k][n]) if torch.is_tensor(t) else t == b["opt"][k][n]


def poison(t: torch.Tensor, kind: str, index: int) -> torch.Tensor:
    t = t.clone()
    if kind != "none" and t.numel():
        t.view(-1)[index % t.numel()] = float("nan") if kind == "nan" else float("inf") * (-1) ** index
    return t


def checked_step(rw, model, opt, x, y, logits) -> torch.Tensor | None:
    """``rw.step``; asserts the model is untouched either way, and the net and step count on failure."""
    before, net_before, steps = snapshot(model, opt), net_snapshot(rw), rw.step_count
    try:
        weights = rw.step(x, y, logits)
    except DOCUMENTED + (LoaderError,):
        assert_same(before, snapshot(model, opt))
        assert_net_same(net_before, net_snapshot(rw))
        assert rw.step_count == steps
        return None
    assert_same(before, snapshot(model, opt))
    assert rw.step_count == steps + 1
    return weights


def check_weights(weights: torch.Tensor, n: int, normalization: str, finite_samples: torch.Tensor) -> None:
    assert weights.shape == (n,) and not weights.requires_grad
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert (weights[~finite_samples] == 0).all()
    if normalization == "sum" and weights.sum() != 0:
        torch.testing.assert_close(
            weights.double().sum(), torch.tensor(float(n), dtype=torch.float64), rtol=2e-2, atol=0
        )


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "n": draw(st.sampled_from([1, 2, 3, 5, 8, 0])),  # empty and single-sample batches included
        "m": draw(st.sampled_from([1, 2, 4, 0])),
        "features": draw(st.integers(1, 4)),
        "classes": draw(st.integers(2, 4)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "target_dtype": draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32])),
        "net": draw(st.sampled_from(["lossnet", "logitnet", "metainfonet", "l2rw"])),
        "engine": draw(st.sampled_from(["forward", "reverse"])),
        "normalization": draw(st.sampled_from(["sum", "none"])),
        "on_nonfinite": draw(st.sampled_from(["raise", "skip"])),
        "poison_input": draw(st.sampled_from(["none", "nan", "inf"])),
        "poison_logits": draw(st.sampled_from(["none", "nan", "inf"])),
        "poison_meta": draw(st.sampled_from(["none", "nan", "inf"])),
        "index": draw(st.integers(0, 50)),
        "seed": draw(st.integers(0, 2**16)),
    }


@FUZZ
@given(scenarios())
def test_fuzzed_step_works_or_raises_a_documented_error_untouched(s):
    torch.manual_seed(s["seed"])
    d, k, dtype = s["features"], s["classes"], s["dtype"]
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, k)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(s["seed"])
    xm = poison(torch.randn(s["m"], d, generator=g).to(dtype), s["poison_meta"], s["index"])
    meta = [(xm, torch.randint(0, k, (s["m"],), generator=g))]
    rw = MetaReweighter(
        model, opt, meta, net=s["net"], engine=s["engine"], normalization=s["normalization"],
        on_nonfinite=s["on_nonfinite"], seed=s["seed"],
    )  # fmt: skip
    for step in range(2):  # the second step runs with the net's (and the optimizer's) state from the first
        x = poison(torch.randn(s["n"], d, generator=g).to(dtype), s["poison_input"] if step else "none", s["index"])
        y = torch.randint(0, k, (s["n"],), generator=g).to(s["target_dtype"])
        logits = poison(model(x), s["poison_logits"] if step else "none", s["index"] + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the engine's fallback warning
            weights = checked_step(rw, model, opt, x, y, logits)
        if weights is None:
            continue
        finite = torch.isfinite(F.cross_entropy(logits.detach().float(), y.long(), reduction="none"))
        check_weights(weights, s["n"], s["normalization"], finite)
        opt.zero_grad()
        (weights * F.cross_entropy(logits, y.long(), reduction="none")).mean().backward()
        opt.step()


def own_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user's per-sample loss: what the library's defaults must settle from the first batch, not from its name."""
    return F.cross_entropy(logits.float(), targets.long(), reduction="none")


@FUZZ
@given(scenarios(), st.sampled_from(["auto", "gated", "metainfonet", "lossnet", "l2rw"]))
def test_fuzzed_defaults_under_an_own_loss_settle_once_from_a_batch_that_passed_its_checks(s, net):
    """``net="auto"`` and ``normalization=None`` under a loss of the user's: a step either works, after which both
    are settled (and stay so), or raises a documented error leaving the model untouched; the weights obey the
    normalisation settled."""
    torch.manual_seed(s["seed"])
    d, k, dtype = s["features"], s["classes"], s["dtype"]
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, k)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(s["seed"])
    xm = poison(torch.randn(s["m"], d, generator=g).to(dtype), s["poison_meta"], s["index"])
    meta = [(xm, torch.randint(0, k, (s["m"],), generator=g))]
    rw = MetaReweighter(model, opt, meta, net=net, loss_fn=own_cross_entropy, on_nonfinite=s["on_nonfinite"],
                        seed=s["seed"])  # fmt: skip
    settled = None
    for step in range(2):
        x = poison(torch.randn(s["n"], d, generator=g).to(dtype), s["poison_input"] if step else "none", s["index"])
        y = torch.randint(0, k, (s["n"],), generator=g).to(s["target_dtype"])
        logits = poison(model(x), s["poison_logits"] if step else "none", s["index"] + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weights = checked_step(rw, model, opt, x, y, logits)
        now = (rw.options.net, rw.normalization)
        if settled is not None:
            assert now == settled  # settled once
        if weights is None:
            continue
        settled = now
        assert "auto" not in now
        labels = not y.is_floating_point() and k >= 2
        if net == "auto":
            assert now[0] == ("gated" if labels else "lossnet")
        if net != "lossnet":
            assert now[1] == ("class" if labels else "sum")
        finite = torch.isfinite(own_cross_entropy(logits.detach(), y))
        check_weights(weights, s["n"], rw.normalization, finite)


class ZeroNet(nn.Module):
    """A user net whose raw weights are all zero (or zero for every sample but those with a large loss)."""

    def __init__(self, threshold: float = float("inf")) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.threshold = threshold

    def forward(self, loss, logits, targets):
        return self.scale * (loss > self.threshold).to(self.scale.dtype)


@FUZZ
@given(
    n=st.integers(1, 6),
    threshold=st.sampled_from([float("inf"), 1.0, 0.0]),
    engine=st.sampled_from(["forward", "reverse"]),
    seed=st.integers(0, 2**16),
)
def test_all_zero_weights_give_zeros_without_nan(n, threshold, engine, seed):
    torch.manual_seed(seed)
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    meta = [(torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g))]
    rw = MetaReweighter(model, opt, meta, net=ZeroNet(threshold), engine=engine, seed=seed)
    for _ in range(2):
        x, y = torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)
        logits = model(x)
        weights = checked_step(rw, model, opt, x, y, logits)
        assert weights is not None and torch.isfinite(weights).all()
        losses = F.cross_entropy(logits, y, reduction="none").detach()
        if not (losses > threshold).any():
            assert (weights == 0).all()  # the delta guard: no 0 / 0
        else:
            check_weights(weights, n, "sum", torch.ones(n, dtype=torch.bool))
        assert torch.isfinite(rw.last_meta_loss) and torch.isfinite(rw.net.scale) and torch.isfinite(rw.net.scale.grad)


class FlakyLoader:
    """Yields ``good`` batches per pass, then raises :class:`LoaderError` (on the first ``failures`` passes)."""

    def __init__(self, batches: list, good: int, failures: int) -> None:
        self.batches, self.good, self.failures = batches, good, failures

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.good and self.failures > 0:
                self.failures -= 1
                raise LoaderError(f"meta loader failed after {i} batches")
            yield batch


@FUZZ
@given(
    good=st.integers(0, 3),
    failures=st.integers(1, 2),
    net=st.sampled_from(["lossnet", "metainfonet", "l2rw"]),
    interval=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_meta_loader_raising_mid_iteration(good, failures, net, interval, seed):
    """The loader's error propagates unchanged from a step that leaves everything untouched; once the
    loader recovers, training goes on."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
    loader = FlakyLoader(batches, good, failures)
    interval = 1 if net == "l2rw" else interval  # L2RW's weights are each batch's meta-gradient
    rw = MetaReweighter(model, opt, loader, net=net, interval=interval, seed=seed, num_classes=3)
    raised = 0
    for _ in range(12):
        x, y = torch.randn(5, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
        logits = model(x)
        steps = rw.step_count
        weights = checked_step(rw, model, opt, x, y, logits)
        if weights is None:
            raised += 1
            assert rw.step_count == steps
        else:
            check_weights(weights, 5, rw.normalization, torch.ones(5, dtype=torch.bool))
    assert raised == failures
    assert loader.failures == 0


def test_meta_stream_retries_the_batch_that_failed():
    stream = MetaBatchStream(FlakyLoader(list(range(4)), good=2, failures=2), draw_seed=lambda: 0)
    got, errors = [], 0
    while len(got) < 6:
        try:
            got.append(stream.next())
        except LoaderError:
            errors += 1
    assert errors == 2 and got == [0, 1, 2, 3, 0, 1]
