"""Mixed precision: the meta step runs under ``torch.autocast`` while the weighting net stays in float32."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter


def _train(net: str, engine: str, amp_dtype: torch.dtype | None, scaler=None, steps: int = 1):
    """``steps`` training steps of a small MLP; the forward, the reweighter and the loss under autocast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    meta = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))]
    rw = MetaReweighter(model, opt, meta, net=net, engine=engine, seed=0, num_classes=3)
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(x)
            weights = rw.step(x, y, logits)
            loss = (weights * F.cross_entropy(logits, y, reduction="none")).mean()
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return rw, model, logits, weights


def _net_grad(rw: MetaReweighter) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in rw.net.parameters()])


@pytest.mark.parametrize("engine", ["ghost", "forward", "reverse"])
@pytest.mark.parametrize("net", ["lossnet", "metainfonet"])
def test_bf16_autocast_keeps_net_and_its_update_in_float32(net, engine):
    rw, _, logits, weights = _train(net, engine, torch.bfloat16)
    assert logits.dtype == torch.bfloat16  # autocast was active for the model
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    for p in rw.net.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    for state in rw.meta_optimizer.state.values():
        assert all(t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
    # the bf16 meta loss and meta-gradient are the float32 ones up to bf16 rounding
    reference, *_ = _train(net, engine, None)
    torch.testing.assert_close(rw.last_meta_loss, reference.last_meta_loss, rtol=1e-2, atol=0)
    assert F.cosine_similarity(_net_grad(rw), _net_grad(reference), dim=0) > 0.99


@pytest.mark.parametrize("engine", ["ghost", "forward", "reverse"])
def test_l2rw_weights_are_float32_under_autocast(engine):
    _, _, _, weights = _train("l2rw", engine, torch.bfloat16)
    _, _, _, reference = _train("l2rw", engine, None)
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(32.0))  # "sum" normalisation: the batch size
    torch.testing.assert_close(weights > 0, reference > 0)  # the same samples are kept as in float32
    assert F.cosine_similarity(weights, reference, dim=0) > 0.999


def test_grad_scaler_scales_the_users_loss_only():
    """The returned weights are detached: a GradScaler changes the user's backward, not the meta step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler may warn about the device
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plain, plain_model, *_ = _train("lossnet", "forward", torch.float16, steps=3)
    scaled, scaled_model, *_ = _train("lossnet", "forward", torch.float16, scaler=scaler, steps=3)
    assert scaler.is_enabled()
    assert scaler.get_scale() == 2.0**12  # no step was skipped for an overflow (and none grew the scale)
    for p, q in zip(plain.net.parameters(), scaled.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_ghost_per_sample_gradients_under_bf16_autocast():
    """A GroupNorm CNN whose first convolution and norms hold per-sample gradients (bf16 outputs, float32
    parameters): under autocast, ghost's net gradient is float32 and agrees with its float32 one."""

    def net_grad(amp: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
        g = torch.Generator().manual_seed(1)
        meta = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))]
        # "sum": the engine's per-sample gradients are what this checks; within classes the per-class means of
        # the net's first update cancel, and bf16's rounding of what is left is large against it
        rw = MetaReweighter(
            model, torch.optim.SGD(model.parameters(), lr=0.5), meta, net="logitnet", num_classes=3, normalization="sum"
        )
        assert rw.engine_name == "ghost"
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            rw.step(x, y, logits)
        assert (logits.dtype == torch.bfloat16) == amp
        return _net_grad(rw)

    amp, full = net_grad(True), net_grad(False)
    assert amp.dtype == torch.float32 and torch.isfinite(amp).all()
    assert F.cosine_similarity(amp, full, dim=0) > 0.99
