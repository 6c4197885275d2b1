"""Who takes a vetoed sample's share of the loss under ``normalization="class"`` (``veto_refill``): its class's
kept samples (``math.inf``, the default), the whole batch (``1``), or the class up to a cap and the batch the rest,
against a written-out reference; the refusals where it cannot act (no veto, ``"sum"``, ``"none"``, L2RW, targets
other than class labels)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter
from reweight.options import VETO_REFILL

K, D, N = 4, 6, 48


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (N,), generator=g)
    x = torch.eye(K, D)[y] + 0.7 * torch.randn(N, D, generator=g)
    noisy = torch.where(torch.rand(N, generator=g) < 0.4, torch.randint(0, K, (N,), generator=g), y)
    my = torch.arange(K).repeat(8)
    mx = torch.eye(K, D)[my] + 0.7 * torch.randn(len(my), D, generator=g)
    return x, noisy, [(mx, my)]


def _weights(steps: int, **options) -> list[torch.Tensor]:
    """The weights of ``steps`` steps of plain SGD on one fixed batch, the veto acting from the first update."""
    x, y, meta = _data()
    torch.manual_seed(0)
    model = nn.Linear(D, K)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    options = {"veto_evidence": 0, "veto_warmup": 0, "seed": 0, **options}
    rw = MetaReweighter(model, opt, meta, **options)
    out = []
    for _ in range(steps):
        logits = model(x)
        w = rw.step(x, y, logits)
        out.append(w.detach().clone())
        opt.zero_grad()
        (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    return out


def test_default_is_inf() -> None:
    model = nn.Linear(D, K)
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), _data()[2])
    assert VETO_REFILL == math.inf and rw.options.veto_refill == math.inf


def _refilled(before: torch.Tensor, kept: torch.Tensor, y: torch.Tensor, cap: float) -> torch.Tensor:
    """The reference, written out per class: the kept weights of class c times min(before_c / kept_c, cap), then
    all over their sum times the batch size."""
    out = torch.where(kept, before, torch.zeros_like(before))
    for c in range(K):
        members = y == c
        if kept[members].any():
            out[members] *= min(float(before[members].sum() / out[members].sum()), cap)
    return out * N / out.sum()


@pytest.mark.parametrize("net", ["gated", "logitnet"])
def test_refill_against_a_written_out_reference(net: str) -> None:
    """At the first update the net's weights before the veto are the run's without one, and the veto's mask is the
    same whatever the refill. ``inf``: each class keeps its count as its total; ``1``: the kept weights over their
    sum times the batch size; ``1.45``: a class takes its share up to 1.45 times its kept weights (no floor, so the
    formulas are exact)."""
    common = {"net": net, "normalization": "class", "min_ess": 0.0, "min_ess_until_evidence": 0.0}
    before = _weights(1, veto=math.inf, **common)[0]
    by_class = _weights(1, **common)[0]
    kept = by_class > 0
    assert 0 < int((~kept).sum()) < N // 2, "the veto should remove some samples and keep most"
    y = _data()[1]
    for c in range(K):  # inf: every class keeps its count (each kept a sample here)
        members = y == c
        assert kept[members].any()
        torch.testing.assert_close(by_class[members].sum(), members.sum().to(by_class.dtype), rtol=1e-5, atol=1e-5)
    runs = {cap: _weights(1, veto_refill=cap, **common)[0] for cap in (1.0, 1.45)}
    for cap, weights in runs.items():
        assert torch.equal(kept, weights > 0)
        torch.testing.assert_close(weights, _refilled(before, kept, y, cap), rtol=1e-5, atol=1e-6)
    fills = [float(before[y == c].sum() / before[(y == c) & kept].sum()) for c in range(K)]
    assert min(fills) < 1.45 < max(fills), "the cap should bind for some classes only"
    assert not torch.allclose(by_class, runs[1.45]) and not torch.allclose(runs[1.0], runs[1.45])


def test_refused_where_it_cannot_act_at_the_first_batch() -> None:
    """Under a loss of the user's the first batch settles the normalisation: on targets other than class labels
    it is ``"sum"``, where the batch takes every share anyway, and ``veto_refill`` is refused before any change."""
    model = nn.Linear(D, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = [(torch.randn(8, D), torch.randn(8))]
    mse = lambda out, y: (out.squeeze(-1) - y) ** 2  # noqa: E731
    rw = MetaReweighter(model, opt, meta, loss_fn=mse, veto_refill=2)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(6, D)
    with pytest.raises(ValueError, match="veto_refill applies under normalization='class'; these targets are not"):
        rw.step(x, torch.randn(6), model(x))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"veto_refill": 0.5}, ValueError, "veto_refill must be >= 1"),
        ({"veto_refill": math.nan}, ValueError, "veto_refill must be >= 1"),
        ({"veto_refill": "batch"}, TypeError, "veto_refill must be a number or None"),
        ({"veto_refill": True}, TypeError, "veto_refill must be a number or None"),
        ({"net": "l2rw", "veto_refill": 1}, ValueError, "veto_refill applies where the veto acts"),
        ({"net": "lossnet", "veto_refill": 2}, ValueError, r"veto_refill applies .* normalization='sum'"),
        ({"veto": math.inf, "veto_refill": 2}, ValueError, r"veto_refill applies .* veto=inf"),
        ({"normalization": "none", "veto_refill": 2}, ValueError, "veto_refill applies where the veto acts"),
    ],
)
def test_refused(kwargs: dict, error: type, match: str) -> None:
    model = nn.Linear(D, K)
    with pytest.raises(error, match=match):
        MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), _data()[2], **kwargs)
