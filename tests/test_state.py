"""Exact resume: 2N straight steps equal N steps, save, load into fresh objects, N more steps."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from reweight import MetaReweighter

N = 7


def build(seed: int, net: str):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(11)
    meta = TensorDataset(torch.randn(20, 6, generator=g), torch.randint(0, 4, (20,), generator=g))
    loader = DataLoader(meta, batch_size=8, shuffle=True)  # 3 batches a pass, the last one short
    kwargs = {"net_kwargs": {"sample_at_weight_time": True}} if net == "metainfonet" else {}
    reweighter = MetaReweighter(model, opt, loader, net=net, seed=123, **kwargs)
    return model, opt, reweighter


def train(model, opt, reweighter, batches):
    out = []
    for x, y in batches:
        logits = model(x)
        w = reweighter.step(x, y, logits)
        loss = (w * F.cross_entropy(logits, y, reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(w)
    return out


@pytest.mark.parametrize("net", ["lossnet", "metainfonet", "l2rw"])
def test_resume_is_exact(net):
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(2 * N)]

    torch.manual_seed(99)
    model, opt, rw = build(0, net)
    straight = train(model, opt, rw, batches)
    final_straight = copy.deepcopy(model.state_dict())

    torch.manual_seed(99)
    model, opt, rw = build(0, net)
    first = train(model, opt, rw, batches[:N])
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rw": rw.state_dict(), "rng": torch.get_rng_state()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model, opt, rw = build(1, net)  # fresh objects, different initialisation
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    rw.load_state_dict(saved["rw"])
    torch.set_rng_state(saved["rng"])
    second = train(model, opt, rw, batches[N:])

    for a, b in zip(straight, first + second):
        assert torch.equal(a, b)
    for k, v in final_straight.items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert rw.step_count == 2 * N


def test_state_dict_round_trip_and_validation():
    model, opt, rw = build(0, "metainfonet")
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    rw.step(x, y, model(x))
    state = rw.state_dict()
    keys = {"version", "step", "num_classes", "engine", "net", "meta_optimizer", "rng", "meta_stream", "loss_history",
            "noise_evidence", "meta_competence"}
    assert set(state) == keys
    _, _, fresh = build(0, "metainfonet")
    assert fresh.net is None  # built lazily, from the saved num_classes
    fresh.load_state_dict(state)
    for k, v in rw.net.state_dict().items():
        assert torch.equal(v, fresh.net.state_dict()[k])
    _, _, other = build(0, "lossnet")
    before = copy.deepcopy(other.net.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(state)
    for k, v in before.items():  # nothing was changed by the failed load
        assert torch.equal(v, other.net.state_dict()[k])
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict({"version": 1})
    with pytest.raises(ValueError, match="newer"):
        other.load_state_dict({**other.state_dict(), "version": 99})


class FlakyLoader:
    """Yields the given batches; the first attempt to produce batch ``fail_at`` raises."""

    def __init__(self, batches, fail_at):
        self.batches, self.fail_at, self.failed = batches, fail_at, False

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.fail_at and not self.failed:
                self.failed = True
                raise OSError("transient read error")
            yield batch


def test_failed_step_rolls_back_rng_and_meta_stream():
    g = torch.Generator().manual_seed(5)
    meta = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    batches = [(torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(5)]

    def run(loader):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, net="metainfonet", seed=7)
        weights = []
        for x, y in batches:
            logits = model(x)
            try:
                weights.append(rw.step(x, y, logits))
            except OSError:
                weights.append(rw.step(x, y, logits))  # the retry must behave as if nothing had happened
        return weights, rw

    clean, rw_clean = run(meta)
    flaky, rw_flaky = run(FlakyLoader(meta, fail_at=1))
    assert rw_flaky._meta_stream._loader.failed
    for a, b in zip(clean, flaky):
        assert torch.equal(a, b)
    for a, b in zip(rw_clean.net.parameters(), rw_flaky.net.parameters()):
        assert torch.equal(a, b)


def same_state(a, b) -> bool:
    """Exact equality of two reweighter states (tensors bit for bit, nested containers recursively)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def trained(net: str, steps: int = 2):
    model, opt, rw = build(0, net)
    g = torch.Generator().manual_seed(4)
    train(model, opt, rw, [(torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g))] * steps)
    return rw


def _with(state, key, value):
    return {**state, key: value}


def _without_key(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


def _bad_states(good, other_net):
    """(label, bad state, message) for each field of a valid ``good`` state (a trained metainfonet's)."""
    opt_state = good["meta_optimizer"]
    one_group = [{**opt_state["param_groups"][0], "params": [0]}]
    return [
        ("not a dict", [good], "must be a dict"),
        ("missing key", _without_key(good, "rng"), "missing keys"),
        ("version type", _with(good, "version", "1"), "int 'version'"),
        ("version newer", _with(good, "version", 99), "newer"),
        ("version without upgrade", _with(good, "version", 0), "too old"),
        ("step negative", _with(good, "step", -1), "step must be"),
        ("step float", _with(good, "step", 2.0), "step must be"),
        ("num_classes other", _with(good, "num_classes", 5), "classes"),
        ("num_classes zero", _with(good, "num_classes", 0), "num_classes must be"),
        ("engine unknown", _with(good, "engine", "nope"), "unknown engine"),
        ("engine not a name", _with(good, "engine", None), "unknown engine"),
        ("engine needs head", _with(good, "engine", "linear_head"), "needs lookahead='head'"),
        ("net of another kind", _with(good, "net", other_net), "does not match"),
        ("net entry not a tensor", _with(good, "net", {**good["net"], "mlp.0.bias": [0.0] * 100}), "does not match"),
        ("net missing entry", _with(good, "net", dict(list(good["net"].items())[1:])), "does not match"),
        ("net not a dict", _with(good, "net", None), "dict of tensors"),
        ("meta_optimizer empty", _with(good, "meta_optimizer", {}), "optimizer state_dict"),
        ("meta_optimizer no groups", _with(good, "meta_optimizer", _without_key(opt_state, "param_groups")), "dict"),
        ("meta_optimizer group sizes", _with(good, "meta_optimizer", {**opt_state, "param_groups": one_group}), "hold"),
        ("rng dtype", _with(good, "rng", good["rng"].float()), "rng must be"),
        ("rng shape", _with(good, "rng", good["rng"][:-1]), "rng must be"),
        ("rng not a tensor", _with(good, "rng", good["rng"].tolist()), "rng must be"),
        ("meta_stream keys", _with(good, "meta_stream", _without_key(good["meta_stream"], "position")), "keys"),
        ("meta_stream position", _with(good, "meta_stream", {**good["meta_stream"], "position": -1}), "position"),
        ("meta_stream seed", _with(good, "meta_stream", {**good["meta_stream"], "epoch_seed": "x"}), "epoch_seed"),
        (
            "meta_stream unseeded",
            _with(good, "meta_stream", {**good["meta_stream"], "epoch_seed": None}),
            "epoch_seed",
        ),
    ]


def test_a_refused_state_changes_nothing():
    """Each bad field is refused with a message naming it, and the reweighter (built net or not yet built)
    is exactly as before: its state_dict, its net object and its step count."""
    good = trained("metainfonet").state_dict()
    other_net = trained("logitnet").state_dict()["net"]  # same keys but one, other shapes
    assert good["net"].keys() != other_net.keys() or any(good["net"][k].shape != v.shape for k, v in other_net.items())
    for target in (trained("metainfonet", steps=1), build(0, "metainfonet")[2]):
        net_before = target.net
        before = copy.deepcopy(target.state_dict())
        for label, bad, message in _bad_states(good, other_net):
            error = TypeError if label == "not a dict" else ValueError
            with pytest.raises(error, match=message):
                target.load_state_dict(bad)
            assert target.net is net_before, label  # an unbuilt net stays unbuilt
            assert same_state(target.state_dict(), before), label
        target.load_state_dict(good)  # and the good state still loads
        assert same_state(target.state_dict(), good)


def test_unbuilt_net_is_checked_without_building_it():
    """A named net built at the first step is checked against a template: a state of another class count
    is refused, the net stays unbuilt and the global RNG is not drawn from."""
    good = trained("metainfonet").state_dict()
    _, _, fresh = build(0, "metainfonet")
    assert fresh.net is None and fresh.num_classes is None
    shapes = {k: v[:3] if v.ndim else v for k, v in good["net"].items()}  # a 3-class net's leading dims
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="does not match"):
        fresh.load_state_dict({**good, "net": shapes})
    assert fresh.net is None and fresh.num_classes is None and fresh.meta_optimizer is None
    assert torch.equal(torch.get_rng_state(), rng)


def test_l2rw_state_has_no_net():
    rw = trained("l2rw")
    assert rw.is_l2rw and rw.net is None and rw.meta_optimizer is None
    state = rw.state_dict()
    assert state["net"] == {} and state["meta_optimizer"] == {}
    _, _, fresh = build(1, "l2rw")
    fresh.load_state_dict(state)
    assert same_state(fresh.state_dict(), state)
    _, _, lossnet = build(1, "lossnet")
    assert not lossnet.is_l2rw and lossnet.net is not None
    with pytest.raises(ValueError, match="does not match"):
        lossnet.load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        fresh.load_state_dict(trained("lossnet").state_dict())


def test_older_state_versions_are_upgraded_step_by_step(monkeypatch):
    """The upgrade path: a version-0 state (here a made-up format that called 'step' 'steps' and had no
    'num_classes') is brought forward by the registered function and then loads as the current one."""
    from reweight import _state

    good = trained("metainfonet").state_dict()
    old = {**_without_key(_without_key(good, "step"), "num_classes"), "steps": good["step"], "version": 0}
    calls = []

    def from_0(state):
        calls.append(state["version"])
        new = {**_without_key(state, "steps"), "step": state["steps"], "num_classes": None}
        return new

    monkeypatch.setitem(_state.UPGRADES, 0, from_0)
    _, _, fresh = build(0, "metainfonet")
    with pytest.raises(ValueError, match="does not match"):  # an upgraded state is checked like any other
        fresh.load_state_dict(old)  # num_classes None: nothing to build, yet the state carries a net
    fresh.load_state_dict({**old, "net": {}, "meta_optimizer": {}})
    assert calls == [0, 0] and fresh.step_count == good["step"] and fresh.net is None
    assert old["version"] == 0 and "steps" in old  # the caller's dict is not modified
    upgraded = _state.upgrade_state(old)
    assert upgraded["version"] == _state.STATE_VERSION and upgraded["step"] == good["step"]


class CountingNet(torch.nn.Module):
    """A user-defined net whose state_dict holds a non-tensor entry (its extra state)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.calls = 0

    def forward(self, loss, logits=None, targets=None):
        self.calls += 1
        return torch.sigmoid(self.lin(loss.unsqueeze(-1))).squeeze(-1)

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = state["calls"]


def test_user_net_with_extra_state_round_trips():
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        meta = [(torch.randn(8, 6), torch.randint(0, 4, (8,)))]
        return model, MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, net=CountingNet())

    model, rw = make()
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    for _ in range(3):
        rw.step(x, y, model(x))
    _, fresh = make()
    fresh.load_state_dict(rw.state_dict())
    assert fresh.net.calls == rw.net.calls > 0 and same_state(fresh.state_dict(), rw.state_dict())
    with pytest.raises(ValueError, match="does not match"):  # the extra state entry is part of the layout
        fresh.load_state_dict({**rw.state_dict(), "net": _without_key(rw.state_dict()["net"], "_extra_state")})
