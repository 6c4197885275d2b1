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
    assert set(state) == {"version", "step", "num_classes", "engine", "net", "meta_optimizer", "rng", "meta_stream"}
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
