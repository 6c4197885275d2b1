"""Each phase of a meta step is a named range in a profiler trace, and costs nothing when none records."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import reweight._profiling
from reweight import MetaReweighter

from conftest import make_batch

# the default net (the gated net on class labels) reads the evidence of label noise after the engine: one no-grad
# forward of the meta batch at the current parameters
PHASES = {
    "ghost": [
        "meta_update", "engine.ghost", "layer_gradients", "weighted_gradient", "meta_pass", "inner_products",
        "evidence_pass",
    ],
    "ghost_lean": [
        "engine.ghost_lean", "weighted_gradient", "meta_pass", "layer_gradients", "inner_products", "evidence_pass",
    ],
    "forward": ["engine.forward", "weighted_gradient", "meta_pass", "jvp", "evidence_pass"],
}  # fmt: skip


def reweighter(engine: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [make_batch(10, seed=2)], engine=engine)
    return model, rw, make_batch(12)


@pytest.mark.parametrize("engine", sorted(PHASES))
def test_a_trace_names_each_phase_in_the_order_it_ran(engine):
    model, rw, (x, y) = reweighter(engine)
    logits = model(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rw.step(x, y, logits)
    ranges = sorted(
        (e.time_range.start, e.name[len("reweight.") :]) for e in prof.events() if e.name.startswith("reweight.")
    )
    names = [name for _, name in ranges]
    assert names[0] == "meta_update" and set(names) == set(PHASES[engine]) | {"meta_update"}
    firsts = [names.index(p) for p in PHASES[engine]]
    assert firsts == sorted(firsts), names


def test_no_range_is_opened_without_a_profiler(monkeypatch):
    def fail(name):
        raise AssertionError(f"record_function({name!r}) called with no profiler running")

    monkeypatch.setattr(reweight._profiling, "record_function", fail)
    model, rw, (x, y) = reweighter("ghost")
    logits = model(x)
    weights = rw.step(x, y, logits)
    (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
    assert rw.step_count == 1
