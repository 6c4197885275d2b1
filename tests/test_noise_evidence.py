"""``veto_evidence``: the veto waits until the meta set shows label noise. The moving share against an independent
computation, the latch, validation, the state (exact resume, older versions), every engine's per-sample meta
losses against ``torch.func``, and the veto held off on clean labels but acting under heavy noise."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from reweight import MetaReweighter
from reweight.losses import cross_entropy
from reweight.noise_evidence import DECAY, QUANTILE, NoiseEvidence, check_evidence_state, excess_above
from reweight.options import VETO_EVIDENCE

LR, K, D = 0.5, 3, 6


def _independent_excess(losses, meta, classes=None, meta_classes=None):
    """By numpy and exact fractions: over the training samples whose class has m >= 1 meta samples, the count above
    the class's k-th smallest meta loss, k = min(m, ceil(0.9 (m + 1))), less (m + 1 - k) / (m + 1) each; per sample."""
    losses, meta = losses.numpy(), meta.numpy()
    classes = np.zeros(len(losses), int) if classes is None else classes.numpy()
    meta_classes = np.zeros(len(meta), int) if meta_classes is None else meta_classes.numpy()
    excess, n = 0.0, 0
    for c in np.unique(classes):
        mine, theirs = losses[classes == c], np.sort(meta[meta_classes == c])
        m = len(theirs)
        if m:
            k = min(m, math.ceil(Fraction(9, 10) * (m + 1)))
            excess += np.sum(mine > theirs[k - 1]) - len(mine) * (m + 1 - k) / (m + 1)
            n += len(mine)
    return excess / max(n, 1)


def _independent_levels(batches):
    """The excess averaged with decay 0.95 from 0."""
    level, out = 0.0, []
    for batch in batches:
        level = 0.95 * level + 0.05 * _independent_excess(*batch)
        out.append(level)
    return out


def test_the_level_is_the_moving_share_and_once_shown_stays_shown():
    assert (QUANTILE, DECAY) == (0.9, 0.95)
    g = torch.Generator().manual_seed(0)
    noisy = [(3 * torch.rand(50, generator=g, dtype=torch.float64), torch.rand(100, generator=g, dtype=torch.float64))
             for _ in range(40)]  # fmt: skip
    clean = [(torch.rand(50, generator=g, dtype=torch.float64), torch.rand(100, generator=g, dtype=torch.float64))
             for _ in range(250)]  # fmt: skip
    want = _independent_levels(noisy + clean)
    evidence, shown = NoiseEvidence(0.05), []
    for t, (losses, meta) in enumerate(noisy + clean):
        evidence.observe(losses, meta)
        assert evidence.level.item() == pytest.approx(want[t], abs=1e-12)
        shown.append(bool(evidence.shown))
    first = next(t for t, v in enumerate(want) if v >= 0.05)
    assert 0 < first < 40 and shown == [t >= first for t in range(len(want))]
    assert want[-1] < 0.05  # the level fell back below the threshold on the clean batches: the latch holds


def test_by_class_each_loss_is_read_against_its_own_classs_meta_losses():
    """Classes of every meta size (none, one, two, nine, 25) and training samples of a class without meta samples
    (left out), against the numpy reference; ties at the cut are not above it."""
    g = torch.Generator().manual_seed(3)
    meta_classes = torch.cat([torch.full((m,), c) for c, m in enumerate([1, 2, 9, 25])])[
        torch.randperm(37, generator=g)
    ]
    meta = torch.rand(37, generator=g, dtype=torch.float64) + meta_classes
    classes = torch.randint(0, 5, (60,), generator=g)  # class 4 has no meta samples
    losses = 1.3 * torch.rand(60, generator=g, dtype=torch.float64) + classes
    losses[:3], classes[:3] = meta[meta_classes == 3].sort().values[23], 3  # ties with class 3's cut: k = 24 of 25
    excess = excess_above(losses, classes, meta, meta_classes)
    assert excess[1].item() == (classes < 4).sum().item()
    assert (excess[0] / excess[1]).item() == pytest.approx(_independent_excess(losses, meta, classes, meta_classes))
    evidence = NoiseEvidence(0.05)
    evidence.observe(losses, meta, classes, meta_classes)
    expected = (1 - DECAY) * _independent_excess(losses, meta, classes, meta_classes)
    assert evidence.level.item() == pytest.approx(expected)


def test_samples_drawn_like_the_meta_set_have_no_excess_however_few_meta_samples_a_class_has():
    """The exact chance correction: training and meta losses from one distribution, classes of 1 to 12 meta
    samples, give a mean excess of zero (5,000 draws; its standard error is about 0.002). Uncorrected, a 0.9-quantile
    of ten samples would put about 0.17 above it, not 0.1."""
    g = torch.Generator().manual_seed(4)
    shares = []
    for _ in range(5000):
        meta_classes = torch.randint(0, 10, (int(torch.randint(10, 60, (1,), generator=g)),), generator=g)
        classes = torch.randint(0, 10, (16,), generator=g)
        excess = excess_above(torch.rand(16, generator=g), classes, torch.rand(len(meta_classes), generator=g).double(),
                              meta_classes)  # fmt: skip
        shares.append((excess[0] / excess[1].clamp_min(1)).item())
    assert abs(np.mean(shares)) < 0.01


@pytest.mark.parametrize("threshold", [0.0, 0.9, 1.0, -0.1, float("nan")])
def test_a_threshold_outside_the_share_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold must be in"):
        NoiseEvidence(threshold)


def test_the_evidence_state_round_trips_and_bad_ones_are_refused():
    g = torch.Generator().manual_seed(1)
    evidence = NoiseEvidence(0.05)
    for _ in range(30):
        evidence.observe(3 * torch.rand(20, generator=g), torch.rand(40, generator=g))
    state = evidence.state_dict()
    assert state["shown"] is True and isinstance(state["level"], float)
    check_evidence_state(state)
    check_evidence_state(None)
    again = NoiseEvidence(0.05)
    again.load_state_dict(state)
    losses, meta = torch.rand(20, generator=g), torch.rand(40, generator=g)
    evidence.observe(losses, meta)
    again.observe(losses, meta)
    assert again.level.item() == evidence.level.item() and bool(again.shown)
    for bad in ({"level": 0.1}, {"level": float("nan"), "shown": True}, {"level": 0.1, "shown": 1}, [0.1, True],
                {"level": True, "shown": None}):  # fmt: skip
        with pytest.raises(ValueError, match="noise_evidence"):
            check_evidence_state(bad)


# ------------------------------------------------------------------------------------------------ options


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(D, K)
    g = torch.Generator().manual_seed(seed)
    meta = [(torch.randn(12, D, generator=g), torch.randint(0, K, (12,), generator=g))]
    return model, torch.optim.SGD(model.parameters(), lr=LR), meta


def test_the_default_and_where_it_applies():
    model, opt, meta = _parts()
    assert MetaReweighter(model, opt, meta).options.veto_evidence == VETO_EVIDENCE == 0.05  # the gated net, "class"
    assert MetaReweighter(model, opt, meta, net="logitnet").options.veto_evidence == VETO_EVIDENCE
    assert MetaReweighter(model, opt, meta, net="lossnet", normalization="class").options.veto_evidence == 0.05
    for kwargs in ({"net": "lossnet"}, {"normalization": "sum"}):  # "sum": class labels or not, the first batch says
        rw = MetaReweighter(model, opt, meta, **kwargs)
        assert rw.options.veto_evidence is None and rw.noise_evidence is not None
        x, y = meta[0]
        rw.step(x, y, model(x))
        assert rw.options.veto_evidence == VETO_EVIDENCE and rw.noise_evidence.level is not None
    own = MetaReweighter(model, opt, meta, loss_fn=lambda z, t: F.cross_entropy(z, t, reduction="none"))
    assert own.options.normalization == "auto" and own.options.veto_evidence is None  # settled by the first batch
    assert MetaReweighter(model, opt, meta, veto_evidence=0.1).options.veto_evidence == 0.1
    assert MetaReweighter(model, opt, meta, veto=math.inf).options.veto_evidence == 0.0  # no veto to hold off
    assert MetaReweighter(model, opt, meta, net="l2rw").options.veto_evidence == 0.0
    assert MetaReweighter(model, opt, meta, veto=math.inf, veto_evidence=0.1).noise_evidence is None
    assert MetaReweighter(model, opt, meta, veto_evidence=0).noise_evidence is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"veto_evidence": -0.01}, ValueError, r"veto_evidence must be in \[0, 0.9\)"),
        ({"veto_evidence": 0.9}, ValueError, r"veto_evidence must be in \[0, 0.9\)"),
        ({"veto_evidence": float("nan")}, ValueError, r"veto_evidence must be in \[0, 0.9\)"),
        ({"veto_evidence": True}, TypeError, "veto_evidence must be a number"),
        ({"veto_evidence": "0.05"}, TypeError, "veto_evidence must be a number"),
        ({"net": "l2rw", "veto_evidence": 0.05}, ValueError, "veto_evidence does not apply to net='l2rw'"),
    ],
)
def test_bad_veto_evidence_is_refused(kwargs, error, match):
    model, opt, meta = _parts()
    with pytest.raises(error, match=match):
        MetaReweighter(model, opt, meta, **kwargs)


# ------------------------------------------------------------------------------ which meta losses are read


def _meta_losses_at_the_lookahead(model, x, y, xm, ym):
    """The meta batch's per-sample losses at ``theta - lr * grad mean(L_i)`` (uniform weights), by ``torch.func``."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)
    ahead = {k: params[k] - LR * g[k] for k in params}
    return F.cross_entropy(functional_call(model, ahead, (xm,)), ym, reduction="none")


@pytest.mark.parametrize(
    ("engine", "lookahead"),
    [("reverse", "full"), ("forward", "full"), ("ghost", "full"), ("ghost_lean", "full"), ("higher", "full"),
     ("finite_difference", "full"), ("linear_head", "head")],
)  # fmt: skip
def test_which_meta_losses_the_evidence_reads_with_every_engine(engine, lookahead):
    """A net that reads the logits compares training and meta losses both at the current parameters (the
    look-ahead's lowers every meta loss early in a run, which reads as noise on clean labels); LossNet reads the
    look-ahead's, which starts its veto sooner; the meta loss the reweighter reports is the look-ahead's."""
    pytest.importorskip("higher") if engine == "higher" else None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, D, generator=g, dtype=torch.float64), torch.randint(0, K, (16,), generator=g)
    xm, ym = torch.randn(10, D, generator=g, dtype=torch.float64), torch.randint(0, K, (10,), generator=g)
    now = F.cross_entropy(model(xm), ym, reduction="none").detach()
    ahead = _meta_losses_at_the_lookahead(model, x, y, xm, ym)
    if lookahead == "head":  # only the final layer moves
        params = {k: p.detach() for k, p in model.named_parameters()}
        gh = grad(lambda p: F.cross_entropy(functional_call(model, {**params, **p}, (x,)), y))(
            {k: params[k] for k in ("2.weight", "2.bias")}
        )
        moved = {**params, **{k: params[k] - LR * gh[k] for k in gh}}
        ahead = F.cross_entropy(functional_call(model, moved, (xm,)), ym, reduction="none")
    seen = []
    original = NoiseEvidence.observe
    state = copy.deepcopy(model.state_dict())
    for net, want in (("logitnet", now), ("lossnet", ahead)):  # LossNet reads the look-ahead's (its veto sooner)
        seen.clear()
        model.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        rw = MetaReweighter(model, opt, [(xm, ym)], net=net, engine=engine, lookahead=lookahead, seed=0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(NoiseEvidence, "observe", lambda self, *a: seen.append(a[1]) or original(self, *a))
            rw.step(x, y, model(x))
        assert len(seen) == 1 and seen[0].shape == (10,)
        torch.testing.assert_close(seen[0], want, rtol=1e-9, atol=1e-12)
        assert rw.last_meta_loss.item() == pytest.approx(ahead.mean().item(), rel=1e-9)
    assert (ahead - now).abs().max() > 1e-2  # the two readings are told apart here


def _first_reading(rw, x, targets, outputs):
    """One step of ``rw``: the classes its evidence read (``None`` against the whole meta batch), after checking
    its level against ``excess_above`` on what the evidence was given."""
    seen = []
    original = NoiseEvidence.observe
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NoiseEvidence, "observe", lambda self, *a: seen.append(a) or original(self, *a))
        rw.step(x, targets, outputs)
    ((losses, meta_losses, *given),) = seen
    classes, meta_classes = given or (None, None)  # none given: the whole meta batch, one class
    blind = (torch.zeros_like(losses, dtype=torch.long), torch.zeros_like(meta_losses, dtype=torch.long))
    excess = excess_above(losses, classes if given else blind[0], meta_losses, meta_classes if given else blind[1])
    assert rw.noise_evidence.level.item() == pytest.approx((1 - DECAY) * (excess[0] / excess[1]).item(), abs=1e-12)
    return classes, meta_classes


@pytest.mark.parametrize("net", ["logitnet", "lossnet"])
def test_the_reweighter_reads_class_labels_by_class(net):
    """The first update's level is 1 - DECAY of the excess of the training losses over the meta losses, both at
    the current parameters, each read against its own class's: under normalization="class" (LogitNet's default on class
    labels) and under "sum" (LossNet's) alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(24, D, generator=g, dtype=torch.float64), torch.randint(0, K, (24,), generator=g)
    xm, ym = torch.randn(15, D, generator=g, dtype=torch.float64), torch.randint(0, K, (15,), generator=g)
    now = F.cross_entropy(model(xm), ym, reduction="none").detach()
    meta_losses = now if net == "logitnet" else _meta_losses_at_the_lookahead(model, x, y, xm, ym).detach()
    losses = F.cross_entropy(model(x), y, reduction="none").detach()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rw = MetaReweighter(model, opt, [(xm, ym)], net=net, veto_evidence=0.05, meta_warmup=0, seed=0)
    rw.step(x, y, model(x))
    assert rw.options.normalization == ("class" if net == "logitnet" else "sum")
    excess = excess_above(losses, y, meta_losses, ym)
    assert rw.noise_evidence.level.item() == pytest.approx((1 - DECAY) * (excess[0] / excess[1]).item(), abs=1e-9)
    blind = excess_above(losses, torch.zeros_like(y), meta_losses, torch.zeros_like(ym))
    assert abs((blind[0] / blind[1]).item() - (excess[0] / excess[1]).item()) > 1e-3  # the two readings differ here


@pytest.mark.parametrize(("net", "normalization"), [("logitnet", "class"), ("lossnet", "sum")])
def test_soft_targets_are_read_at_their_largest_class_under_class_normalization(net, normalization):
    """Soft training targets: under normalization="class" each loss is read against the meta losses of its
    target's largest class; under "sum" they are not class labels, and each is read against the whole meta
    batch's losses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()
    g = torch.Generator().manual_seed(6)
    x, xm = torch.randn(24, D, generator=g, dtype=torch.float64), torch.randn(15, D, generator=g, dtype=torch.float64)
    soft, ym = torch.softmax(3 * torch.randn(24, K, generator=g, dtype=torch.float64), -1), torch.arange(15) % K
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rw = MetaReweighter(model, opt, [(xm, ym)], net=net, normalization=normalization, loss_fn=_soft_ce,
                        meta_loss_fn=cross_entropy, veto_evidence=0.05, meta_warmup=0, seed=0)  # fmt: skip
    classes, meta_classes = _first_reading(rw, x, soft, model(x))
    if normalization == "sum":
        assert classes is None and meta_classes is None
    else:
        assert torch.equal(classes, soft.argmax(-1)) and torch.equal(meta_classes, ym)


def test_float_class_indices_of_a_meta_loss_of_the_users_are_read_as_indices():
    """Meta targets as float class indices, which a meta loss of the user's accepts: read as the classes they name
    (not as soft targets over the batch)."""
    torch.manual_seed(0)
    model = nn.Linear(D, K).double()
    g = torch.Generator().manual_seed(7)
    x, xm = torch.randn(24, D, generator=g, dtype=torch.float64), torch.randn(15, D, generator=g, dtype=torch.float64)
    y, ym = torch.randint(0, K, (24,), generator=g), torch.arange(15) % K
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rw = MetaReweighter(model, opt, [(xm, ym.double())], net="logitnet", normalization="class",
                        meta_loss_fn=lambda z, t: F.cross_entropy(z, t.long(), reduction="none"), veto_evidence=0.05,
                        meta_warmup=0, seed=0)  # fmt: skip
    classes, meta_classes = _first_reading(rw, x, y, model(x))
    assert torch.equal(classes, y) and torch.equal(meta_classes, ym)


def _soft_ce(logits, targets):
    return -(targets * F.log_softmax(logits, -1)).sum(-1)


# ------------------------------------------------------------------------ the veto waits for the evidence


def _blobs(n: int, seed: int, noise: float):
    """Three well-separated Gaussian classes; a share ``noise`` of the labels replaced by random ones."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.eye(K, D)
    y = torch.randint(0, K, (n,), generator=g)
    x = centres[y] + torch.randn(n, D, generator=g)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(0, K, (n,), generator=g), y)


def _run(noise: float, steps: int, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(D, K)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xm, ym = _blobs(60, 1, 0.0)
    meta = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xm, ym), batch_size=30, shuffle=False)
    x, y = _blobs(32 * steps, 2, noise)
    rw = MetaReweighter(model, opt, meta, net="gated", meta_warmup=0, seed=0, **kwargs)
    out = []
    for t in range(steps):
        xb, yb = x[32 * t : 32 * (t + 1)], y[32 * t : 32 * (t + 1)]
        logits = model(xb)
        w = rw.step(xb, yb, logits)
        opt.zero_grad()
        (w * F.cross_entropy(logits, yb, reduction="none")).mean().backward()
        opt.step()
        out.append(w)
    return rw, out


def test_on_clean_labels_the_veto_never_acts():
    """Clean training labels drawn like the meta set: the evidence stays below the threshold, and every weight
    equals the run's without a veto (the same trajectory, bit for bit)."""
    rw, gated = _run(0.0, 120, veto_evidence=0.05)
    _, none = _run(0.0, 120, veto=math.inf)
    _, always = _run(0.0, 120, veto_evidence=0)
    assert not bool(rw.noise_evidence.shown) and rw.noise_evidence.level.item() < 0.05
    assert all(torch.equal(a, b) for a, b in zip(gated, none))
    assert any((w == 0).any() for w in always)  # without the gate the veto acts on the same data


def test_under_heavy_noise_the_evidence_is_shown_and_the_veto_acts_from_then_on():
    rw, gated = _run(0.6, 120, veto_evidence=0.05)
    _, none = _run(0.6, 120, veto=math.inf)
    assert bool(rw.noise_evidence.shown)
    first = next(t for t, (a, b) in enumerate(zip(gated, none)) if not torch.equal(a, b))
    assert 1 < first < 60  # identical to no veto until the evidence is shown (0.05 of one share cannot reach 0.05)
    assert all((w == 0).any() for w in gated[first : first + 5])  # then the veto zeroes samples


def _own_loss(z, t):
    if t.ndim == 1 and not t.is_floating_point():
        return F.cross_entropy(z, t, reduction="none")
    return (z - t).pow(2).mean(1)


@pytest.mark.parametrize(("net", "normalization"), [("logitnet", "auto"), ("lossnet", "sum")])
def test_the_first_batch_settles_the_wait_as_naming_it(net, normalization):
    """Class labels wait for the evidence, other targets (soft or regression ones) do not, and the run is the one
    with the wait (and the normalisation) named, bit for bit: a loss of the user's under normalization="auto"
    (LogitNet), or LossNet under "sum"."""
    for targets, mode, wait in ((lambda g, n: torch.randint(0, K, (n,), generator=g), "class", VETO_EVIDENCE),
                                (lambda g, n: torch.randn(n, K, generator=g), "sum", 0.0)):  # fmt: skip
        mode = mode if normalization == "auto" else normalization
        runs = []
        for kwargs in ({}, {"normalization": mode, "veto_evidence": wait}):
            torch.manual_seed(0)
            model = nn.Linear(D, K)
            g = torch.Generator().manual_seed(1)
            meta = [(torch.randn(12, D, generator=g), targets(g, 12))]
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            rw = MetaReweighter(model, opt, meta, net=net, loss_fn=_own_loss, seed=0, meta_warmup=0, **kwargs)
            weights = []
            for _ in range(3):
                x, y = torch.randn(16, D, generator=g), targets(g, 16)
                weights.append(rw.step(x, y, model(x)))
            assert rw.options.normalization == mode and rw.options.veto_evidence == wait
            assert (rw.noise_evidence is not None) == (wait > 0)
            runs.append(weights)
        assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_state_loaded_before_the_first_batch_keeps_its_evidence_under_a_loss_of_the_users():
    """The wait is settled by the first batch, after a resume: the loaded evidence must survive it."""
    rw, _ = _run(0.6, 40, veto_evidence=0.05)
    state = copy.deepcopy(rw.state_dict())
    fresh, _ = _run(0.6, 0, loss_fn=_own_loss)
    assert fresh.options.veto_evidence is None
    fresh.load_state_dict(state)
    x, y = _blobs(16, 3, 0.0)
    fresh.step(x, y, fresh.module(x))
    assert fresh.options.veto_evidence == VETO_EVIDENCE and bool(fresh.noise_evidence.shown)


def test_the_evidence_resumes_exactly_and_an_older_state_keeps_its_veto():
    rw, _ = _run(0.6, 40, veto_evidence=0.05)
    state = copy.deepcopy(rw.state_dict())
    assert state["noise_evidence"]["shown"] is True
    fresh, _ = _run(0.6, 1, veto_evidence=0.05)
    fresh.load_state_dict(state)
    assert fresh.noise_evidence.level.item() == rw.noise_evidence.level.item() and bool(fresh.noise_evidence.shown)
    old = {k: v for k, v in state.items() if k != "noise_evidence"} | {"version": 2}
    clean, _ = _run(0.0, 1, veto_evidence=0.05)
    clean.load_state_dict(old)  # version 2 vetoed from its first update: a resumed run keeps vetoing
    assert bool(clean.noise_evidence.shown) and clean.noise_evidence.level is None
    unseen = {**state, "noise_evidence": None}  # saved without the gate: nothing seen yet
    clean.load_state_dict(unseen)
    assert clean.noise_evidence.shown is None
    with pytest.raises(ValueError, match="noise_evidence"):
        clean.load_state_dict({**state, "noise_evidence": {"level": "x", "shown": True}})


def test_the_evidence_refuses_a_mean_meta_loss_and_keeps_its_state():
    evidence = NoiseEvidence(0.05)
    evidence.observe(torch.linspace(0, 1, 8), torch.linspace(0, 1, 6))
    level = evidence.level.clone()
    with pytest.raises(ValueError, match=r"per-sample losses, shape \(meta_batch,\), got shape \(\)"):
        evidence.observe(torch.linspace(0, 1, 8), torch.tensor(0.5))
    assert torch.equal(evidence.level, level)


def test_an_engine_that_returns_the_mean_meta_loss():
    """An engine of the user's that returns the mean meta loss: for a net that reads the logits the evidence reads
    the meta batch at the current parameters itself, so its level is that of a library engine; LossNet, whose
    evidence reads the engine's meta losses, is refused before the net or the evidence changes."""
    from reweight.engines import MetaGradient, register_engine
    from reweight.engines.base import _ENGINES

    @register_engine("mean_only", description="zero coefficients and the mean meta loss")
    def mean_only(problem):
        return MetaGradient(torch.zeros_like(problem.weights), problem.weights.new_zeros(()))

    try:
        model, opt, meta = _parts()
        x, y = torch.randn(8, D), torch.randint(0, K, (8,))
        levels = []
        for engine in ("mean_only", "reverse"):
            rw = MetaReweighter(model, opt, meta, engine=engine, veto_evidence=0.05, seed=0, num_classes=K)
            rw.step(x, y, model(x))
            levels.append(rw.noise_evidence.level.item())
        assert levels[0] == levels[1]
        rw = MetaReweighter(model, opt, meta, net="lossnet", engine="mean_only", veto_evidence=0.05, seed=0)
        before = copy.deepcopy(rw.net.state_dict())
        with pytest.raises(ValueError, match=r"per-sample losses, shape \(meta_batch,\), got shape \(\)"):
            rw.step(x, y, model(x))
        assert all(torch.equal(v, rw.net.state_dict()[k]) for k, v in before.items())
        assert rw.noise_evidence.level is None and rw.step_count == 0
    finally:
        _ENGINES.unregister("mean_only")
