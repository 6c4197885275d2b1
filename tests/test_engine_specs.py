"""Engines declare what they need when registered, and the reweighter reads nothing else: a toy engine
with data-parallel support and a forward capture runs with no change elsewhere; auto's choice is explained;
parameters the look-ahead cannot use are refused at construction."""

import logging

import pytest
import torch
from torch import nn

from reweight import MetaReweighter
from reweight.engines import get_engine
from reweight.engines.base import _ENGINES, get_engine_spec, register_engine
from reweight.engines.select import select_engine


class CountingCapture:
    """A capture that counts the caller's forwards seen while armed."""

    instances: list["CountingCapture"] = []

    def __init__(self, module, params):
        self.armed, self.seen, self.removed = False, 0, False
        self.params = params
        self.handle = module.register_forward_hook(self._hook)
        CountingCapture.instances.append(self)

    def _hook(self, module, args, output):
        if self.armed:
            self.seen += 1

    def remove(self):
        self.handle.remove()
        self.removed = True


@pytest.fixture
def toy_engine():
    received = []

    @register_engine("toy", description="reverse's coefficients, through a capture", capture=CountingCapture)
    def toy(problem):
        received.append(problem.capture)
        return get_engine("reverse")(problem)

    CountingCapture.instances.clear()
    yield received
    _ENGINES.unregister("toy")


def _setup(model=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    meta = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    return model, opt, meta, x, y


def test_a_registered_engine_gets_its_capture_through_the_problem(toy_engine):
    model, opt, meta, x, y = _setup()
    rw = MetaReweighter(model, opt, meta, engine="toy", seed=0, interval=2)
    (capture,) = CountingCapture.instances
    assert rw.engine_name == "toy" and get_engine_spec("toy").data_parallel
    for _ in range(4):
        rw.step(x, y, model(x))
    assert toy_engine == [capture, capture]  # two meta updates, each handed the capture
    assert capture.seen == 2  # armed only before the steps that update
    reference = MetaReweighter(model, opt, meta, engine="reverse", seed=0, interval=2)
    for _ in range(4):
        weights_ref = reference.step(x, y, model(x))
    for p, q in zip(rw.net.parameters(), reference.net.parameters()):
        torch.testing.assert_close(p, q)
    assert torch.equal(rw.step(x, y, model(x)), reference.step(x, y, model(x)))
    assert weights_ref.shape == (8,)
    rw.remove_hooks()
    assert capture.removed


def test_a_single_process_engine_is_refused_under_data_parallelism_by_its_spec():
    @register_engine("toy_single", data_parallel=False)
    def toy(problem):  # pragma: no cover - never runs
        raise AssertionError

    try:
        model, _, _, _, _ = _setup()
        params = dict(model.named_parameters())
        with pytest.raises(ValueError, match="'toy_single' does not support data-parallel training"):
            select_engine("toy_single", model, params, world_size=2)
        assert select_engine("toy_single", model, params).name == "toy_single"
    finally:
        _ENGINES.unregister("toy_single")


def test_an_engine_that_takes_scalar_scales_is_refused_the_adam_mirror_by_its_spec():
    """A registered engine declares ``coordinate_scales=False`` by default: the look-ahead mirroring Adam (a scale
    per coordinate) is refused with it at construction; SGD's mirror (scalar scales) and the default run."""

    @register_engine("toy_scalar")
    def toy(problem):
        return get_engine("reverse")(problem)

    try:
        assert not get_engine_spec("toy_scalar").coordinate_scales and get_engine_spec("reverse").coordinate_scales
        model, _, meta, x, y = _setup()
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        with pytest.raises(ValueError, match="mirrors Adam with a scale per coordinate, which this engine does not"):
            MetaReweighter(model, adam, meta, engine="toy_scalar", virtual_step="optimizer")
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        MetaReweighter(model, sgd, meta, engine="toy_scalar", virtual_step="optimizer").step(x, y, model(x))
        MetaReweighter(model, adam, meta, engine="toy_scalar").step(x, y, model(x))
    finally:
        _ENGINES.unregister("toy_scalar")


def test_auto_explains_its_choice(caplog):
    model, opt, meta, x, y = _setup(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)))
    with caplog.at_level(logging.INFO, logger="reweight"):
        rw = MetaReweighter(model, opt, meta, seed=0)
    assert rw.engine_name == "forward"
    assert "'ghost' is not exact for this model: 1 (BatchNorm1d) normalises over the batch" in rw.engine_reason
    assert rw.engine_reason in caplog.text
    model, opt, meta, x, y = _setup()
    rw = MetaReweighter(model, opt, meta, seed=0)
    assert rw.engine_name == "ghost" and rw.engine_reason.startswith("auto chose 'ghost'")
    assert MetaReweighter(model, opt, meta, engine="forward").engine_reason == "engine='forward' was given"


def test_head_lookahead_prefers_the_closed_form():
    model, opt, meta, x, y = _setup()
    rw = MetaReweighter(model, opt, meta, lookahead="head", seed=0)
    assert rw.engine_name == "linear_head"
    assert rw._engine.selection.candidates[0] == "linear_head" and "forward" in rw._engine.selection.candidates
    with pytest.raises(ValueError, match="engine='linear_head' needs lookahead='head'"):
        MetaReweighter(model, opt, meta, engine="linear_head")


class _Subclass(torch.Tensor):
    pass


def test_parameters_the_lookahead_cannot_use_are_refused():
    model, opt, meta, x, y = _setup()
    model[0].weight = nn.Parameter(model[0].weight.detach().as_subclass(_Subclass))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(ValueError, match="look-ahead parameter '0.weight' is a _Subclass"):
        MetaReweighter(model, opt, meta)
    MetaReweighter(model, opt, meta, lookahead=["2.*"])  # excluded from the look-ahead: accepted


def test_sharded_parameters_are_refused():
    from torch.distributed.tensor import DTensor

    model, opt, meta, x, y = _setup()

    class FakeShard(DTensor):  # one DTensor beside plain parameters: refused before its mesh is read
        pass

    fake = torch.Tensor._make_subclass(FakeShard, model[0].weight.detach(), True)
    model[0]._parameters["weight"] = fake
    with pytest.raises(ValueError, match="'0.weight' is a DTensor .* partly sharded .* DistributedDataParallel"):
        MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.5), meta)
