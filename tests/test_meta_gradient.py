"""The weighting net's gradient from one meta step against an independent reference.

The reference copies the model, writes its forward by hand with explicit tensors, takes a manual SGD
look-ahead with ``create_graph=True`` and differentiates the meta loss with plain autograd.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from reweight import MetaInfoNet, MetaReweighter
from reweight.virtual_step import apply_virtual_step, plan_virtual_step

from conftest import make_batch, make_cnn

ENGINES = ["forward", "reverse", "higher"]  # exact engines: 1e-6 against the reference

LR_CONV, LR_REST = 0.3, 0.1


def manual_forward(p: dict, model, x):
    """SmallCNN's forward with the parameters in ``p``; BatchNorm in train mode on cloned statistics."""
    h = F.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1)
    h = F.batch_norm(
        h, model.bn.running_mean.clone(), model.bn.running_var.clone(), p["bn.weight"], p["bn.bias"], training=True
    )
    h = F.avg_pool2d(torch.relu(h), 2)
    return F.linear(h.flatten(1), p["fc.weight"], p["fc.bias"])


class FixedNoiseMetaInfoNet(MetaInfoNet):
    def __init__(self, noise, **kwargs):
        super().__init__(**kwargs)
        self.noise = noise

    def sample_noise(self, mu):
        return self.noise.to(mu.dtype)


def make_net(kind: str, n: int):
    """A net with every layer's gradient non-zero at the first step (random start: with the default uniform
    start the last layer's zeros would make the first layer's gradient zero)."""
    torch.manual_seed(5)
    if kind == "metainfonet":
        return FixedNoiseMetaInfoNet(torch.randn(n, 16), num_classes=3, kl_weight=0.1, uniform_start=False)
    if kind == "gated":  # the two nets and a gate away from 1/2, so that every part has its own gradient
        from reweight import GatedNet

        net = GatedNet(3, uniform_start=False)
        net.info_net = FixedNoiseMetaInfoNet(torch.randn(n, 16), num_classes=3, kl_weight=0.1, uniform_start=False)
        with torch.no_grad():
            net.gate.fill_(0.07)
        return net
    if kind == "logitnet":
        from reweight import LogitNet

        return LogitNet(3, uniform_start=False)
    from reweight import LossNet

    return LossNet(uniform_start=False)


def normalized(raw, y, normalization):
    """The reweighter's normalisations written out: over the batch (``"sum"``) or within each class (``"class"``)."""
    if normalization == "sum":
        return raw * (len(y) / raw.sum())
    w = torch.zeros_like(raw)
    for c in y.unique():
        members = y == c
        total = raw[members].sum()
        w = w + torch.where(members, raw * (members.sum() / total) if total != 0 else raw * 0, 0)
    return w


def reference_net_grad(model, net, x, y, xm, ym, lrs, normalization="class"):
    model = copy.deepcopy(model)
    net = copy.deepcopy(net).train()
    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    logits = manual_forward(theta, model, x)
    losses = F.cross_entropy(logits, y, reduction="none")
    out = net(losses.detach(), logits.detach(), y)
    raw, penalty = (out.weights, out.penalty) if isinstance(out, tuple) else (out, None)
    w = normalized(raw, y, normalization)
    grads = torch.autograd.grad((w * losses).mean(), list(theta.values()), create_graph=True)
    theta_hat = {k: t - lrs[k] * g for (k, t), g in zip(theta.items(), grads)}
    meta_loss = F.cross_entropy(manual_forward(theta_hat, model, xm), ym)
    return scaled_net_grad(meta_loss, w, net, penalty)


def scaled_net_grad(meta_loss, w, net, penalty=None):
    """The net's update direction: the gradient of the meta loss plus the penalty, divided by the meta-gradient's
    scale ``sum_i |dL_meta/dw_i|``."""
    (c,) = torch.autograd.grad(meta_loss, w, retain_graph=True)
    total = meta_loss if penalty is None else meta_loss + penalty
    grads = torch.autograd.grad(total, list(net.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g / c.abs().sum() for g, p in zip(grads, net.parameters())]


def two_group_sgd(model):
    conv = [model.conv.weight, model.conv.bias]
    rest = [p for n, p in model.named_parameters() if not n.startswith("conv")]
    return torch.optim.SGD([{"params": conv, "lr": LR_CONV}, {"params": rest, "lr": LR_REST}], lr=0.05)


@pytest.mark.parametrize("normalization", ["sum", "class"])
@pytest.mark.parametrize("engine", [*ENGINES, "finite_difference"])
@pytest.mark.parametrize("kind", ["lossnet", "logitnet", "metainfonet", "gated"])
def test_net_gradient_matches_reference(kind, engine, normalization):
    model = make_cnn(torch.float64)
    x, y = make_batch(12, seed=1)
    xm, ym = make_batch(10, seed=2)
    net = make_net(kind, 12).double()
    lrs = {k: LR_CONV if k.startswith("conv") else LR_REST for k, _ in model.named_parameters()}
    expected = reference_net_grad(model, net, x, y, xm, ym, lrs, normalization)

    opt = two_group_sgd(model)
    reweighter = MetaReweighter(model, opt, [(xm, ym)], net=net, engine=engine, normalization=normalization, seed=0)
    # plain SGD as the meta optimizer so the applied update reveals the gradient exactly
    before = [p.detach().clone() for p in net.parameters()]
    reweighter.step(x, y, model(x))
    got = [p.grad for p in net.parameters()]
    rtol = 1e-3 if engine == "finite_difference" else 1e-6
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=rtol, atol=1e-12 if rtol == 1e-6 else 1e-9)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


@pytest.mark.parametrize("normalization", ["sum", "class"])
@pytest.mark.parametrize("engine", ENGINES)
def test_l2rw_weights_match_reference(engine, normalization):
    model = make_cnn(torch.float64)
    x, y = make_batch(12, seed=1)
    xm, ym = make_batch(10, seed=2)
    lrs = {k: LR_CONV if k.startswith("conv") else LR_REST for k, _ in model.named_parameters()}
    ref = copy.deepcopy(model)
    theta = {k: v.detach().clone().requires_grad_() for k, v in ref.named_parameters()}
    eps = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    losses = F.cross_entropy(manual_forward(theta, ref, x), y, reduction="none")
    grads = torch.autograd.grad((eps * losses).sum(), list(theta.values()), create_graph=True)
    theta_hat = {k: t - lrs[k] * g for (k, t), g in zip(theta.items(), grads)}
    (g_eps,) = torch.autograd.grad(F.cross_entropy(manual_forward(theta_hat, ref, xm), ym), eps)
    expected = normalized(torch.clamp(-g_eps, min=0), y, normalization)

    reweighter = MetaReweighter(
        model, two_group_sgd(model), [(xm, ym)], net="l2rw", engine=engine, normalization=normalization, min_ess=0,
        seed=0,
    )  # the floor's blend is checked in test_auto_net_and_ess_floor.py
    got = reweighter.step(x, y, model(x))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    assert (got == 0).any() and (got > 0).any()  # the clamp is active on this batch


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_optimizer_mirror_equals_real_sgd_step(nesterov, dampening):
    """theta_hat under virtual_step='optimizer' is exactly what torch.optim.SGD would do with that gradient."""
    model = make_cnn(torch.float64)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov, dampening=dampening
    )
    x, y = make_batch(8)
    for _ in range(2):  # once without and once with a momentum buffer
        params = dict(model.named_parameters())
        grads = {k: torch.randn_like(p) for k, p in params.items()}
        plan = plan_virtual_step(params, opt, mode="optimizer")
        predicted = apply_virtual_step({k: p.detach() for k, p in params.items()}, grads, plan)
        shadow = copy.deepcopy(model)
        shadow_opt = torch.optim.SGD(
            shadow.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov, dampening=dampening
        )
        shadow_opt.load_state_dict(opt.state_dict())
        for k, p in shadow.named_parameters():
            p.grad = grads[k].clone()
        shadow_opt.step()
        for k, p in shadow.named_parameters():
            torch.testing.assert_close(predicted[k], p.detach(), rtol=1e-12, atol=1e-14)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def hand_lookahead_net_grad(model, theta_hat_of):
    """A LossNet's expected update direction (:func:`scaled_net_grad`) on a fixed batch and meta batch, with the
    look-ahead written by hand: ``theta_hat_of(theta, weighted_grad, param) -> theta_hat`` per parameter,
    differentiated by autograd. Returns the batch, the meta batch, the net and the expected gradients."""
    x, y = make_batch(12, seed=1)
    xm, ym = make_batch(10, seed=2)
    net = make_net("lossnet", 12).double()
    ref_model, ref_net = copy.deepcopy(model), copy.deepcopy(net)
    theta = {k: v.detach().clone().requires_grad_() for k, v in ref_model.named_parameters()}
    losses = F.cross_entropy(manual_forward(theta, ref_model, x), y, reduction="none")
    raw = ref_net(losses.detach())
    w = raw * (12 / raw.sum())
    grads = torch.autograd.grad((w * losses).mean(), list(theta.values()), create_graph=True)
    theta_hat = {k: theta_hat_of(t, g, p) for (k, t), g, p in zip(theta.items(), grads, model.parameters())}
    expected = scaled_net_grad(F.cross_entropy(manual_forward(theta_hat, ref_model, xm), ym), w, ref_net)
    return (x, y), (xm, ym), net, expected


@pytest.mark.parametrize(
    "kind,decay,amsgrad", [("Adam", 0.0, False), ("Adam", 1e-2, True), ("AdamW", 1e-2, False), ("AdamW", 0.0, True)]
)
def test_optimizer_mirror_equals_real_adam_step(kind, decay, amsgrad):
    """theta_hat under virtual_step='optimizer' is torch.optim.Adam / AdamW's step when the gradient is what the
    second moment holds (a constant gradient: the bias-corrected second moment is its square at every step); the
    first step, with no second moment yet, is a plain SGD step."""
    model = make_cnn(torch.float64)
    opt = getattr(torch.optim, kind)(model.parameters(), lr=1e-2, betas=(0.8, 0.9), weight_decay=decay, amsgrad=amsgrad)
    params = dict(model.named_parameters())
    assert plan_virtual_step(params, opt, mode="optimizer").scale == {k: 1e-2 for k in params}
    target = {k: torch.randn_like(p) for k, p in params.items()}  # the gradient after Adam's coupled decay
    coupled = kind == "Adam"

    def grads():  # the gradient that makes Adam's (decay included) equal to ``target``
        return {k: target[k] - decay * p.detach() if coupled else target[k].clone() for k, p in params.items()}

    for _ in range(3):
        plan = plan_virtual_step(params, opt, mode="optimizer")
        g = grads()
        predicted = apply_virtual_step({k: p.detach() for k, p in params.items()}, g, plan)
        for k, p in params.items():
            p.grad = g[k]
        opt.step()
        if opt.state[params["fc.weight"]]["step"] > 1:  # the first step had no second moment to mirror
            for k, p in params.items():
                assert isinstance(plan.scale[k], torch.Tensor) and plan.scale[k].shape == p.shape
                torch.testing.assert_close(predicted[k], p.detach(), rtol=1e-12, atol=1e-14)


def test_adam_mirror_reads_a_device_step_count_on_the_device():
    """Under ``capturable`` / ``fused`` Adam keeps its step count on the device: the mirror computes with it there
    (no host read, which on the ``meta`` device would raise) and returns tensors on that device."""
    from reweight.virtual_step import _adam_terms

    meta = {"device": "meta"}
    state = {"exp_avg": torch.ones(3, **meta), "exp_avg_sq": torch.ones(3, **meta), "step": torch.tensor(4.0, **meta)}
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False}
    scale, offset = _adam_terms(torch.ones(3, **meta), group, state, 1e-3, decoupled=True)
    assert isinstance(scale, torch.Tensor) and scale.device.type == "meta" and scale.shape == (3,)
    assert offset is not None and offset.device.type == "meta"


@pytest.mark.parametrize("engine", ["forward", "reverse", "finite_difference"])
def test_adam_mirror_gradient_matches_reference(engine):
    """virtual_step='optimizer' with AdamW mirrors its step (each coordinate over the root of its second moment,
    the carried first moment, the decoupled decay) in every engine that declares per-coordinate scales."""
    model = make_cnn(torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9), weight_decay=1e-2)
    for seed in (3, 4):
        x0, y0 = make_batch(8, seed=seed)
        opt.zero_grad()
        F.cross_entropy(model(x0), y0).backward()
        opt.step()
    opt.zero_grad()

    def adamw(t, g, p):
        state = opt.state[p]
        m = 0.8 * state["exp_avg"] + 0.2 * g
        denom = (state["exp_avg_sq"] / (1 - 0.9**2)).sqrt() + 1e-8
        return t - 1e-2 * 1e-2 * t - 1e-2 / (1 - 0.8**3) * m / denom

    (x, y), (xm, ym), net, expected = hand_lookahead_net_grad(model, adamw)

    reweighter = MetaReweighter(
        model, opt, [(xm, ym)], net=net, engine=engine, virtual_step="optimizer", normalization="sum", seed=0
    )
    reweighter.step(x, y, model(x))
    tolerance = dict(rtol=1e-3, atol=1e-8) if engine == "finite_difference" else dict(rtol=1e-6, atol=1e-12)
    for e, p in zip(expected, net.parameters()):
        torch.testing.assert_close(p.grad, e, **tolerance)


def test_adam_mirror_ghost_engines_match_reverse():
    """The ghost engines fold the per-coordinate scale into their tangent: L2RW's weights (the clamped
    coefficients) under AdamW's mirrored step equal the reverse engine's on an MLP (no batch norm)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    meta = [(torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,)))]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    weights = {}
    for engine in ("reverse", "ghost", "ghost_lean", "forward"):
        options = {"virtual_step": "optimizer", "normalization": "sum", "min_ess": 0.0, "seed": 0}
        rw = MetaReweighter(model, opt, meta, net="l2rw", engine=engine, **options)
        weights[engine] = rw.step(x, y, model(x))
    assert (weights["reverse"] > 0).any() and (weights["reverse"] == 0).any()
    sgd = MetaReweighter(model, opt, meta, net="l2rw", normalization="sum", min_ess=0.0, seed=0)
    assert not torch.allclose(sgd.step(x, y, model(x)), weights["reverse"])  # the mirror changes the weights
    for engine in ("ghost", "ghost_lean", "forward"):
        torch.testing.assert_close(weights[engine], weights["reverse"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_momentum_mirror_gradient_matches_reference(engine):
    """With virtual_step='optimizer' the look-ahead follows SGD's momentum buffer and weight decay."""
    model = make_cnn(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    x0, y0 = make_batch(8, seed=3)
    F.cross_entropy(model(x0), y0).backward()
    opt.step()
    opt.zero_grad()

    def nesterov(t, g, p):
        buf = opt.state[p]["momentum_buffer"]
        G = g + 1e-2 * t
        return t - 0.1 * (G + 0.9 * (0.9 * buf + G))

    (x, y), (xm, ym), net, expected = hand_lookahead_net_grad(model, nesterov)

    reweighter = MetaReweighter(
        model, opt, [(xm, ym)], net=net, engine=engine, virtual_step="optimizer", normalization="sum", seed=0
    )
    reweighter.step(x, y, model(x))
    for e, p in zip(expected, net.parameters()):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-12)


def test_lookahead_lr_overrides_group_lr():
    model = make_cnn(torch.float64)
    x, y = make_batch(12, seed=1)
    xm, ym = make_batch(10, seed=2)
    net = make_net("lossnet", 12).double()
    lrs = {k: 0.5 for k, _ in model.named_parameters()}
    expected = reference_net_grad(model, net, x, y, xm, ym, lrs, normalization="sum")  # LossNet's default
    reweighter = MetaReweighter(model, two_group_sgd(model), [(xm, ym)], net=net, lookahead_lr=0.5, seed=0)
    reweighter.step(x, y, model(x))
    for e, p in zip(expected, net.parameters()):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-12)
