"""PlainTwinGuard: the twin is plain training, the guard leaves the reweighted run as it is until it falls back,
the fall-back hands over the twin's exact state, resume is exact, bad input is refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import GuardFallbackWarning, MetaReweighter, PlainTwinGuard


def _data(seed: int = 0, n: int = 96, d: int = 6, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _model(bn: bool | str = False) -> nn.Module:
    torch.manual_seed(0)
    middle = {False: [], True: [nn.BatchNorm1d(16)], "dropout": [nn.Dropout(0.3)]}[bn]
    layers = [nn.Linear(6, 16), *middle, nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def _setup(bn: bool | str = False, guard: bool = True, **guard_kwargs):
    model = _model(bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    xm, ym = _data(1, 24)
    meta = [(xm[:12], ym[:12]), (xm[12:], ym[12:])]
    holdout = [_data(2, 20)]
    rw = MetaReweighter(model, opt, meta, net="lossnet", seed=0, collapse_threshold=None)
    return model, opt, rw, PlainTwinGuard(rw, holdout, seed=0, **guard_kwargs) if guard else None


def _batches(steps: int, size: int = 16):
    x, y = _data(3, steps * size)
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(steps)]


def _train(model, opt, stepper, batches, sched=None, sign: float = 1.0):
    for x, y in batches:
        logits = model(x)
        w = stepper(x, y, logits)
        opt.zero_grad()
        (sign * w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("bn", [False, True])
def test_twin_is_plain_training_and_the_run_is_untouched(bn):
    """Until a fall-back the twin equals an independent plain run (the user's lr schedule included) and the
    reweighted model equals the same run without the guard (its checks' forwards reach no hook, no buffer)."""
    batches = _batches(12)
    model, opt, rw, guard = _setup(bn, check_every=2, start=0, patience=100)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 4, 0.5)
    _train(model, opt, guard.step, batches, sched)
    _train(reference, ref_opt, lambda x, y, logits: torch.ones_like(y, dtype=logits.dtype), batches, ref_sched)
    assert len(guard.gaps) == 6 and guard.fell_back_at is None
    for (name, p), q in zip(guard.twin.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)

    alone, alone_opt, alone_rw, _ = _setup(bn, guard=False)  # the same reweighted run without the guard
    alone_sched = torch.optim.lr_scheduler.StepLR(alone_opt, 4, 0.5)
    _train(alone, alone_opt, alone_rw.step, batches, alone_sched)
    for (name, p), q in zip(model.state_dict().items(), alone.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_the_twins_dropout_leaves_the_users_rng():
    """The twin draws its dropout masks from its own seed: the user's RNG and the reweighted run are as without it."""
    batches = _batches(8)
    model, opt, rw, guard = _setup("dropout", check_every=2, start=0, patience=100)
    torch.manual_seed(5)
    _train(model, opt, guard.step, batches)
    after = torch.get_rng_state()
    alone, alone_opt, alone_rw, _ = _setup("dropout", guard=False)
    torch.manual_seed(5)
    _train(alone, alone_opt, alone_rw.step, batches)
    assert torch.equal(after, torch.get_rng_state())
    for (name, p), q in zip(model.state_dict().items(), alone.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_fall_back_after_losing_to_the_twin():
    """A model trained to be worse (gradient ascent) loses to its twin at two checks in a row; from then on the
    weights are uniform and the reweighter is no longer called."""
    model, opt, rw, guard = _setup(check_every=2, start=2, patience=2)
    batches = _batches(6)
    with pytest.warns(GuardFallbackWarning, match="step 4: .* above its plain twin's at 2 checks"):
        _train(model, opt, guard.step, batches[:4], sign=-1.0)
    assert guard.fell_back_at == 4 and guard.twin is None and len(guard.gaps) == 2 and min(guard.gaps) > 0
    steps = rw.step_count
    x, y = batches[4]
    w = guard.step(x, y, model(x))
    assert torch.equal(w, torch.ones(len(y), dtype=w.dtype)) and rw.step_count == steps == 4


def test_fall_back_state_equals_the_twins_exactly():
    model, opt, rw, guard = _setup(check_every=1, start=1, patience=1)
    x, y = _batches(1)[0]
    logits = model(x)
    w = guard.step(x, y, logits)  # the check reads the models before either steps on this batch: equal, gap 0
    assert guard.gaps == [0.0]
    guard._pending = True  # force the hand-over at this step
    twin = copy.deepcopy(guard.twin)
    opt.zero_grad()
    (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
    for n, p in twin.named_parameters():  # the twin's gradient of this batch, on a copy stepped by hand
        p.grad = guard.twin.get_parameter(n).grad.clone()
    ref_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    with pytest.warns(GuardFallbackWarning):
        opt.step()
    ref_opt.step()
    for (name, p), q in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    for p, q in zip(opt.state.values(), ref_opt.state.values(), strict=True):
        torch.testing.assert_close(p["momentum_buffer"], q["momentum_buffer"], rtol=0, atol=0)


def test_gradient_accumulation_averages_the_twins_micro_batches():
    model, opt, rw, guard = _setup(check_every=1000)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = _batches(6, size=8)
    for i in range(0, 6, 2):
        opt.zero_grad()
        ref_opt.zero_grad()
        for x, y in batches[i : i + 2]:
            logits = model(x)
            w = guard.step(x, y, logits)
            ((w * F.cross_entropy(logits, y, reduction="none")).mean() / 2).backward()
            (F.cross_entropy(reference(x), y) / 2).backward()
        opt.step()
        ref_opt.step()
    for p, q in zip(guard.twin.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_resume_is_exact():
    batches = _batches(10)
    model, opt, rw, guard = _setup(check_every=2, start=0, patience=100)
    _train(model, opt, guard.step, batches[:5])
    saved = [copy.deepcopy(s) for s in (model.state_dict(), opt.state_dict(), rw.state_dict(), guard.state_dict())]
    _train(model, opt, guard.step, batches[5:])

    model2, opt2, rw2, guard2 = _setup(check_every=2, start=0, patience=100)
    for obj, state in zip((model2, opt2, rw2, guard2), saved, strict=True):
        obj.load_state_dict(state)
    _train(model2, opt2, guard2.step, batches[5:])
    assert guard2.gaps == guard.gaps and guard2.step_count == guard.step_count == 10
    for p, q in zip(guard2.twin.parameters(), guard.twin.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_input_is_refused():
    model, opt, rw, _ = _setup(guard=False)
    with pytest.raises(ValueError, match="holdout is empty"):
        PlainTwinGuard(rw, [])
    with pytest.raises(TypeError, match="re-iterable"):
        PlainTwinGuard(rw, iter([_data(2, 4)]))
    with pytest.raises(ValueError, match="check_every must be an integer >= 1"):
        PlainTwinGuard(rw, [_data(2, 4)], check_every=0)
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        PlainTwinGuard(rw, [_data(2, 4)], patience=0)
    with pytest.raises(TypeError, match="must be a MetaReweighter"):
        PlainTwinGuard(model, [_data(2, 4)])
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt2 = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    rw2 = MetaReweighter(model, opt2, [_data(1, 8)], net="lossnet", seed=0)
    with pytest.raises(ValueError, match="outside the model"):
        PlainTwinGuard(rw2, [_data(2, 4)])
    guard = PlainTwinGuard(rw, [_data(2, 4)])
    x, y = _batches(1)[0]
    guard.step(x, y, model(x))
    with pytest.raises(RuntimeError, match="between micro-batches"):
        guard.state_dict()
    with pytest.raises(ValueError, match="missing"):
        guard.load_state_dict({"steps": 0})


def test_no_warning_while_the_guard_holds():
    model, opt, rw, guard = _setup(check_every=2, start=0, patience=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuardFallbackWarning)
        _train(model, opt, guard.step, _batches(6))


def _show_evidence(rw: MetaReweighter) -> None:
    """The reweighter's evidence of label noise, shown (as the meta set would show it under noise)."""
    assert rw.noise_evidence is not None
    rw.noise_evidence.shown = torch.tensor(True)


def test_stands_down_once_the_evidence_shows():
    """At the first check after the evidence shows, the twin is dropped and the held-back batches join the meta
    stream from a new pass on; with stand_down=False the guard keeps its twin."""
    model, opt, rw, guard = _setup(check_every=2, start=0, patience=100)
    kept, kept_opt, kept_rw, keeper = _setup(check_every=2, start=0, patience=100, stand_down=False)
    batches = _batches(6)
    _train(model, opt, guard.step, batches[:3])
    _train(kept, kept_opt, keeper.step, batches[:3])
    for r in (rw, kept_rw):
        _show_evidence(r)
    _train(model, opt, guard.step, batches[3:4])
    _train(kept, kept_opt, keeper.step, batches[3:4])
    assert guard.stood_down_at == 4 and guard.twin is None and guard.fell_back_at is None
    assert keeper.stood_down_at is None and keeper.twin is not None
    held = guard.holdout[0][0]
    seen = [rw.meta_stream.next()[0] for _ in range(3)]  # a new pass: the two meta batches, then the held-back one
    assert rw.meta_stream.position == 3 and seen[2] is held
    assert not any(b is held for b in (kept_rw.meta_stream.next()[0] for _ in range(4)))
    steps = rw.step_count  # stood down, not fallen back: the reweighter's weights go on
    _train(model, opt, guard.step, batches[4:])
    assert rw.step_count == steps + 2 and guard.step_count == 6


def test_resume_after_standing_down_is_exact():
    batches = _batches(10)
    model, opt, rw, guard = _setup(check_every=2, start=0, patience=100)
    _train(model, opt, guard.step, batches[:3])
    _show_evidence(rw)
    _train(model, opt, guard.step, batches[3:5])
    assert guard.stood_down_at == 4
    saved = [copy.deepcopy(s) for s in (model.state_dict(), opt.state_dict(), rw.state_dict(), guard.state_dict())]
    _train(model, opt, guard.step, batches[5:])

    model2, opt2, rw2, guard2 = _setup(check_every=2, start=0, patience=100)
    for obj, state in zip((model2, opt2, guard2, rw2), (saved[0], saved[1], saved[3], saved[2]), strict=True):
        obj.load_state_dict(state)  # the guard before the reweighter here: either order restores the stream
    _train(model2, opt2, guard2.step, batches[5:])
    assert guard2.stood_down_at == 4 and guard2.twin is None
    assert rw2.meta_stream.state_dict() == rw.meta_stream.state_dict()
    for p, q in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
