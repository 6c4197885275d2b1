"""A meta step leaves no trace on the user's objects: parameters, buffers, grads, optimizer state, RNG."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter

from conftest import assert_same, make_batch, make_cnn, snapshot


class DropoutCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_cnn(torch.float32)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.body(x))


@pytest.mark.parametrize("engine", ["forward", "reverse"])
@pytest.mark.parametrize("net", ["lossnet", "logitnet", "metainfonet", "l2rw"])
@pytest.mark.parametrize("virtual_step", ["sgd", "optimizer"])
def test_step_leaves_model_optimizer_and_rng_untouched(engine, net, virtual_step):
    torch.manual_seed(0)
    model = DropoutCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x0, y0 = make_batch(8, dtype=torch.float32, seed=3)
    F.cross_entropy(model(x0), y0).backward()
    opt.step()  # momentum buffers exist, and .grad holds stale values
    meta = [make_batch(6, dtype=torch.float32, seed=4)]
    reweighter = MetaReweighter(model, opt, meta, net=net, engine=engine, virtual_step=virtual_step, seed=0)
    x, y = make_batch(8, dtype=torch.float32, seed=5)
    logits = model(x)
    before = snapshot(model, opt)
    rng = torch.get_rng_state()
    for _ in range(3):
        weights = reweighter.step(x, y, logits)
    assert_same(before, snapshot(model, opt))
    assert torch.equal(rng, torch.get_rng_state())
    assert weights.shape == (8,) and not weights.requires_grad
    # the caller's graph is still usable for the real update
    (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()


@pytest.mark.parametrize("engine", ["forward", "reverse", "ghost"])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_adam_mirror_leaves_model_and_optimizer_state_untouched(engine, kind):
    """The look-ahead that mirrors Adam / AdamW reads their moments and step counts and writes none of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = getattr(torch.optim, kind)(model.parameters(), lr=1e-3, weight_decay=1e-2, amsgrad=kind == "Adam")
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    meta = [(torch.randn(6, 6), torch.randint(0, 3, (6,)))]
    reweighter = MetaReweighter(model, opt, meta, engine=engine, virtual_step="optimizer", seed=0)
    logits = model(x)
    before = snapshot(model, opt)
    for _ in range(3):
        reweighter.step(x, y, logits)
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("net", ["auto", "lossnet", "logitnet", "metainfonet", "gated", "l2rw"])
def test_construction_draws_from_the_global_rng_only_without_a_seed(net):
    """The README's promise: with ``seed=`` a reweighted run sees the batch order of plain training of the same
    ``torch.manual_seed``; without it the reweighter's own seed is one draw from the global RNG."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    torch.manual_seed(0)
    plain_order = torch.randperm(50)
    torch.manual_seed(0)
    MetaReweighter(model, opt, meta, net=net, seed=7)
    assert torch.equal(torch.randperm(50), plain_order)
    torch.manual_seed(0)
    MetaReweighter(model, opt, meta, net=net)
    assert not torch.equal(torch.randperm(50), plain_order)
