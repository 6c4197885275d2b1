"""preset=: the documented bundles, explicit arguments overriding them, clear errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from reweight import MetaReweighter
from reweight.presets import FROM_PRESET, PRESETS, resolve_preset


def _parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    return model, opt, meta


def test_exact_is_the_documented_default():
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, seed=0)
    assert rw.preset == "exact"
    assert (rw.interval, rw.engine, rw.normalization, rw.virtual_step, rw.lookahead_lr) == (
        1,
        "auto",
        "class",  # the default net (gated) reads the logits; LossNet would get "sum"
        "sgd",
        None,
    )
    assert PRESETS["exact"]["lookahead"] == "full"


def test_fast_resolves_to_its_table():
    model, opt, meta = _parts()
    rw = MetaReweighter(model, opt, meta, preset="fast", seed=0)
    assert rw.interval == PRESETS["fast"]["interval"] == 6
    rw.step(torch.randn(5, 4), torch.randint(0, 3, (5,)), model(torch.randn(5, 4)))
    group = rw.meta_optimizer.param_groups[0]
    assert type(rw.meta_optimizer) is torch.optim.AdamW
    assert (group["reweight_lr"], group["weight_decay"]) == (6e-3, 5e-4)
    assert group["lr"] == pytest.approx(6e-3 / 300)  # one step into the default meta warm-up


def test_explicit_arguments_override_the_preset():
    model, opt, meta = _parts()
    factory = functools.partial(torch.optim.SGD, lr=0.5)
    rw = MetaReweighter(model, opt, meta, preset="fast", interval=2, meta_optimizer=factory, seed=0)
    assert rw.interval == 2
    rw.step(torch.randn(5, 4), torch.randint(0, 3, (5,)), model(torch.randn(5, 4)))
    group = rw.meta_optimizer.param_groups[0]
    assert isinstance(rw.meta_optimizer, torch.optim.SGD) and group["reweight_lr"] == 0.5
    assert group["lr"] == pytest.approx(0.5 / 300)  # the given lr, warmed up like the default's
    # an explicit value equal to the exact default still overrides a preset that changes it
    assert MetaReweighter(model, opt, meta, preset="fast", interval=1, seed=0).interval == 1


def test_resolve_ignores_unset_and_keeps_given():
    options = resolve_preset("fast", {"interval": FROM_PRESET, "lookahead_lr": 0.1})
    assert options["interval"] == 6 and options["lookahead_lr"] == 0.1
    assert set(options) == set(PRESETS["exact"])


def test_unknown_preset_lists_the_presets():
    model, opt, meta = _parts()
    with pytest.raises(ValueError, match="preset must be one of 'exact', 'fast'; got 'quick'"):
        MetaReweighter(model, opt, meta, preset="quick")


def test_l2rw_with_fast_names_the_preset():
    model, opt, meta = _parts()
    with pytest.raises(ValueError, match="set by preset='fast'; pass interval=1"):
        MetaReweighter(model, opt, meta, net="l2rw", preset="fast")
    assert MetaReweighter(model, opt, meta, net="l2rw", preset="fast", interval=1).interval == 1


def test_fast_preset_is_exact_on_its_update_steps():
    """The fast preset changes when the net learns, not how: float64, its engine equals reverse to 1e-6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    meta = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    batches = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(7)]

    def run(**kw):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        # "sum": in batches of 5 over 3 classes most samples are alone in their class, where "class" fixes them at 1
        rw = MetaReweighter(m, opt, meta, net="metainfonet", preset="fast", normalization="sum", seed=0, **kw)
        out = []
        for x, y in batches:
            logits = m(x)
            w = rw.step(x, y, logits)
            out.append(w)
            opt.zero_grad()
            (w * torch.nn.functional.cross_entropy(logits, y, reduction="none")).mean().backward()
            opt.step()
        return rw, out

    fast, w_fast = run()
    ref, w_ref = run(engine="reverse")
    assert fast.engine_name != "reverse" and fast.interval == 6
    for a, b in zip(w_fast, w_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for p, q in zip(fast.net.parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert fast.step_count == 7 and not torch.allclose(w_fast[0], torch.ones(5, dtype=torch.float64))
