"""Bad input raises an error naming the problem and leaves the model (and the weighting net) untouched."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reweight import MetaReweighter, NonFiniteLossError

from conftest import assert_same, make_batch, make_cnn, snapshot


@pytest.fixture
def setup():
    model = make_cnn(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meta = [make_batch(6, torch.float32, seed=2)]
    x, y = make_batch(8, torch.float32)
    return model, opt, meta, x, y


def net_state(rw):
    return [p.detach().clone() for p in rw.net.parameters()] if rw.net is not None else []


def check_untouched(model, opt, rw, before, net_before, steps_before):
    assert_same(before, snapshot(model, opt))
    assert all(torch.equal(a, b) for a, b in zip(net_before, net_state(rw)))
    assert rw.step_count == steps_before


class EmptyIterable:
    def __iter__(self):
        return iter(())


def test_empty_meta_loader(setup):
    model, opt, _, x, y = setup
    with pytest.raises(ValueError, match="meta_loader is empty"):
        MetaReweighter(model, opt, [])
    with pytest.raises(ValueError, match="meta_loader is empty"):
        MetaReweighter(model, opt, DataLoader(TensorDataset(torch.zeros(0, 2, 8, 8), torch.zeros(0).long())))
    rw = MetaReweighter(model, opt, EmptyIterable())  # not Sized: found out at the first step
    logits = model(x)
    before, net_before = snapshot(model, opt), net_state(rw)
    with pytest.raises(ValueError, match="yielded no batches"):
        rw.step(x, y, logits)
    check_untouched(model, opt, rw, before, net_before, 0)


def test_one_shot_iterator_refused(setup):
    model, opt, meta, *_ = setup
    with pytest.raises(TypeError, match="re-iterable"):
        MetaReweighter(model, opt, iter(meta))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, y, z: (x[:7], y, z), "batch sizes disagree"),
        (lambda x, y, z: (x, y[:7], z), "batch sizes disagree"),
        (lambda x, y, z: (x, y, z[:7]), "batch sizes disagree"),
        (lambda x, y, z: (x, torch.full_like(y, 3), z), r"training batch: labels must lie in \[0, 3\)"),
        (lambda x, y, z: (x, y - 1, z), r"training batch: labels must lie in \[0, 3\)"),
        (lambda x, y, z: (x, y, F.cross_entropy(z, y)), "pass step.* per-sample outputs .*not a loss"),
        (lambda x, y, z: (x[:0], y[:0], z[:0]), "empty"),
        (lambda x, y, z: (x, y.float(), z), "class indices"),
    ],
)
@pytest.mark.parametrize("net", ["lossnet", "metainfonet"])
def test_bad_training_batch(setup, make, match, net):
    model, opt, meta, x, y = setup
    rw = MetaReweighter(model, opt, meta, net=net, num_classes=3)
    logits = model(x)
    before, net_before = snapshot(model, opt), net_state(rw)
    with pytest.raises(ValueError, match=match):
        rw.step(*make(x, y, logits))
    check_untouched(model, opt, rw, before, net_before, 0)


def test_bad_meta_batch_labels(setup):
    model, opt, _, x, y = setup
    xm, ym = make_batch(6, torch.float32, seed=2)
    rw = MetaReweighter(model, opt, [(xm, ym + 5)], net="lossnet")
    logits = model(x)
    before, net_before = snapshot(model, opt), net_state(rw)
    with pytest.raises(ValueError, match="meta batch: labels must lie"):
        rw.step(x, y, logits)
    check_untouched(model, opt, rw, before, net_before, 0)


def test_meta_batch_mapping_without_labels_lists_its_keys(setup):
    model, opt, _, x, y = setup
    xm, ym = make_batch(6, torch.float32, seed=2)
    rw = MetaReweighter(model, opt, [{"x": xm, "target": ym}])
    with pytest.raises(TypeError, match=r"needs a 'labels' key; found keys \['target', 'x'\]"):
        rw.step(x, y, model(x))


def test_bad_meta_batch_layout(setup):
    model, opt, _, x, y = setup
    rw = MetaReweighter(model, opt, [(torch.zeros(6, 2, 8, 8), torch.zeros(6).long(), torch.zeros(6))])
    with pytest.raises(TypeError, match="meta batches must be"):
        rw.step(x, y, model(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_losses_raise_by_default(setup, bad):
    model, opt, meta, x, y = setup
    rw = MetaReweighter(model, opt, meta, net="lossnet")
    logits = model(x).detach().clone()
    logits[2, 0] = bad
    before, net_before = snapshot(model, opt), net_state(rw)
    with pytest.raises(NonFiniteLossError, match="not finite"):
        rw.step(x, y, logits)
    check_untouched(model, opt, rw, before, net_before, 0)


def test_nonfinite_losses_skip_option(setup):
    model, opt, meta, x, y = setup
    rw = MetaReweighter(model, opt, meta, net="lossnet", on_nonfinite="skip")
    logits = model(x).detach().clone()
    logits[2, :] = float("nan")
    before, net_before = snapshot(model, opt), net_state(rw)
    weights = rw.step(x, y, logits)
    assert rw.last_update_skipped
    assert weights[2] == 0 and torch.isfinite(weights).all() and (weights[[0, 1, 3]] > 0).all()
    check_untouched(model, opt, rw, before, net_before, 1)


def test_nonfinite_meta_loss(setup):
    model, opt, _, x, y = setup
    xm, ym = make_batch(6, torch.float32, seed=2)
    xm[0] = float("nan")
    rw = MetaReweighter(model, opt, [(xm, ym)], net="lossnet")
    logits = model(x)
    before, net_before = snapshot(model, opt), net_state(rw)
    with pytest.raises(NonFiniteLossError):
        rw.step(x, y, logits)
    check_untouched(model, opt, rw, before, net_before, 0)
    rw.on_nonfinite = "skip"
    rw.step(x, y, logits)
    assert rw.last_update_skipped and all(torch.equal(a, b) for a, b in zip(net_before, net_state(rw)))


def test_net_needing_logits_refuses_non_logits():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def mse(out, t):
        return F.mse_loss(out.squeeze(-1), t, reduction="none")

    meta = [(torch.randn(5, 4), torch.randn(5))]
    x, t = torch.randn(6, 4), torch.randn(6)
    rw = MetaReweighter(model, opt, meta, net="logitnet", loss_fn=mse)
    with pytest.raises(ValueError, match="needs class logits"):
        rw.step(x, t, model(x))
    # LossNet works for any per-sample loss, regression included: its weights are those of the MSEs
    rw = MetaReweighter(model, opt, meta, net="lossnet", loss_fn=mse, veto=math.inf)  # the net's own weights
    out = model(x)
    weights = rw.step(x, t, out)
    with torch.no_grad():
        raw = rw.net.eval()(mse(out, t))
    torch.testing.assert_close(weights, raw * (6 / raw.sum()))


def test_wrong_loss_shape_and_outputs_type(setup):
    model, opt, meta, x, y = setup
    rw = MetaReweighter(model, opt, meta, loss_fn=lambda z, t: F.cross_entropy(z, t))
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(8,\)"):
        rw.step(x, y, model(x))
    rw = MetaReweighter(model, opt, meta)
    with pytest.raises(TypeError, match=r"returned a list of length 2.*logits_fn=lambda out: out\[0\]"):
        rw.step(x, y, [1, 2])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"net": "nonet"}, ValueError, "net must be one of .*'lossnet'"),
        ({"net": 3}, TypeError, "net must be"),
        ({"interval": 0}, ValueError, "interval must be >= 1"),
        ({"interval": 2.0}, TypeError, "interval must be an int"),
        ({"net": "l2rw", "interval": 2}, ValueError, "interval must be 1 for net='l2rw'"),
        ({"engine": "magic"}, ValueError, "engine must be one of"),
        ({"normalization": "softmax"}, ValueError, "normalization must be one of"),
        ({"virtual_step": "adam"}, ValueError, "virtual_step must be one of"),
        ({"lookahead_lr": -1.0}, ValueError, "lookahead_lr"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
        ({"net": "metainfonet", "net_kwargs": {"kl_weight": -1}, "num_classes": 3}, ValueError, "kl_weight"),
        ({"net": "lossnet", "net_kwargs": {"hidden": 0}}, ValueError, "hidden"),
    ],
)
def test_constructor_validation(setup, kwargs, error, match):
    model, opt, meta, *_ = setup
    with pytest.raises(error, match=match):
        MetaReweighter(model, opt, meta, **kwargs)


def test_constructor_type_checks(setup):
    model, opt, meta, *_ = setup
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        MetaReweighter("model", opt, meta)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        MetaReweighter(model, "sgd", meta)
    with pytest.raises(ValueError, match="optimizer holds none"):
        MetaReweighter(model, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), meta)
    with pytest.raises(ValueError, match="mirrors torch.optim.SGD, Adam and AdamW only, got RMSprop"):
        MetaReweighter(model, torch.optim.RMSprop(model.parameters()), meta, virtual_step="optimizer")


def test_adam_mirror_is_refused_where_the_engine_takes_scalar_scales_only(setup):
    """``virtual_step="optimizer"`` with Adam needs an engine that accepts a scale per coordinate: ``higher`` does
    not (refused at construction, naming the alternatives); with SGD's mirror it runs; the default is SGD's step."""
    pytest.importorskip("higher")
    model, _, meta, *_ = setup
    adam, sgd = torch.optim.AdamW(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert MetaReweighter(model, adam, meta).virtual_step == "sgd"
    assert MetaReweighter(model, adam, meta, virtual_step="optimizer").virtual_step == "optimizer"
    assert MetaReweighter(model, sgd, meta, engine="higher", virtual_step="optimizer").virtual_step == "optimizer"
    with pytest.raises(ValueError, match="scale per coordinate, which this engine does not accept.*virtual_step='sgd'"):
        MetaReweighter(model, adam, meta, engine="higher", virtual_step="optimizer")


class ScoresModel(nn.Module):
    """A model whose outputs are a dict without a 'logits' key."""

    def __init__(self):
        super().__init__()
        self.cnn = make_cnn(torch.float64)

    def forward(self, x):
        return {"scores": self.cnn(x), "aux": x.mean()}


def test_outputs_without_logits_name_their_keys_and_the_way_out():
    model = ScoresModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_batch(8)
    rw = MetaReweighter(model, opt, [make_batch(6, seed=2)], seed=0)
    with pytest.raises(TypeError, match=r"dict with keys \['aux', 'scores'\].*logits_fn=lambda out: out\['scores'\]"):
        rw.step(x, y, model(x))


@pytest.mark.parametrize("lookahead", ["full", "head"])
def test_logits_fn_serves_step_and_the_lookahead(lookahead):
    """With logits_fn, a dict-returning model gets the weights of the same model returning the tensor."""
    x, y = make_batch(8)
    meta = [make_batch(6, seed=2)]
    wrapped = ScoresModel()
    plain = wrapped.cnn
    # a random start and no meta warm-up: the first step's weights depend on the losses and on a full-size
    # update through the look-ahead (the default uniform start would give every sample weight 1)
    kwargs = {
        "lookahead": lookahead,
        "seed": 0,
        "meta_warmup": 0,
        "net": "lossnet",
        "net_kwargs": {"uniform_start": False},
    }
    got = MetaReweighter(
        wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), meta, logits_fn=lambda out: out["scores"], **kwargs
    ).step(x, y, wrapped(x))
    want = MetaReweighter(plain, torch.optim.SGD(plain.parameters(), lr=0.1), meta, **kwargs).step(x, y, plain(x))
    assert not torch.allclose(want, torch.ones_like(want))
    torch.testing.assert_close(got, want)


def test_logits_fn_failing_on_step_outputs_says_to_pass_the_model_outputs(setup):
    model, opt, meta, x, y = setup
    rw = MetaReweighter(model, opt, meta, logits_fn=lambda out: out.scores)
    with pytest.raises(TypeError, match="pass step\\(\\) what the model returned, unchanged"):
        rw.step(x, y, model(x))


def test_token_level_outputs_with_a_logits_net_name_the_nets_that_work():
    emb = nn.Embedding(10, 5)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    tokens = torch.randint(0, 10, (4, 7))

    def seq_loss(logits, t):
        return F.cross_entropy(logits.transpose(1, 2), t, reduction="none").mean(1)

    rw = MetaReweighter(emb, opt, [(tokens, tokens)], net="metainfonet", loss_fn=seq_loss)
    with pytest.raises(ValueError, match="token-level outputs .* net='lossnet' or net='l2rw'"):
        rw.step(tokens, tokens, emb(tokens))


def test_labels_checked_once_per_tensor_until_changed_in_place():
    from reweight.losses import cross_entropy

    logits, y = torch.zeros(3, 4), torch.tensor([0, 1, 3])
    cross_entropy(logits, y)
    cross_entropy(logits, y)  # remembered: no second range check
    y[0] = 7  # an in-place change bumps the version: checked again
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        cross_entropy(logits, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        cross_entropy(logits, y)  # a failed check is not remembered
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        cross_entropy(torch.zeros(3, 3), torch.tensor([0, 1, 3]))

