"""Each sample's loss history (``loss_history=True``, ``step(..., sample_ids=ids)``): the moving average against a
reference kept by hand, the net reading it, exact resume, and every misuse refused before anything changes."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter
from reweight.loss_history import HISTORY_DECAY, LossHistory, LossHistoryWarning
from reweight.nets import GatedNet, LossNet, MetaInfoNet

from conftest import tiny_classifier

# most runs here use LossNet on class labels, the smallest net that reads the history (its warning is tested below)
pytestmark = pytest.mark.filterwarnings("ignore::reweight.loss_history.LossHistoryWarning")

CLASSES = 3
N = 20  # dataset size: the batches draw ids from 0 .. N-1


def _parts(seed: int = 0):
    return tiny_classifier(seed, CLASSES)


DATA_G = torch.Generator().manual_seed(7)
X, Y = torch.randn(N, 4, generator=DATA_G), torch.randint(0, CLASSES, (N,), generator=DATA_G)


def _ids(t: int) -> torch.Tensor:
    return torch.randperm(N, generator=torch.Generator().manual_seed(100 + t))[:8]


def _train(rw: MetaReweighter, model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[torch.Tensor]:
    out = []
    for t in steps:
        ids = _ids(t)
        x, y = X[ids], Y[ids]
        logits = model(x)
        weights = rw.step(x, y, logits, sample_ids=ids)
        opt.zero_grad()
        (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
        out.append(weights)
    return out


def _reweighter(model, meta, **kwargs) -> tuple[MetaReweighter, torch.optim.Optimizer]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs.setdefault("net", "lossnet")
    return MetaReweighter(model, opt, meta, loss_history=True, seed=0, **kwargs), opt


# ---------------------------------------------------------------------------------------------- the store


def test_history_is_the_moving_average_of_past_visits_and_unseen_samples_read_their_loss():
    h = LossHistory(decay=0.5)
    ids = torch.tensor([3, 0])
    first = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(h.lookup(ids, first), first)  # never seen: the current loss
    h.record(ids, first, torch.tensor([True, True]))
    assert len(h) == 4  # grown to the largest id
    torch.testing.assert_close(h.lookup(ids, torch.tensor([9.0, 9.0])), first)  # the past, not the current loss
    h.record(ids, torch.tensor([0.0, 8.0]), torch.tensor([True, False]))  # sample 0's loss was not finite
    torch.testing.assert_close(h.lookup(ids, torch.zeros(2)), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(h.lookup(torch.tensor([1]), torch.tensor([5.0])), torch.tensor([5.0]))  # unseen


def test_reweighter_keeps_the_history_of_every_sample_it_was_given():
    model, meta = _parts()
    rw, opt = _reweighter(model, meta)
    reference: dict[int, float] = {}
    for t in range(6):
        ids = _ids(t)
        x, y = X[ids], Y[ids]
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none").detach()
        weights = rw.step(x, y, logits, sample_ids=ids)
        for i, loss in zip(ids.tolist(), losses.tolist()):
            reference[i] = HISTORY_DECAY * reference[i] + (1 - HISTORY_DECAY) * loss if i in reference else loss
        opt.zero_grad()
        (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    store = rw._slot.history
    assert store is not None
    for i, value in reference.items():
        assert store.seen[i] and abs(float(store.average[i]) - value) < 1e-6
    assert int(store.seen.sum()) == len(reference)


def test_the_net_reads_the_history_the_weights_come_from():
    model, meta = _parts()
    rw, opt = _reweighter(model, meta, normalization="none", min_ess=0.0, veto=math.inf)  # the net's own weights
    _train(rw, model, opt, range(5))
    ids = _ids(5)
    x, y = X[ids], Y[ids]
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none").detach()
    assert rw._slot.history is not None
    past = rw._slot.history.lookup(ids, losses).clone()
    net_before = copy.deepcopy(rw.net)
    weights = rw.step(x, y, logits, sample_ids=ids)
    with torch.no_grad():
        expected = rw.net.eval()(losses, history=past)  # the updated net, at the history before this visit
        assert not torch.allclose(rw.net(losses, history=losses), expected)  # the history changes the weights
    torch.testing.assert_close(weights, expected)
    assert any(not torch.equal(a, b) for a, b in zip(net_before.parameters(), rw.net.parameters()))


def test_lossnet_and_gated_net_take_the_history_as_a_second_input():
    assert LossNet().mlp[0].in_features == 1 and not LossNet().requires_history
    net = LossNet(history=True)
    assert net.mlp[0].in_features == 2 and net.requires_history
    with pytest.raises(ValueError, match="history"):
        net(torch.rand(4))
    gated = GatedNet(CLASSES, history=True)
    assert gated.requires_history and gated.loss_net.mlp[0].in_features == 2
    with pytest.raises(TypeError, match="history must be a bool"):
        LossNet(history=1)


@pytest.mark.parametrize("net", ["auto", "gated", "lossnet"])
def test_named_nets_that_read_the_loss_are_built_to_read_the_history(net):
    model, meta = _parts()
    rw, opt = _reweighter(model, meta, net=net)
    _train(rw, model, opt, range(3))
    loss_net = rw.net.loss_net if isinstance(rw.net, GatedNet) else rw.net
    assert isinstance(loss_net, LossNet) and loss_net.requires_history


# ---------------------------------------------------------------------------------------------- resume


def test_resume_with_the_history_is_exact():
    model, meta = _parts()
    rw, opt = _reweighter(model, meta)
    straight = _train(rw, model, opt, range(8))

    model2, meta2 = _parts()
    rw2, opt2 = _reweighter(model2, meta2)
    first = _train(rw2, model2, opt2, range(4))
    buffer = io.BytesIO()
    torch.save({"rw": rw2.state_dict(), "model": model2.state_dict(), "opt": opt2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model3, _ = _parts(seed=5)  # another start, replaced by the saved one; the same meta set
    model3.load_state_dict(saved["model"])
    rw3, opt3 = _reweighter(model3, meta)
    opt3.load_state_dict(saved["opt"])
    rw3.load_state_dict(saved["rw"])
    second = _train(rw3, model3, opt3, range(4, 8))
    for a, b in zip(straight, first + second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rw._slot.history is not None and rw3._slot.history is not None
    assert torch.equal(rw._slot.history.average, rw3._slot.history.average)


def test_a_state_with_or_without_history_is_refused_by_the_other_kind():
    model, meta = _parts()
    rw, opt = _reweighter(model, meta)
    _train(rw, model, opt, range(2))
    other, _ = _parts()
    plain = MetaReweighter(other, torch.optim.SGD(other.parameters(), lr=0.1), meta, net="lossnet")
    with pytest.raises(ValueError, match="holds a loss history"):
        plain.load_state_dict(rw.state_dict())
    with pytest.raises(ValueError, match="holds no loss history"):
        rw.load_state_dict(plain.state_dict())
    broken = {**rw.state_dict(), "loss_history": {"decay": 0.9, "average": torch.zeros(3), "seen": torch.zeros(2)}}
    before = rw.state_dict()
    with pytest.raises(ValueError, match="loss_history"):
        rw.load_state_dict(broken)
    assert torch.equal(rw.state_dict()["loss_history"]["average"], before["loss_history"]["average"])


def test_a_version_1_state_loads_without_a_history():
    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(model, opt, meta, net="lossnet", seed=0)
    state = rw.state_dict()
    old = {k: v for k, v in state.items() if k != "loss_history"} | {"version": 1}
    rw.load_state_dict(old)
    assert rw.state_dict()["loss_history"] is None


# ---------------------------------------------------------------------------------------------- misuse


def test_missing_or_unwanted_sample_ids_are_refused_and_nothing_changes():
    model, meta = _parts()
    rw, opt = _reweighter(model, meta)
    x, y = X[:8], Y[:8]
    with pytest.raises(ValueError, match="sample_ids"):
        rw.step(x, y, model(x))
    assert rw.step_count == 0 and rw._slot.history is not None and len(rw._slot.history) == 0
    for bad, match in [
        (torch.arange(7), r"\(8,\) integer tensor"),
        (torch.arange(8.0), "integer tensor"),
        (torch.arange(8) - 1, ">= 0"),
        (torch.arange(8) + 2**31 - 4, "below 2147483648"),
        ([0, 1, 2, 3, 4, 5, 6, 7], "integer tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            rw.step(x, y, model(x), sample_ids=bad)
    bad_labels = torch.full((8,), CLASSES)
    with pytest.raises(ValueError):
        rw.step(x, bad_labels, model(x), sample_ids=torch.arange(8))
    assert rw.step_count == 0 and len(rw._slot.history) == 0  # a step that raised recorded nothing
    plain = MetaReweighter(model, opt, meta, net="lossnet", seed=0)
    with pytest.raises(ValueError, match="loss_history is off"):
        plain.step(x, y, model(x), sample_ids=torch.arange(8))


class _Reads(nn.Module):
    requires_history = True

    def __init__(self) -> None:
        super().__init__()
        self.inner = LossNet(history=True)

    def forward(self, loss, logits=None, targets=None, history=None):
        return self.inner(loss, history=history)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"net": "metainfonet", "loss_history": True}, ValueError, "does not read the loss history"),
        ({"net": "logitnet", "loss_history": True}, ValueError, "does not read the loss history"),
        ({"net": "l2rw", "loss_history": True}, ValueError, "does not read the loss history"),
        ({"net": MetaInfoNet(CLASSES), "loss_history": True}, ValueError, "does not read the loss history"),
        ({"net": _Reads()}, ValueError, "pass loss_history=True"),
        ({"net": "lossnet", "net_kwargs": {"history": True}}, ValueError, "pass loss_history=True"),
        ({"net": "lossnet", "loss_history": "yes"}, TypeError, "loss_history must be a bool"),
    ],
)
def test_configurations_without_a_reader_or_without_the_option_are_refused_at_construction(kwargs, error, match):
    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        MetaReweighter(model, opt, meta, **kwargs)


def test_a_module_that_reads_the_history_is_given_it():
    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(model, opt, meta, net=_Reads(), loss_history=True, seed=0)
    assert len(_train(rw, model, opt, range(3))) == 3


def test_a_non_finite_loss_leaves_that_sample_s_history_unchanged():
    model, meta = _parts()
    rw, opt = _reweighter(model, meta, on_nonfinite="skip")
    _train(rw, model, opt, range(3))
    ids = _ids(3)
    x, y = X[ids], Y[ids]
    logits = model(x).detach().clone()
    logits[0] = float("nan")
    store = rw._slot.history
    assert store is not None
    before = store.average.clone(), store.seen.clone()
    rw.step(x, y, logits, sample_ids=ids)
    first = int(ids[0])
    assert store.average[first] == before[0][first] and store.seen[first] == before[1][first]
    others = ids[1:]
    assert store.seen[others].all()


def test_with_index_gives_a_loop_its_sample_ids():
    from torch.utils.data import DataLoader, TensorDataset

    from reweight.data import WithIndex

    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(model, opt, meta, loss_history=True, seed=0)
    loader = DataLoader(WithIndex(TensorDataset(X, Y)), batch_size=8, shuffle=True)
    for _ in range(2):
        for ids, (x, y) in loader:
            assert torch.equal(x, X[ids]) and torch.equal(y, Y[ids])
            logits = model(x)
            weights = rw.step(x, y, logits, sample_ids=ids)
            opt.zero_grad()
            (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
            opt.step()
    assert rw._slot.history is not None and bool(rw._slot.history.seen.all()) and len(rw._slot.history) == N
    with pytest.raises(TypeError, match="map-style"):
        WithIndex(iter(range(3)))


def test_lossnet_alone_on_class_labels_is_warned_and_the_nets_measured_safe_are_not():
    import warnings

    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(LossHistoryWarning, match="net='auto' or 'gated'"):
        MetaReweighter(model, opt, meta, net="lossnet", loss_history=True)
    mse = lambda out, t: (out[:, 0] - t.float()).pow(2)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossHistoryWarning)
        MetaReweighter(model, opt, meta, loss_history=True)  # auto: the gated net
        MetaReweighter(model, opt, meta, net="gated", loss_history=True)
        MetaReweighter(model, opt, meta, net="lossnet", loss_history=True, loss_fn=mse)  # not class labels


def test_lossnet_with_the_history_under_an_own_loss_is_warned_at_the_first_batch_of_class_labels():
    """Under a loss of the user's the labels, not the loss function, say whether LossNet alone reads the history of
    class labels: warned at the first step with them, once; not for regression targets."""
    import warnings

    model, meta = _parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    own = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    x, y = torch.randn(8, model[0].in_features), torch.randint(0, model[-1].out_features, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossHistoryWarning)
        rw = MetaReweighter(model, opt, meta, net="lossnet", loss_history=True, loss_fn=own)  # not yet known
    with pytest.warns(LossHistoryWarning, match="net='auto' or 'gated'") as caught:
        rw.step(x, y, model(x), sample_ids=torch.arange(8))
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's step
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossHistoryWarning)
        rw.step(x, y, model(x), sample_ids=torch.arange(8))  # once
        mse = lambda out, t: (out[:, 0] - t).pow(2)  # noqa: E731
        regression = MetaReweighter(model, opt, [(m[0], m[1].float()) for m in meta], net="lossnet",
                                    loss_history=True, loss_fn=mse)  # fmt: skip
        regression.step(x, y.float(), model(x), sample_ids=torch.arange(8))
