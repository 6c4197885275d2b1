"""On a small problem with 40% uniform label noise, the learned weights favour clean samples."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter


def noisy_blobs(n: int, seed: int, noise: float = 0.4, k: int = 4, d: int = 10):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=torch.Generator().manual_seed(0)) * 1.5
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    flip = torch.rand(n, generator=g) < noise
    noisy = torch.where(flip, torch.randint(0, k, (n,), generator=g), y)
    return x, noisy, noisy != y


@pytest.mark.slow
@pytest.mark.parametrize("net", ["lossnet", "metainfonet"])
def test_clean_samples_get_higher_weights(net):
    torch.manual_seed(0)
    x, y, corrupted = noisy_blobs(2000, seed=1)
    xm, ym, _ = noisy_blobs(100, seed=2, noise=0.0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reweighter = MetaReweighter(model, opt, [(xm, ym)], net=net, seed=0)
    clean_w, noisy_w = [], []
    g = torch.Generator().manual_seed(3)
    for step in range(300):
        idx = torch.randint(0, len(y), (100,), generator=g)
        logits = model(x[idx])
        w = reweighter.step(x[idx], y[idx], logits)
        loss = (w * F.cross_entropy(logits, y[idx], reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 200:
            clean_w.append(w[~corrupted[idx]])
            noisy_w.append(w[corrupted[idx]])
    clean, noisy = torch.cat(clean_w).mean(), torch.cat(noisy_w).mean()
    assert clean > noisy, (clean, noisy)
