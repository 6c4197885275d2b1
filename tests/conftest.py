import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-pool-Linear: BatchNorm in train mode makes per-sample losses depend on the batch."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.avg_pool2d(h, 2)
        return self.fc(h.flatten(1))


def make_cnn(dtype=torch.float64, seed: int = 0, num_classes: int = 3) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes).to(dtype)


def make_batch(n: int, dtype=torch.float64, seed: int = 1, num_classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=dtype), torch.randint(0, num_classes, (n,), generator=g)


class NoForwardAD(torch.autograd.Function):
    """ReLU without a jvp rule: forward-mode AD cannot go through it (reverse-mode and ghost can)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bit-exact copies of parameters, buffers, grads and optimizer state."""
    snap = {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
    }
    if optimizer is not None:
        state = optimizer.state_dict()
        snap["opt"] = {
            "state": {
                k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()} for k, s in state["state"].items()
            },
            "groups": [dict(g) for g in state["param_groups"]],
        }
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for section in a:
        if section == "opt":
            assert a["opt"]["groups"] == b["opt"]["groups"]
            assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
            for k in a["opt"]["state"]:
                for n, t in a["opt"]["state"][k].items():
                    u = b["opt"]["state"][k][n]
                    assert torch.equal(t, u) if torch.is_tensor(t) else t == u, (k, n)
            continue
        assert a[section].keys() == b[section].keys(), section
        for k, v in a[section].items():
            w = b[section][k]
            if v is None or w is None:
                assert v is None and w is None, (section, k)
            else:
                assert torch.equal(v, w), (section, k)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite's models are tiny: one intra-op thread is fastest and avoids OpenMP oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cnn64():
    return make_cnn(torch.float64)


class SelfAttention(nn.Module):
    """A hand-written two-head SDPA block (packed projection), with attention dropout in train mode."""

    def __init__(self, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(h.transpose(1, 2).reshape(x.shape))


def tiny_classifier(seed: int = 0, num_classes: int = 3):
    """A 4-8-``num_classes`` tanh MLP seeded by ``seed`` and three meta batches of 6 samples drawn from ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, num_classes))
    g = torch.Generator().manual_seed(seed)
    meta = [(torch.randn(6, 4, generator=g), torch.randint(0, num_classes, (6,), generator=g)) for _ in range(3)]
    return model, meta
