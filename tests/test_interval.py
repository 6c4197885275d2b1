import math

import pytest
import torch
import torch.nn.functional as F

from reweight import MetaReweighter

from conftest import make_batch, make_cnn


@pytest.mark.parametrize("interval", [1, 3])
def test_net_changes_exactly_on_every_kth_call(interval):
    model = make_cnn(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reweighter = MetaReweighter(  # no veto: the returned weights are the net's
        model, opt, [make_batch(6, torch.float32, seed=2)], net="lossnet", interval=interval, veto=math.inf
    )
    x, y = make_batch(8, torch.float32)
    changed = []
    for _ in range(10):
        before = [p.detach().clone() for p in reweighter.net.parameters()]
        logits = model(x)
        weights = reweighter.step(x, y, logits)
        with torch.no_grad():  # every call returns the current net's weights, updated or not
            raw = reweighter.net.eval()(F.cross_entropy(logits, y, reduction="none"))
        torch.testing.assert_close(weights, raw * (8 / raw.sum()))
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, reweighter.net.parameters())))
    assert changed == [i % interval == 0 for i in range(10)]
    assert reweighter.step_count == 10
