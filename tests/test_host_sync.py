"""A step synchronises the host with the device at most once (``on_nonfinite="raise"``, any engine).

Counted on the CPU with a ``TorchFunctionMode`` that records every call which would wait for a GPU:
``bool``/``int``/``float`` of a tensor, ``.item()``, ``.tolist()``, ``.numpy()``, ``torch.equal`` and
``torch.allclose``. Two kinds of call are host-side by construction and not counted: the reweighter's
seed draws (its generator lives on the CPU) and ``torch.optim``'s step counters (CPU scalars unless an
optimizer is ``capturable``).
"""

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from reweight import MetaReweighter, NonFiniteLossError

from conftest import make_batch

_SYNCS = {
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.equal,
    torch.allclose,
    torch.is_nonzero,
}
_HOST_SIDE = ("torch/optim/", "_draw_seed")


class CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCS:
            stack = traceback.extract_stack()[:-1]
            if not any(h in f.filename or h == f.name for f in stack for h in _HOST_SIDE):
                self.sites.append(" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in stack[-1:-5:-1]))
        return func(*args, **(kwargs or {}))


def model_for(engine: str) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(128, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)]
    if engine == "forward":
        layers.insert(2, nn.BatchNorm1d(16))  # what auto gives to forward
    return nn.Sequential(*layers).double()


def syncs_per_step(steps: int = 3, **kwargs) -> list[list[str]]:
    engine = kwargs.get("engine", "auto")
    model = model_for(engine)
    x, y = make_batch(12)
    meta = make_batch(10, seed=2)
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [meta], seed=0, **kwargs)
    out = []
    for _ in range(steps):
        logits = model(x)
        with CountSyncs() as counter:
            rw.step(x, y, logits)
        out.append(counter.sites)
        F.cross_entropy(logits, y).backward()
    return out


@pytest.mark.parametrize("engine", ["auto", "ghost_lean", "forward", "reverse", "finite_difference", "higher"])
@pytest.mark.parametrize("net", ["lossnet", "metainfonet", "l2rw"])
def test_at_most_one_sync_per_step(engine, net):
    if engine == "higher":
        pytest.importorskip("higher")
    for i, sites in enumerate(syncs_per_step(engine=engine, net=net, collapse_threshold=None)):
        once = [s for s in sites if s.startswith("class_checks.py")]
        # normalization="class" (the default here for MetaInfoNet and L2RW) checks the first batch's class counts, once
        assert len(once) == (1 if net in ("metainfonet", "l2rw") and i == 0 else 0), sites
        assert len(sites) - len(once) <= 1, sites


def test_the_loss_history_reads_its_cpu_ids_on_the_host_and_adds_no_other_sync():
    """``loss_history=True`` with the ids on the CPU (as a loader yields them): the only added reads are of the ids
    themselves (their sign and largest value), host-side by construction; the history's lookups and updates
    happen where the losses are."""
    model = model_for("auto")
    x, y = make_batch(12)
    ids = torch.arange(12)
    rw = MetaReweighter(
        model, torch.optim.SGD(model.parameters(), lr=0.1), [make_batch(10, seed=2)], net="lossnet",
        loss_history=True, collapse_threshold=None, seed=0,
    )  # fmt: skip
    for _ in range(3):
        logits = model(x)
        with CountSyncs() as counter:
            rw.step(x, y, logits, sample_ids=ids)
        history = [s for s in counter.sites if s.startswith("loss_history.py")]
        # their least and largest at the check, then the largest at the lookup and at the record
        assert ids.device.type == "cpu" and len(history) <= 4, counter.sites
        assert len(counter.sites) - len(history) <= 1, counter.sites
        F.cross_entropy(logits, y).backward()


def test_class_checks_sync_twice_in_a_run():
    """The class normalisation's two once-only checks: the first batch's class counts, and the class shares
    of training against meta batches once each side has 50 samples per class (150 here: the training batch is
    counted as each step begins, the meta batch of 10 when the step's meta update draws it, so the meta side
    reaches 150 in the 15th step and the comparison is made as the 16th begins)."""
    per_step = syncs_per_step(steps=18, net="metainfonet", collapse_threshold=None)
    checks = [i for i, sites in enumerate(per_step) for s in sites if s.startswith("class_checks.py")]
    assert checks == [0, 15], per_step
    assert all(len(sites) <= 2 for sites in per_step), per_step


def test_one_sync_per_step_with_head_lookahead_interval_and_collapse_monitor():
    per_step = syncs_per_step(steps=4, lookahead="head", interval=2)
    # steps 1 and 3 do not update the net: one sync (the training losses' finite check)
    assert [len(s) for s in per_step[1:]] == [1, 1, 1], per_step
    # step 0 also makes the once-only checks that the outputs are the head's and of the batch's class counts
    # (the default net normalises within classes), and the collapse check (every 50)
    assert len(per_step[0]) == 4, per_step[0]
    assert sum(s.startswith("class_checks.py") for s in per_step[0]) == 1, per_step[0]
    assert any(s.startswith("lookahead.py") for s in per_step[0]) and any("monitor.py" in s for s in per_step[0])


def test_checks_still_raise_and_leave_the_reweighter_as_it_was():
    model = model_for("auto")
    x, y = make_batch(12)
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [make_batch(10, seed=2)], net="logitnet")
    logits = model(x).detach().clone()
    logits[3, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="a per-sample training loss"):
        rw.step(x, y, logits)
    assert rw.net is None and rw.step_count == 0  # the lazily built net is undone too
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[1, 7\]"):
        rw.step(x, torch.where(y == 0, torch.tensor(7), y), model(x))
    rw.step(x, y, model(x))
    assert rw.net is not None and rw.step_count == 1


@pytest.mark.parametrize("net", ["lossnet", "gated"])
def test_the_wait_for_competence_adds_no_sync(net):
    """The model's competence on the meta set is read and latched on the device (veto_competence)."""
    for sites in syncs_per_step(net=net, veto_competence=0.3, collapse_threshold=None)[1:]:
        assert len(sites) <= 1, sites
