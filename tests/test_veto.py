"""``veto``: after each meta update, a sample whose meta-gradient coefficient ``c_i = dL_meta/dw_i`` (with
``veto_center``, less its class's or batch's weighted mean) is above ``veto`` times the batch's mean ``|c|`` gets
weight 0 for that step, checked against coefficients computed independently with ``torch.func``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from reweight import MetaReweighter
from reweight.options import VETO, VETO_CENTER, VETO_WARMUP

CLASSES, LR = 3, 0.5


@pytest.fixture(autouse=True)
def _veto_from_the_first_update(monkeypatch):
    """These tests read the veto's mechanics: it acts from the first update, not waiting for evidence of label
    noise (``veto_evidence``, tests/test_noise_evidence.py)."""
    monkeypatch.setattr("reweight.options.VETO_EVIDENCE", 0.0)
    monkeypatch.setattr("reweight.settling.VETO_EVIDENCE", 0.0)  # what the first batch settles under "sum"


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, CLASSES)
    g = torch.Generator().manual_seed(seed)
    meta = [(torch.randn(12, 4, generator=g), torch.randint(0, CLASSES, (12,), generator=g))]
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, CLASSES, (32,), generator=g)
    return model, torch.optim.SGD(model.parameters(), lr=LR), meta, x, y


def _frozen_net(params):
    return torch.optim.SGD(params, lr=0.0)  # the net keeps its uniform start: the weights before the veto are 1


def _coefficients(model: nn.Module, x, y, meta) -> torch.Tensor:
    """``dL_meta(theta - lr * grad mean(w_i L_i)) / dw`` at ``w = 1``, by ``torch.func``."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    xm, ym = meta[0]

    def meta_loss(w):
        def train_loss(p):
            return (w * F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")).mean()

        g = grad(train_loss)(params)
        ahead = {k: params[k] - LR * g[k] for k in params}
        return F.cross_entropy(functional_call(model, ahead, (xm,)), ym)

    return grad(meta_loss)(torch.ones(len(y)))


def _expected(keep: torch.Tensor, y: torch.Tensor, normalization: str) -> torch.Tensor:
    keep = keep.double()
    if normalization == "sum":
        return keep * len(keep) / keep.sum()
    out = torch.zeros_like(keep)
    for c in y.unique():
        m = y == c
        out[m] = keep[m] * m.sum() / keep[m].sum() if keep[m].sum() > 0 else 0.0
    return out


@pytest.mark.parametrize("engine", ["ghost", "reverse"])
@pytest.mark.parametrize(("net", "normalization"), [("gated", "class"), ("lossnet", "sum")])
@pytest.mark.parametrize("veto", [0.0, 0.5, 1.0])
def test_veto_zeroes_the_samples_whose_coefficient_is_above_it(engine, net, normalization, veto):
    model, opt, meta, x, y = _parts()
    c = _coefficients(model, x, y, meta)
    keep = c <= veto * c.abs().mean()
    assert 0 < int(keep.sum()) < len(y)  # the case is not trivial
    rw = MetaReweighter(
        model, opt, meta, net=net, engine=engine, normalization=normalization, veto=veto, veto_warmup=0, min_ess=0,
        veto_center=False, meta_optimizer=_frozen_net, seed=0,
    )  # fmt: skip
    w = rw.step(x, y, model(x))
    torch.testing.assert_close(w.double(), _expected(keep, y, normalization), atol=1e-6, rtol=1e-6)


def _centred(c: torch.Tensor, y: torch.Tensor, normalization: str) -> torch.Tensor:
    """``c`` less its class's mean (``"class"``) or the batch's (``"sum"``): the weighted means at uniform weights."""
    if normalization == "sum":
        return c - c.mean()
    out = c.clone()
    for k in y.unique():
        out[y == k] = c[y == k] - c[y == k].mean()
    return out


def _group_of(rw: MetaReweighter, targets: torch.Tensor, width: int) -> str | None:
    logits = torch.zeros(len(targets), width)
    return rw._slot.veto_group((torch.zeros(len(targets)), logits, targets))


def test_the_veto_group():
    """By default the veto reads the coefficients within each class under ``"class"`` and as they are under
    ``"sum"``; ``True`` reads them within each class on class labels and within the batch on other targets under
    ``"sum"``; ``False`` and no veto: as they are."""
    model, opt, meta, *_ = _parts()
    labels, values = torch.tensor([0, 1, 2, 1]), torch.randn(4)

    def group(targets, width, **kwargs):
        return _group_of(MetaReweighter(model, opt, meta, **kwargs), targets, width)

    assert group(labels, CLASSES) == "class"  # the gated net, normalised within each class
    assert group(labels, CLASSES, net="lossnet") is None  # "sum" on class labels: as they are
    assert group(labels, CLASSES, net="lossnet", veto_center=True) == "class"
    assert group(values, 1, net="lossnet", loss_fn=_mse) is None  # regression: as they are
    assert group(values, 1, net="lossnet", loss_fn=_mse, veto_center=True) == "batch"
    assert group(labels, CLASSES, veto_center=False) is None
    assert group(labels, CLASSES, net="lossnet", veto=math.inf) is None
    assert group(labels, CLASSES, net="l2rw") is None  # no veto to centre


def _mse(outputs, targets):
    return (outputs.reshape(-1) - targets.float()) ** 2


@pytest.mark.parametrize(
    ("net", "normalization", "veto"), [("gated", "class", 0.0), ("gated", "class", 0.5), ("lossnet", "sum", 0.5)]
)
def test_the_centred_veto_reads_each_coefficient_against_its_groups_mean(net, normalization, veto):
    """On class labels the veto keeps the samples whose ``c_i`` less its class's mean is at most ``veto`` times the
    mean magnitude of those differences, under either normalisation; the set differs from the one the veto as it
    is keeps."""
    model, opt, meta, x, y = _parts()
    c = _coefficients(model, x, y, meta)
    u = _centred(c, y, "class")
    keep = u <= veto * u.abs().mean()
    assert not bool((keep == (c <= veto * c.abs().mean())).all())  # centring changes what is kept here
    rw = MetaReweighter(
        model, opt, meta, net=net, normalization=normalization, veto=veto, veto_center=True, veto_warmup=0,
        min_ess=0, meta_optimizer=_frozen_net, seed=0,
    )  # fmt: skip
    w = rw.step(x, y, model(x))
    torch.testing.assert_close(w.double(), _expected(keep, y, normalization), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("soft", [False, True])
def test_centring_uses_the_weighted_mean_of_each_class(soft):
    """:meth:`NetSlot.centered` against a hand computation: each class's ``sum_i m_ik w_i c_i / sum_i m_ik w_i``
    with class memberships ``m`` (one-hot, or soft targets), a sample's reference its memberships' mix of them."""
    model, opt, meta, x, y = _parts()
    rw = MetaReweighter(model, opt, meta, net="gated", normalization="class", veto=0.5, veto_center=True, seed=0)
    g = torch.Generator().manual_seed(1)
    c, w = torch.randn(len(y), generator=g, dtype=torch.float64), torch.rand(len(y), generator=g, dtype=torch.float64)
    targets = torch.softmax(torch.randn(len(y), CLASSES, generator=g), 1).double() if soft else y
    members = targets if soft else F.one_hot(y, CLASSES).double()
    means = [
        sum(members[i, k] * w[i] * c[i] for i in range(len(y))) / sum(members[i, k] * w[i] for i in range(len(y)))
        for k in range(CLASSES)
    ]
    reference = torch.stack([sum(members[i, k] * means[k] for k in range(CLASSES)) for i in range(len(y))])
    expected = (c - reference) / (c - reference).abs().sum()
    logits = torch.zeros(len(y), CLASSES, dtype=torch.float64)
    torch.testing.assert_close(rw._slot.centered(c, w, (None, logits, targets), "class"), expected)
    batch = (c - (w * c).sum() / w.sum()) / (c - (w * c).sum() / w.sum()).abs().sum()
    torch.testing.assert_close(rw._slot.centered(c, w, (None, logits, targets), "batch"), batch)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"veto_center": 1}, TypeError, "veto_center must be a bool"),
        ({"net": "l2rw", "veto_center": True}, ValueError, "veto_center does not apply to net='l2rw'"),
    ],
)
def test_bad_veto_center_is_refused(kwargs, error, match):
    model, opt, meta, *_ = _parts()
    with pytest.raises(error, match=match):
        MetaReweighter(model, opt, meta, **kwargs)


@pytest.mark.parametrize("warmup", [1, 4])
def test_the_veto_reads_the_coefficients_at_the_warmup_factor(warmup):
    """Step ``t`` keeps the samples whose ``c_i * min(1, (t + 1) / veto_warmup)`` is at most ``veto`` times the
    batch's mean ``|c|`` (the model is not stepped: the same coefficients at every step)."""
    model, opt, meta, x, y = _parts()
    c = _coefficients(model, x, y, meta)
    rw = MetaReweighter(
        model, opt, meta, veto=0.5, veto_warmup=warmup, veto_center=False, min_ess=0, meta_optimizer=_frozen_net, seed=0
    )
    kept = []
    for t in range(6):
        keep = c * min(1.0, (t + 1) / warmup) <= 0.5 * c.abs().mean()
        torch.testing.assert_close(rw.step(x, y, model(x)).double(), _expected(keep, y, "class"), atol=1e-6, rtol=0)
        kept.append(int(keep.sum()))
    assert kept[-1] < len(y) and (warmup == 1 or kept[0] > kept[-1])  # the ramp changed what was kept


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"veto_warmup": -1}, ValueError, "veto_warmup must be >= 0"),
        ({"veto_warmup": 1.5}, TypeError, "veto_warmup must be an int"),
        ({"veto_warmup": True}, TypeError, "veto_warmup must be an int"),
        ({"net": "l2rw", "veto_warmup": 10}, ValueError, "veto_warmup does not apply to net='l2rw'"),
    ],
)
def test_bad_veto_warmup_is_refused(kwargs, error, match):
    model, opt, meta, *_ = _parts()
    with pytest.raises(error, match=match):
        MetaReweighter(model, opt, meta, **kwargs)


def test_a_higher_veto_keeps_a_superset_and_inf_keeps_every_sample():
    kept = []
    for veto in (0.0, 0.5, 1.0, math.inf):
        model, opt, meta, x, y = _parts()
        rw = MetaReweighter(model, opt, meta, veto=veto, veto_warmup=0, min_ess=0, meta_optimizer=_frozen_net, seed=0)
        kept.append(rw.step(x, y, model(x)) > 0)
    for low, high in zip(kept, kept[1:]):
        assert bool((low <= high).all())
    assert bool(kept[-1].all()) and not bool(kept[0].all())


def test_the_veto_leaves_the_nets_learning_unchanged():
    """The veto acts on the returned weights only: the net's update is the same with and without it."""
    states = []
    for veto in (1.0, math.inf):
        model, opt, meta, x, y = _parts()
        rw = MetaReweighter(model, opt, meta, veto=veto, seed=0)
        rw.step(x, y, model(x))
        states.append(rw.state_dict()["net"])
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], atol=0, rtol=0)


def test_no_veto_between_meta_updates():
    model, opt, meta, x, y = _parts()
    rw = MetaReweighter(
        model, opt, meta, veto=0.0, veto_warmup=0, interval=2, min_ess=0, meta_optimizer=_frozen_net, seed=0
    )
    assert not bool((rw.step(x, y, model(x)) > 0).all())  # a meta update: vetoed
    torch.testing.assert_close(rw.step(x, y, model(x)), torch.ones(len(y)))  # none: the net's (uniform) weights


def test_default_veto():
    model, opt, meta, *_ = _parts()
    assert MetaReweighter(model, opt, meta).options.veto == VETO
    assert VETO_WARMUP is None  # the veto waits for the net: its warm-up is the net's own
    assert MetaReweighter(model, opt, meta).options.veto_warmup == MetaReweighter(model, opt, meta).options.meta_warmup
    assert MetaReweighter(model, opt, meta, meta_warmup=40).options.veto_warmup == 40
    assert MetaReweighter(model, opt, meta, meta_warmup=0).options.veto_warmup == 0
    assert MetaReweighter(model, opt, meta, veto_warmup=0).options.veto_warmup == 0  # the veto from the first step
    assert MetaReweighter(model, opt, meta, veto=math.inf).options.veto_warmup == 0  # no veto to hold off
    assert MetaReweighter(model, opt, meta, net="l2rw").options.veto_warmup == 0  # none to warm up
    assert MetaReweighter(model, opt, meta, net="l2rw", veto_warmup=0).options.veto_warmup == 0
    assert MetaReweighter(model, opt, meta, net="lossnet").options.veto == VETO
    assert MetaReweighter(model, opt, meta).options.veto_center is VETO_CENTER is None
    assert not MetaReweighter(model, opt, meta, net="l2rw").options.vetoes
    assert not MetaReweighter(model, opt, meta, net="groups", net_kwargs={"num_groups": 2}).options.vetoes


@pytest.mark.parametrize(
    ("veto", "error", "match"),
    [
        (-0.1, ValueError, "veto must be >= 0"),
        (float("nan"), ValueError, "veto must be >= 0"),
        (True, TypeError, "veto must be a number"),
        ("1", TypeError, "veto must be a number"),
    ],
)
def test_bad_veto_is_refused(veto, error, match):
    model, opt, meta, *_ = _parts()
    with pytest.raises(error, match=match):
        MetaReweighter(model, opt, meta, veto=veto)


@pytest.mark.parametrize("veto", [0.0, 1.0, math.inf])
def test_l2rw_refuses_a_veto(veto):
    model, opt, meta, *_ = _parts()
    with pytest.raises(ValueError, match="veto does not apply to net='l2rw'"):
        MetaReweighter(model, opt, meta, net="l2rw", veto=veto)


def test_a_batch_the_meta_batch_vetoes_whole_is_warned_about():
    """The collapse monitor watches the returned weights: every coefficient positive (each sample pulls against
    the meta batch) vetoes the whole batch, and the warning names the veto."""
    from reweight.engines.base import _ENGINES, MetaGradient, register_engine
    from reweight.monitor import CollapseMonitor, WeightCollapseWarning

    @register_engine("all_against", description="every coefficient positive (a toy)")
    def all_against(problem):
        return MetaGradient(torch.ones_like(problem.weights), problem.weights.new_zeros(()))

    try:
        model, opt, meta, x, y = _parts()
        rw = MetaReweighter(model, opt, meta, engine="all_against", veto_warmup=0, veto_center=False, seed=0)
        rw.collapse_monitor = CollapseMonitor(1e-3, every=1, patience=1)
        with pytest.warns(WeightCollapseWarning, match=r"all weights of the batch are below .*raise veto"):
            assert not bool(rw.step(x, y, model(x)).any())
        centred = MetaReweighter(model, opt, meta, engine="all_against", veto=0.0, seed=0)  # the default centring
        kept = centred.step(x, y, model(x)) > 0
        assert all(bool(kept[y == k].any()) for k in y.unique())  # a class's c_i less its mean: some are <= 0
        quiet = MetaReweighter(model, opt, meta, engine="all_against", veto=math.inf, seed=0)
        quiet.collapse_monitor = CollapseMonitor(1e-3, every=1, patience=1, constant_after=10)
        with warnings.catch_warnings():
            warnings.simplefilter("error", WeightCollapseWarning)
            assert bool((quiet.step(x, y, model(x)) > 0).all())  # without the veto: the net's (uniform) weights
    finally:
        _ENGINES.unregister("all_against")
