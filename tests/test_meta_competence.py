"""The veto's wait for the model's competence on the meta set (``veto_competence``): the moving average of the
chance-corrected meta accuracy against an independent reference, the latch, the veto held off until it opens,
an exact resume, older states, and the configurations it is refused in."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reweight.net_slot as net_slot
from reweight import MetaReweighter
from reweight.meta_competence import DECAY, MetaCompetence
from reweight.options import VETO_COMPETENCE

K, D, STEPS = 3, 5, 40  # the runs draw STEPS batches and train on the first ones


def _blobs(n: int, seed: int, noise: float):
    """Three Gaussian classes close enough that a linear model needs a few dozen steps to learn them; a share
    ``noise`` of the labels replaced by random ones."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    x = 1.5 * torch.eye(K, D)[y] + torch.randn(n, D, generator=g)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(0, K, (n,), generator=g), y)


def _run(steps: int, net: str = "gated", start: int = 0, resume: tuple | None = None, **kwargs):
    """Plain SGD on noisy blobs with one meta batch (the whole meta set, so that the meta accuracy at each update
    is the model's on that set before its step), over steps ``start .. steps - 1`` (``resume``: the model's, the
    optimizer's and the reweighter's states to start from). Returns the reweighter, the weights per step, the meta
    accuracy per step read independently (before the step), and the model and its optimizer."""
    torch.manual_seed(0)
    model = nn.Linear(D, K)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()  # starts at chance: every logit equal
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xm, ym = _blobs(60, 1, 0.0)
    x, y = _blobs(32 * STEPS, 2, 0.6)
    rw = MetaReweighter(model, opt, [(xm, ym)], net=net, meta_warmup=0, veto_warmup=0, seed=0, **kwargs)
    if resume is not None:
        for obj, state in zip((model, opt, rw), resume):
            obj.load_state_dict(copy.deepcopy(state))
    weights, accuracy = [], []
    for t in range(start, steps):
        with torch.no_grad():
            accuracy.append((model(xm).argmax(1) == ym).double().mean().item())
        xb, yb = x[32 * t : 32 * (t + 1)], y[32 * t : 32 * (t + 1)]
        logits = model(xb)
        w = rw.step(xb, yb, logits)
        opt.zero_grad()
        (w * F.cross_entropy(logits, yb, reduction="none")).mean().backward()
        opt.step()
        weights.append(w)
    return rw, weights, accuracy, (model, opt)


def _reference_levels(accuracy: list[float], classes: int = K) -> list[float]:
    """The moving average of (acc - 1/K) / (1 - 1/K), written out."""
    levels, level = [], 0.0
    for acc in accuracy:
        level = DECAY * level + (1 - DECAY) * (acc - 1 / classes) / (1 - 1 / classes)
        levels.append(level)
    return levels


def test_the_level_is_the_moving_chance_corrected_accuracy_and_latches():
    competence = MetaCompetence(0.3)
    targets = torch.arange(4).repeat(5)
    right = F.one_hot(targets, 4).float()
    wrong = F.one_hot((targets + 1) % 4, 4).float()
    sequence = [right] * 5 + [wrong] * 20
    accuracy = [1.0] * 5 + [0.0] * 20
    for t, (logits, expected) in enumerate(zip(sequence, _reference_levels(accuracy, 4))):
        competence.observe(logits, targets)
        assert competence.level.item() == pytest.approx(expected, abs=1e-12)
        assert bool(competence.shown) == (t >= 3 or max(_reference_levels(accuracy[: t + 1], 4)) >= 0.3)
    assert competence.level.item() < 0 and bool(competence.shown)  # below chance now, still latched


def test_bad_threshold_and_shapes_are_refused():
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
            MetaCompetence(bad)
    competence = MetaCompetence(0.5)
    with pytest.raises(ValueError, match=r"\(meta_batch, K >= 2\) logits"):
        competence.observe(torch.zeros(6), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(meta_batch, K >= 2\) logits"):
        competence.observe(torch.zeros(6, 3), torch.zeros(5, dtype=torch.long))
    assert competence.level is None


@pytest.mark.parametrize("net", ["gated", "lossnet"])
def test_the_reweighter_reads_the_meta_accuracy_at_the_current_parameters(net):
    rw, _, accuracy, _ = _run(30, net, veto_competence=0.9, veto_evidence=0.05)
    assert rw.meta_competence.level.item() == pytest.approx(_reference_levels(accuracy)[-1], abs=1e-12)
    assert not bool(rw.meta_competence.shown)


@pytest.mark.parametrize("net", ["gated", "lossnet"])
def test_until_competent_the_veto_does_not_act(monkeypatch, net):
    """Never competent (threshold out of reach): the run is the one whose veto is switched off, bit for bit;
    competent from a step on: the same up to that step, and the veto acts after it."""
    _, never, accuracy, _ = _run(40, net, veto_competence=0.99, veto_evidence=0.05)
    _, default, _, _ = _run(40, net, veto_evidence=0.05, veto_competence=0)
    threshold = 0.3
    levels = _reference_levels(accuracy)
    opens = next(t for t, level in enumerate(levels) if level >= threshold)
    assert 5 < opens < 35  # the case is not trivial
    _, later, _, _ = _run(40, net, veto_competence=threshold, veto_evidence=0.05)
    monkeypatch.setattr(net_slot.NetSlot, "vetoed", lambda self, w, unit, inputs, step: w)
    _, off, _, _ = _run(40, net, veto_competence=0.99, veto_evidence=0.05)
    assert all(torch.equal(a, b) for a, b in zip(never, off))
    assert all(torch.equal(a, b) for a, b in zip(later[:opens], off[:opens]))
    assert not all(torch.equal(a, b) for a, b in zip(later[opens:], off[opens:]))  # the veto acts once open
    assert not all(torch.equal(a, b) for a, b in zip(default, off))  # and the evidence alone lets it act


def test_an_exact_resume_and_an_older_state():
    kwargs = {"veto_competence": 0.3, "veto_evidence": 0.05}
    rw, straight, _, _ = _run(30, **kwargs)
    first, _, _, (model, opt) = _run(15, **kwargs)
    state = first.state_dict()
    assert set(state["meta_competence"]) == {"level", "shown"}
    resumed, rest, _, _ = _run(30, start=15, resume=(model.state_dict(), opt.state_dict(), state), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(rest, straight[15:])) and len(rest) == 15
    assert resumed.meta_competence.level.item() == rw.meta_competence.level.item()
    old = {k: v for k, v in state.items() if k != "meta_competence"} | {"version": 3}
    resumed.load_state_dict(old)  # version 3's veto did not wait for competence: a resumed run's does not either
    assert bool(resumed.meta_competence.shown) and resumed.meta_competence.level is None
    with pytest.raises(ValueError, match="meta_competence"):
        resumed.load_state_dict({**state, "meta_competence": {"level": math.nan, "shown": True}})


def _parts():
    model = nn.Linear(D, K)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), [_blobs(12, 1, 0.0)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"veto_competence": True}, TypeError, "veto_competence must be a number"),
        ({"veto_competence": "0.5"}, TypeError, "veto_competence must be a number"),
        ({"veto_competence": 1.0}, ValueError, r"veto_competence must be in \[0, 1\)"),
        ({"veto_competence": -0.1}, ValueError, r"veto_competence must be in \[0, 1\)"),
        ({"veto_competence": 0.4, "veto": math.inf}, ValueError, "nothing waits"),
        ({"veto_competence": 0.4, "veto_evidence": 0}, ValueError, "nothing waits"),
        ({"veto_competence": 0.4, "net": "l2rw"}, ValueError, "nothing waits"),
    ],
)
def test_configurations_where_nothing_waits_are_refused(kwargs, error, match):
    model, opt, meta = _parts()
    with pytest.raises(error, match=match):
        MetaReweighter(model, opt, meta, **kwargs)


def test_targets_that_are_not_class_labels_are_refused_at_the_first_batch():
    model, opt, meta = _parts()

    def own_loss(z, t):
        return (z - t).pow(2).mean(1) if t.is_floating_point() else F.cross_entropy(z, t, reduction="none")

    meta = [(meta[0][0], torch.randn(12, K))]
    rw = MetaReweighter(model, opt, meta, net="lossnet", loss_fn=own_loss, veto_competence=0.4)
    x, t = torch.randn(8, D), torch.randn(8, K)
    with pytest.raises(ValueError, match="veto_competence reads the model's accuracy on the meta set"):
        rw.step(x, t, model(x))
    assert rw.step_count == 0 and rw.meta_competence is not None


def test_off_by_default_and_settled_with_the_wait():
    """Off by default (0, wherever the veto waits); a value given is kept where the veto waits on class labels, and
    the net slot holds the competence only then."""
    model, opt, meta = _parts()
    x, y = _blobs(8, 3, 0.0)
    assert VETO_COMPETENCE == 0
    cases = [({}, 0.0, 0.0), ({"net": "lossnet"}, None, 0.0), ({"veto": math.inf}, 0.0, 0.0),
             ({"veto_competence": 0}, 0.0, 0.0), ({"veto_competence": 0.2}, 0.2, 0.2),
             ({"net": "lossnet", "veto_competence": 0.45}, 0.45, 0.45)]  # fmt: skip
    for kwargs, at_construction, settled in cases:
        rw = MetaReweighter(model, opt, meta, seed=0, **kwargs)
        assert rw.options.veto_competence == at_construction, kwargs
        rw.step(x, y, model(x))
        assert rw.options.veto_competence == settled, kwargs
        assert (rw.meta_competence is not None) == bool(settled), kwargs
        assert rw.meta_competence is None or rw.meta_competence.threshold == settled
        assert (rw.state_dict()["meta_competence"] is None) == (not settled)
