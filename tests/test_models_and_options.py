"""Unmodified models of every shape (tuple inputs, tied weights, frozen parameters, soft targets, HF-style
outputs), user-defined nets, schedulers and the loss scale promised by the returned weights."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter, WeightingOutput
from reweight.lookahead import HeadCapture


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 3)

    def forward(self, x, z):
        return self.out(torch.tanh(self.a(x) + self.b(z)))


class TiedNet(nn.Module):
    """Encoder and decoder share one weight matrix."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6, bias=False)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


def net_grads(model, inputs, targets, meta, engine, **kwargs):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    rw = MetaReweighter(model, opt, [meta], net="lossnet", engine=engine, seed=0, **kwargs)
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    weights = rw.step(inputs, targets, out)
    return [p.grad.clone() for p in rw.net.parameters()], weights, model


ENTRIES = range(6)  # the entries of the net's last weight row checked against finite differences


def finite_difference_reference(model, x, y, meta, frozen=()):
    """Independent check of the net's gradient: perturb entries of the net's last weight row, redo the look-ahead
    by hand. With the net's uniform start its last bias moves every weight alike and normalising undoes it
    (a zero gradient), so the weight row, which the samples' losses reach, is what is checked."""
    xm, ym = meta
    torch.manual_seed(0)

    def meta_loss_for(entry, shift):
        m = copy.deepcopy(model)
        rw = MetaReweighter(m, torch.optim.SGD(m.parameters(), lr=0.5), [meta], net="lossnet", seed=0)
        net = rw.net
        with torch.no_grad():
            net.mlp[2].weight[0, entry] += shift
        losses = F.cross_entropy(m(x), y, reduction="none")
        raw = net(losses.detach())
        w = raw * (len(y) / raw.sum())
        params = [p for n, p in m.named_parameters() if n not in frozen]
        grads = torch.autograd.grad((w * losses).mean(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
            return F.cross_entropy(m(xm), ym)

    h = 1e-6
    return torch.stack([(meta_loss_for(j, h) - meta_loss_for(j, -h)) / (2 * h) for j in ENTRIES])


def assert_same_direction(grads, expected):
    """The net's update divides the meta-gradient by ``sum_i |c_i|`` (its direction is exact, not its scale):
    compare the checked entries' directions; the reference must not be the zero vector."""
    got = grads[-2].squeeze()[list(ENTRIES)]
    expected = expected.to(got.dtype)
    assert expected.norm() > 1e-6
    torch.testing.assert_close(got / got.norm(), expected / expected.norm(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("engine", ["forward", "reverse"])
def test_tied_weights(engine):
    torch.manual_seed(0)
    model = TiedNet().double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    meta = (torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
    grads, _, trained = net_grads(model, x, y, meta, engine)
    assert_same_direction(grads, finite_difference_reference(model, x, y, meta))
    assert trained.dec.weight is trained.enc.weight


@pytest.mark.parametrize("engine", ["forward", "reverse"])
def test_frozen_parameters_are_held_fixed(engine):
    torch.manual_seed(0)
    model = TiedNet().double()
    model.head.bias.requires_grad_(False)
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    meta = (torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
    grads, _, _ = net_grads(model, x, y, meta, engine)
    assert_same_direction(grads, finite_difference_reference(model, x, y, meta, frozen=("head.bias",)))


def test_tuple_inputs_agree_across_engines():
    torch.manual_seed(0)
    model = TwoInputNet().double()
    inputs = (torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64))
    y = torch.randint(0, 3, (10,))
    meta = ((torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)), torch.randint(0, 3, (8,)))
    forward, _, _ = net_grads(model, inputs, y, meta, "forward")
    reverse, _, _ = net_grads(model, inputs, y, meta, "reverse")
    for a, b in zip(forward, reverse):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("net", ["lossnet", "logitnet", "metainfonet"])
def test_soft_targets_and_model_output_objects(net):
    """Outputs given as a tensor, an object with ``.logits`` or a dict give the same weights, and these are
    the updated net's normalised weights of the soft-target cross-entropies."""
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    meta = [(torch.randn(6, 5), torch.randint(0, 4, (6,)))]  # meta batches keep hard labels
    x = torch.randn(7, 5)
    soft = torch.softmax(torch.randn(7, 4), dim=1)
    logits = model(x)
    weights = {}
    for kind, outputs in (("tensor", logits), ("object", SimpleNamespace(logits=logits)), ("dict", {"logits": logits})):
        rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, net=net, seed=0, veto=math.inf)
        weights[kind] = rw.step(x, soft, outputs)
    assert torch.equal(weights["object"], weights["tensor"]) and torch.equal(weights["dict"], weights["tensor"])
    losses = -(soft * F.log_softmax(logits, -1)).sum(-1).detach()
    with torch.no_grad():
        out = rw.net.eval()(losses, logits.detach(), soft)
    raw = out.weights if isinstance(out, WeightingOutput) else out
    torch.testing.assert_close(weights["tensor"], raw * (7 / raw.sum()))


def test_returned_weights_give_algorithm_1_loss():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    meta = [(torch.randn(6, 5), torch.randint(0, 3, (6,)))]
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, net="lossnet", veto=math.inf)
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    logits = model(x)
    weights = rw.step(x, y, logits)
    losses = F.cross_entropy(logits, y, reduction="none").detach()
    with torch.no_grad():
        raw = rw.net.eval()(losses)
    torch.testing.assert_close((weights * losses).mean(), (raw * losses).sum() / raw.sum())
    torch.testing.assert_close(weights.sum(), torch.tensor(9.0))
    rw_none = MetaReweighter(
        model, torch.optim.SGD(model.parameters(), lr=0.1), [(x, y)], net="lossnet", normalization="none",
        veto=math.inf,
    )
    w = rw_none.step(x, y, logits)
    with torch.no_grad():
        torch.testing.assert_close(w, rw_none.net.eval()(losses))


class ZeroAtStartNet(nn.Module):
    """A user-defined net: weights from loss and logits, plus a penalty on its own scale parameter."""

    requires_logits = True

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.proj = nn.Linear(3, 1)

    def forward(self, loss, logits, targets):
        w = torch.sigmoid(self.proj(logits).squeeze(-1) - self.scale * loss)
        return WeightingOutput(w, 0.1 * self.scale.square())


def test_user_defined_net_with_penalty():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    user_net = ZeroAtStartNet()
    rw = MetaReweighter(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        [(torch.randn(6, 5), torch.randint(0, 3, (6,)))],
        net=user_net,
    )
    assert rw.net is user_net
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    rw.step(x, y, model(x))
    assert user_net.scale.grad is not None and user_net.scale.item() != 0.5
    with pytest.raises(ValueError, match="needs class logits"):
        rw.step(x, y, model(x)[:, :1])


class LossOnlyNet(nn.Module):
    """A user's net that reads the loss alone (``requires_logits = False``)."""

    requires_logits = False

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.slope = nn.Parameter(torch.zeros(()))

    def forward(self, loss, logits=None, targets=None):
        return torch.sigmoid(-self.slope * loss)


def test_a_registered_net_that_reads_the_loss_alone_trains_a_regressor():
    """A net registered by name is asked what it reads (its ``requires_logits``), as a module passed as ``net=``
    is: a loss-only net serves a regression, which a net reading logits is refused for; asking builds it once,
    without drawing from the global RNG."""
    from reweight import list_weighting_nets, register_weighting_net
    from reweight.nets import _NETS

    register_weighting_net("test_loss_only")(LossOnlyNet)
    try:
        assert "test_loss_only" in list_weighting_nets()
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mse = lambda out, y: (out.squeeze(-1) - y) ** 2  # noqa: E731
        meta = [(torch.randn(8, 4), torch.randn(8))]
        state = torch.random.get_rng_state()
        rw = MetaReweighter(model, opt, meta, net="test_loss_only", loss_fn=mse, seed=0)
        assert not rw.options.requires_logits and rw.options.normalization == "sum"
        assert torch.equal(torch.random.get_rng_state(), state)
        x, y = torch.randn(6, 4), torch.randn(6)
        state = torch.random.get_rng_state()
        w = rw.step(x, y, model(x))
        assert w.shape == (6,) and torch.isfinite(w).all()
        assert torch.equal(torch.random.get_rng_state(), state)
        with pytest.raises(ValueError, match="needs class logits"):
            rw2 = MetaReweighter(model, opt, meta, net="metainfonet", loss_fn=mse, seed=0)
            rw2.step(x, y, model(x))
    finally:
        _NETS.unregister("test_loss_only")


def test_what_a_net_reads_is_answered_for_auto_and_every_built_in_name():
    """The integrations ask before the net is chosen: ``"auto"`` (the gated net on class labels, LossNet on other
    outputs, token logits included) needs no class logits and reads no groups; the built-in names answer from their
    classes."""
    from reweight.integrations._common import needs_class_logits, reads_groups

    assert not needs_class_logits("auto") and not reads_groups("auto")
    names = ("lossnet", "logitnet", "metainfonet", "gated", "l2rw")
    assert [needs_class_logits(n) for n in names] == [False, True, True, True, False]
    assert reads_groups("groups") and not reads_groups("gated")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_lookahead_follows_scheduler_lr():
    """The look-ahead reads each group's lr at every step: changing it changes the meta-gradient exactly
    as building the reweighter with that lr would."""
    torch.manual_seed(0)
    model = TiedNet().double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    meta = (torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
    expected, _, _ = net_grads(model, x, y, meta, "forward", lookahead_lr=0.05)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    rw = MetaReweighter(m, opt, [meta], net="lossnet", seed=0)
    scheduler.step()  # lr 0.5 -> 0.05
    rw.step(x, y, m(x))
    for a, b in zip(expected, rw.net.parameters()):
        torch.testing.assert_close(b.grad, a, rtol=1e-9, atol=1e-14)


def test_default_meta_optimizer_is_adam_as_the_paper():
    model = nn.Linear(5, 3)
    meta = [(torch.randn(6, 5), torch.randint(0, 3, (6,)))]
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, net="lossnet")
    assert isinstance(rw.meta_optimizer, torch.optim.Adam)
    group = rw.meta_optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 5e-4


def test_meta_loader_cycles_forever():
    model = nn.Linear(5, 3)
    meta = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, seed=0)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    for _ in range(7):
        rw.step(x, y, model(x))
    assert rw.state_dict()["meta_stream"]["epoch"] == 2 and rw.state_dict()["meta_stream"]["position"] == 1


def test_head_capture_checks_the_caught_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    head = HeadCapture(model)
    assert (head.name, head.weight_name, head.bias_name) == ("2", "2.weight", "2.bias")
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="right after the model's forward"):
        head.features_for(torch.zeros(5, 3))  # no forward caught yet
    logits = model(x)
    with pytest.raises(ValueError, match="final Linear layer \\('2'\\)"):
        head.features_for(logits * 2)  # outputs that are not the head's
    features = head.features_for(logits)
    torch.testing.assert_close(features, torch.tanh(model[0](x)))
    assert not features.requires_grad
    with pytest.raises(ValueError, match="right after the model's forward"):
        head.features_for(model(x[:3])[:2])  # the caught forward was of another batch
    head.remove()
    model(torch.randn(2, 4))
    assert head.features.shape[0] == 3  # the hook is gone


def _constructor_args(**kwargs):
    model = nn.Linear(5, 3)
    meta = [(torch.randn(6, 5), torch.randint(0, 3, (6,)))]
    return (model, torch.optim.SGD(model.parameters(), lr=0.1), meta), kwargs


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lookahead_lr": "0.1"}, TypeError, "lookahead_lr must be a number"),
        ({"lookahead_lr": True}, TypeError, "lookahead_lr must be a number"),
        ({"lookahead_lr": torch.tensor(0.1)}, TypeError, "lookahead_lr must be a number"),
        ({"lookahead_lr": 0.0}, ValueError, "lookahead_lr must be positive"),
        ({"lookahead_lr": float("nan")}, ValueError, "lookahead_lr must be positive"),
        ({"lookahead_lr": float("inf")}, ValueError, "lookahead_lr must be positive"),
        ({"net": "l2rw", "net_kwargs": {"hidden": 3}}, ValueError, "net='l2rw' has no weighting net"),
        ({"net": "l2rw", "net_kwargs": {}}, ValueError, "net='l2rw' has no weighting net"),
        ({"net": "logitnet", "net_kwargs": [("hidden", 3)]}, TypeError, "net_kwargs must be a dict"),
        # nets built at the first step (their class count is inferred there) check net_kwargs now
        ({"net": "logitnet", "net_kwargs": {"hiden": 3}}, TypeError, "hiden"),
        ({"net": "metainfonet", "net_kwargs": {"kl_weight": -1}}, ValueError, "kl_weight"),
    ],
)
def test_constructor_refuses_what_the_first_step_would(kwargs, error, match):
    args, kwargs = _constructor_args(**kwargs)
    with pytest.raises(error, match=match):
        MetaReweighter(*args, **kwargs)


def test_lookahead_lr_accepts_any_real_number():
    import numpy as np

    args, _ = _constructor_args()
    assert MetaReweighter(*args, lookahead_lr=np.float32(0.25)).lookahead_lr == 0.25
    assert MetaReweighter(*args, lookahead_lr=1).lookahead_lr == 1.0


@pytest.mark.parametrize("engine", ["reverse", "higher"])
def test_single_process_engines_are_refused_under_data_parallelism(monkeypatch, engine):
    """A process group of two ranks (faked: no collective runs before the check) refuses the engines that
    cannot split the look-ahead over ranks, at construction instead of at the first step."""
    import reweight.reweighter as module
    from reweight.distributed import DataParallelGroup

    class TwoRanks(DataParallelGroup):
        def __init__(self):
            super().__init__(None)
            self.world_size, self.rank = 2, 0

    monkeypatch.setattr(module, "data_parallel_group", lambda model, group=None: TwoRanks())
    args, _ = _constructor_args()
    with pytest.raises(ValueError, match=f"engine '{engine}' does not support data-parallel training"):
        MetaReweighter(*args, net="l2rw", engine=engine)
    assert MetaReweighter(*args, net="l2rw", engine="forward").engine_name == "forward"
    auto = MetaReweighter(*args, net="l2rw")  # its fallbacks stop before the single-process engines
    assert auto._engine.selection.candidates and not set(auto._engine.selection.candidates) & {"reverse", "higher"}
    monkeypatch.undo()  # one process: the reverse engine stays the last fallback
    assert MetaReweighter(*args, net="l2rw")._engine.selection.candidates[-1] == "reverse"


def test_lookahead_params_are_cached_and_follow_the_optimizer_and_requires_grad():
    from reweight.lookahead import LookaheadParams

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    params = LookaheadParams(model, {n for n, _ in model.named_parameters()}, opt)
    first = params()
    assert sorted(first) == ["1.bias", "1.weight"] and params() is first  # cached
    assert params.groups["1.weight"] is opt.param_groups[0]
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})
    assert sorted(params()) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert params.groups["0.weight"]["lr"] == 0.01
    model[1].weight.requires_grad_(False)
    assert "1.weight" not in params()
    model[1].weight.requires_grad_(True)  # unfrozen again (gradual unfreezing)
    assert "1.weight" in params()
