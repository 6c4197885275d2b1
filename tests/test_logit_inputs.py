"""What the logit nets read: raw logits, or log-probabilities with ``log_probs=True``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reweight.nets import LogitNet, MetaInfoNet

K = 5


def _net(cls, log_probs: bool):
    torch.manual_seed(0)
    net = cls(K, uniform_start=False, log_probs=log_probs).double().eval()
    return net


def _weights(net, logits, targets):
    out = net(F.cross_entropy(logits, targets, reduction="none"), logits, targets)
    return out.weights if hasattr(out, "weights") else out


@pytest.mark.parametrize("cls", [LogitNet, MetaInfoNet])
def test_log_probs_make_the_weights_invariant_to_a_shift_of_the_logits(cls):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, K, generator=g, dtype=torch.float64)
    targets = torch.randint(0, K, (16,), generator=g)
    shift = 3.0 * torch.randn(16, 1, generator=g, dtype=torch.float64)  # one constant per sample
    net = _net(cls, log_probs=True)
    torch.testing.assert_close(_weights(net, logits + shift, targets), _weights(net, logits, targets))
    raw = _net(cls, log_probs=False)  # the raw logits are read as they are: a shift changes the weights
    assert not torch.allclose(_weights(raw, logits + shift, targets), _weights(raw, logits, targets))


@pytest.mark.parametrize("cls", [LogitNet, MetaInfoNet])
def test_log_probs_input_is_log_softmax(cls):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, K, generator=g, dtype=torch.float64)
    targets = torch.randint(0, K, (8,), generator=g)
    with_lp, raw = _net(cls, log_probs=True), _net(cls, log_probs=False)
    torch.testing.assert_close(_weights(with_lp, logits, targets), _weights(raw, F.log_softmax(logits, -1), targets))
