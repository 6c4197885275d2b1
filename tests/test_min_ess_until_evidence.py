"""``min_ess_until_evidence``: the floor on the weights' effective sample size while the veto waits for evidence of
label noise (0.8 of the batch by default, where the veto waits), giving way to ``min_ess`` as the evidence builds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter
from reweight.monitor import effective_sample_size
from reweight.options import MIN_ESS, MIN_ESS_UNTIL_EVIDENCE

CLASSES = 3


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    g = torch.Generator().manual_seed(seed)
    meta = [(torch.randn(12, 4, generator=g), torch.randint(0, CLASSES, (12,), generator=g)) for _ in range(3)]
    return model, torch.optim.SGD(model.parameters(), lr=0.1), meta


def _batch(t: int, n: int = 24):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(n, 4, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


class Spread(nn.Module):
    """A user's net whose weights ``exp(a * loss)`` are far from uniform within each class."""

    requires_logits = True  # "class" normalisation and the veto's wait for evidence, as for the named logit nets

    def __init__(self, a: float = 8.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, loss, logits=None, targets=None):
        return torch.exp(self.a * loss.to(self.a.dtype))


def _run(steps: int, **kwargs) -> tuple[MetaReweighter, list[torch.Tensor]]:
    kwargs.setdefault("min_ess_until_evidence", 0.8)
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, net=Spread(), num_classes=CLASSES, seed=0, **kwargs)
    out = []
    for t in range(steps):
        x, y = _batch(t)
        logits = model(x)
        w = rw.step(x, y, logits)
        out.append(w.detach())
        opt.zero_grad()
        (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    return rw, out


def test_by_default_it_holds_where_the_veto_waits_and_nothing_else_changes():
    """``None`` is :data:`MIN_ESS_UNTIL_EVIDENCE` where the veto waits for evidence (the weights those of the value
    given), and ``0`` gives the weights of ``min_ess`` alone, which the default's floor has work to hold."""
    model, opt, meta = _parts()
    assert MetaReweighter(model, opt, meta).options.min_ess_until_evidence == MIN_ESS_UNTIL_EVIDENCE > MIN_ESS
    _, default = _run(4, min_ess_until_evidence=None)
    _, explicit = _run(4, min_ess_until_evidence=MIN_ESS_UNTIL_EVIDENCE)
    for a, b in zip(default, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, off = _run(4, min_ess_until_evidence=0)
    assert min(float(effective_sample_size(w)) for w in off) < 0.5
    assert min(float(effective_sample_size(w)) for w in default) >= 0.5


@pytest.mark.parametrize(
    "kwargs", [{"veto": math.inf}, {"veto_evidence": 0}, {"net": "l2rw"}, {"net": "lossnet"},
               {"net": "lossnet", "normalization": "class"}],
)  # fmt: skip
def test_by_default_it_is_off_where_nothing_waits_or_weights_are_not_within_classes(kwargs):
    """Where nothing waits for evidence the default is 0 (no refusal: the user asked for nothing); LossNet under
    "sum" waits from the first batch but keeps ``min_ess`` throughout (the floor cost it on clean long tails);
    under "class" it gets the default."""
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, **kwargs)
    at_construction = rw.options.min_ess_until_evidence  # the library's loss: nothing left to the first batch
    x, y = _batch(0)
    rw.step(x, y, model(x))
    assert at_construction == rw.options.min_ess_until_evidence
    waits = rw.noise_evidence is not None
    within = kwargs.get("normalization") == "class"
    assert rw.options.min_ess_until_evidence == (MIN_ESS_UNTIL_EVIDENCE if waits and within else 0.0)
    assert waits == (kwargs.get("net") == "lossnet")


def _fading(level: float, high: float = 0.8, low: float = 0.2, threshold: float = 0.05) -> float:
    """The floor at an evidence ``level``: ``high`` at 0 or below, ``low`` at the threshold, linear between."""
    return high - (high - low) * min(1.0, max(0.0, level / threshold))


def test_while_no_evidence_is_shown_every_batch_keeps_the_floor_its_level_allows():
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, net=Spread(), num_classes=CLASSES, seed=0, min_ess_until_evidence=0.8)
    levels = []
    for t in range(6):
        x, y = _batch(t)
        logits = model(x)
        w = rw.step(x, y, logits)
        levels.append(float(rw.noise_evidence.level))  # observed at this step's meta update, before the weights
        assert float(effective_sample_size(w.detach())) >= _fading(levels[-1]) * (1 - 1e-5)
        opt.zero_grad()
        (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    assert not bool(rw.noise_evidence.shown) and min(levels) <= 0 < max(levels)  # both ends of the fade were met
    free = _run(1, min_ess_until_evidence=0)[1][0]
    assert float(effective_sample_size(free)) < 0.5  # the floor has work to do


@pytest.mark.parametrize(
    "level,shown,floor",
    [(None, None, 0.8), (-0.01, False, 0.8), (0.0, False, 0.8), (0.025, False, 0.5), (0.2, False, 0.2),
     (0.2, True, None)],
)  # fmt: skip
def test_the_floor_follows_the_evidence(level, shown, floor):
    """Before the first meta update and at a level of 0 or below: 0.8; then falling linearly to ``min_ess`` (0.2)
    as the level reaches the threshold (0.05); once shown: the weights of a reweighter without the option."""
    rw, _ = _run(1)
    rw_without, _ = _run(1, min_ess_until_evidence=0)
    free = torch.exp(12 * torch.linspace(0, 1, 24, dtype=torch.float64))
    free = free * (free.numel() / free.sum())
    assert float(effective_sample_size(free)) < 0.2  # every floor has work to do
    rw._slot.evidence.level = None if level is None else torch.tensor(level, dtype=torch.float64)
    rw._slot.evidence.shown = None if shown is None else torch.tensor(shown)
    floored = rw._slot.floor_ess(free)
    if floor is None:
        torch.testing.assert_close(floored, rw_without._slot.floor_ess(free), rtol=0, atol=0)
        floor = 0.2
    assert float(effective_sample_size(floored)) == pytest.approx(floor, rel=1e-6)
    torch.testing.assert_close(floored.sum(), free.sum())


@pytest.mark.parametrize("value,error", [(-0.1, ValueError), (1.0, ValueError), ("0.8", TypeError), (True, TypeError)])
def test_a_value_outside_zero_to_one_is_refused(value, error):
    model, opt, meta = _parts()
    with pytest.raises(error, match="min_ess_until_evidence"):
        MetaReweighter(model, opt, meta, min_ess_until_evidence=value)


@pytest.mark.parametrize("kwargs", [{"veto": math.inf}, {"veto_evidence": 0}, {"net": "l2rw"}])
def test_it_is_refused_where_nothing_waits_for_evidence(kwargs):
    model, opt, meta = _parts()
    with pytest.raises(ValueError, match="min_ess_until_evidence applies while the veto waits"):
        MetaReweighter(model, opt, meta, min_ess_until_evidence=0.5, **kwargs)
    MetaReweighter(model, opt, meta, min_ess_until_evidence=0, **kwargs)  # 0: nothing asked of it


def test_under_a_loss_of_the_users_on_other_targets_the_first_batch_refuses_it():
    """Under a loss of the user's the first batch settles whether the veto waits (class labels only): on regression
    targets nothing waits, so the option given is refused there, before anything changes."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    meta = [(torch.randn(6, 4), torch.randn(6))]

    def mse(pred, target):
        return (pred.squeeze(-1) - target) ** 2

    rw = MetaReweighter(model, opt, meta, loss_fn=mse, min_ess_until_evidence=0.8, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="these targets are not class labels"):
        rw.step(x, torch.randn(8), model(x))
    assert rw.step_count == 0 and rw.net is None
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # not given, it is the default, which settles to 0 there without a word
    rw = MetaReweighter(model, opt, meta, loss_fn=mse, seed=0)
    rw.step(x, torch.randn(8), model(x))
    assert rw.noise_evidence is None and rw.options.min_ess_until_evidence == 0.0
    # with veto_evidence given the veto waits (the evidence read on the whole meta batch) and the option applies
    rw = MetaReweighter(model, opt, meta, loss_fn=mse, min_ess_until_evidence=0.8, veto_evidence=0.05, seed=0)
    rw.step(x, torch.randn(8), model(x))
    assert rw.noise_evidence is not None and rw.options.min_ess_until_evidence == 0.8

