"""Engines agree with each other on models with SDPA attention, LSTMs, embeddings and LayerNorm;
partial look-ahead equals the reverse engine restricted to the same parameters; fallback warns once."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from reweight import MetaReweighter

from conftest import NoForwardAD, SelfAttention, assert_same, make_batch, make_cnn, snapshot

OTHERS = ["forward", "ghost", "ghost_lean", "higher", "finite_difference"]  # each checked against "reverse"
VOCAB, SEQ, K = 20, 6, 3


class TinyTransformer(nn.Module):
    """Embedding, hand-written SDPA block and nn.TransformerEncoderLayer (also SDPA), LayerNorm, head."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.attn = SelfAttention(d)
        self.norm = nn.LayerNorm(d)
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, K)

    def forward(self, tokens, mask=None):
        h = self.norm(self.embed(tokens) + self.attn(self.embed(tokens)))
        h = self.layer(h)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h.mean(1))


class TinyLSTM(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, K)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(self.norm(out[:, -1]))


def tokens(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, K, (n,), generator=g)


def net_gradient(model, inputs, targets, meta, engine, **kwargs):
    """The weighting net's gradient after one meta step, plus the returned weights."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reweighter = MetaReweighter(model, opt, [meta], net="logitnet", num_classes=K, engine=engine, seed=0, **kwargs)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    weights = reweighter.step(inputs, targets, out)
    return [p.grad.clone() for p in reweighter.net.parameters()], weights


def check_agreement(model, inputs, targets, meta, engines=OTHERS, **kwargs):
    assert "reverse" not in engines  # the reference
    reference, _ = net_gradient(model, inputs, targets, meta, "reverse", **kwargs)
    assert any(g.abs().max() > 0 for g in reference)
    for engine in engines:
        got, _ = net_gradient(model, inputs, targets, meta, engine, **kwargs)
        rtol = 1e-3 if engine == "finite_difference" else 1e-6
        for r, g in zip(reference, got):
            torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * 1e-6)


def _call(model, params, inputs):
    out = torch.func.functional_call(model, params, kwargs=inputs) if isinstance(inputs, dict) else None
    return out if out is not None else torch.func.functional_call(model, params, (inputs,))


def independent_l2rw_weights(model, inputs, targets, meta, lr):
    """L2RW's weights from torch.func alone: c = d L_meta(theta - lr * grad mean(w * L)) / dw at w = 0,
    then max(-c, 0) normalised to sum to the batch size (Algorithm 1 of L2RW)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    meta_inputs = {k: v for k, v in meta.items() if k != "labels"} if isinstance(meta, dict) else meta[0]
    meta_targets = meta["labels"] if isinstance(meta, dict) else meta[1]

    def meta_loss(w):
        def train_loss(p):
            return (w * F.cross_entropy(_call(model, p, inputs), targets, reduction="none")).mean()

        grads = torch.func.grad(train_loss)(params)
        theta_hat = {k: params[k] - lr * grads[k] for k in params}
        return F.cross_entropy(_call(model, theta_hat, meta_inputs), meta_targets)

    with sdpa_kernel([SDPBackend.MATH]):  # differentiated twice: the fused CPU kernel has no double backward
        c = torch.func.grad(meta_loss)(torch.zeros(targets.shape[0], dtype=torch.float64))
    raw = torch.clamp(-c, min=0)
    return raw * targets.shape[0] / raw.sum()


@pytest.mark.parametrize("engine", ["reverse", "forward", "ghost"])
def test_the_reference_engine_equals_an_independent_torch_func_computation(engine):
    """The reference itself, against torch.func with no code of the library (through L2RW's weights,
    which are the coefficients clamped and normalised)."""
    torch.manual_seed(0)
    model = TinyTransformer().double()  # no dropout: the same function for torch.func and the engines
    x, y = tokens(10, 1)
    meta = tokens(8, 2)
    want = independent_l2rw_weights(model, x, y, meta, lr=0.5)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    rw = MetaReweighter(m, opt, [meta], net="l2rw", engine=engine, normalization="sum", seed=0)
    got = rw.step(x, y, m(x))
    assert (want > 0).any() and (want == 0).any()  # the clamp is exercised
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_engines_agree_on_transformer_with_sdpa():
    torch.manual_seed(0)
    model = TinyTransformer().double()
    x, y = tokens(10, 1)
    check_agreement(model, x, y, tokens(8, 2))


def test_engines_agree_with_dict_inputs():
    torch.manual_seed(0)
    model = TinyTransformer().double()
    x, y = tokens(10, 1)
    mask = torch.ones(10, SEQ, dtype=torch.float64)
    mask[:, -2:] = 0
    meta_x, meta_y = tokens(8, 2)
    meta = {"tokens": meta_x, "mask": torch.ones(8, SEQ, dtype=torch.float64), "labels": meta_y}
    check_agreement(model, {"tokens": x, "mask": mask}, y, meta)


def test_engines_agree_on_lstm():
    torch.manual_seed(0)
    model = TinyLSTM().double()
    x, y = tokens(10, 1)
    check_agreement(model, x, y, tokens(8, 2), engines=["forward", "higher", "finite_difference"])
    for engine in ("ghost", "ghost_lean"):  # no rule for the LSTM: refused by name, never a silent answer
        with pytest.raises(NotImplementedError, match="lstm"):
            net_gradient(model, x, y, tokens(8, 2), engine)
    assert MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [tokens(8, 2)]).engine_name == "forward"


@pytest.mark.parametrize("virtual_step", ["sgd", "optimizer"])
def test_head_lookahead_equals_reverse_restricted_to_head(virtual_step):
    model = make_cnn(torch.float64)
    x, y = make_batch(12, seed=1)
    meta = make_batch(10, seed=2)

    def grads(engine, lookahead):
        """Net gradient of one meta step; ``lookahead`` may be a function of the (copied) model."""
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
        F.cross_entropy(m(x), y).backward()
        opt.step()  # a momentum buffer, so the mirrored step has an offset
        opt.zero_grad()
        spec = lookahead(m) if callable(lookahead) else lookahead
        rw = MetaReweighter(m, opt, [meta], engine=engine, lookahead=spec, virtual_step=virtual_step, seed=0)
        rw.step(x, y, m(x))
        return rw.engine_name, [p.grad.clone() for p in rw.net.parameters()]

    name, closed_form = grads("auto", "head")
    assert name == "linear_head"
    _, reverse_full = grads("reverse", "full")
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(closed_form, reverse_full))
    for engine, spec in [
        ("reverse", "head"),
        ("forward", "head"),
        ("higher", "head"),
        ("reverse", ["fc.*"]),
        ("forward", lambda m: m.fc),
    ]:
        _, got = grads(engine, spec)
        for a, b in zip(closed_form, got):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_head_lookahead_leaves_no_trace_and_hook_is_removable():
    model = make_cnn(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = MetaReweighter(model, opt, [make_batch(6, torch.float32, seed=2)], lookahead="head", seed=0)
    x, y = make_batch(8, torch.float32)
    logits = model(x)
    before = snapshot(model, opt)
    rw.step(x, y, logits)
    assert_same(before, snapshot(model, opt))
    assert len(model.fc._forward_hooks) == 1
    rw.remove_hooks()
    assert len(model.fc._forward_hooks) == 0


def test_head_lookahead_refuses_models_whose_output_is_not_the_head():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(model, opt, [(torch.randn(5, 4), torch.randint(0, 3, (5,)))], lookahead="head")
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="final Linear layer"):
        rw.step(x, torch.randint(0, 3, (6,)), model(x))


@pytest.mark.parametrize(
    "spec, error, match",
    [
        (["nothing.*"], ValueError, "match no parameter"),
        ("top", ValueError, "lookahead must be"),
        (nn.Linear(2, 2), ValueError, "not a submodule"),
        (3, TypeError, "lookahead must be"),
    ],
)
def test_lookahead_validation(spec, error, match):
    model = make_cnn(torch.float32)
    with pytest.raises(error, match=match):
        MetaReweighter(
            model, torch.optim.SGD(model.parameters(), lr=0.1), [make_batch(4, torch.float32)], lookahead=spec
        )


class CustomOpNet(nn.Module):
    """BatchNorm in train mode, so that auto starts at ``forward`` (not ``ghost``), and a custom op."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(NoForwardAD.apply(self.bn(self.a(x))))


def test_auto_falls_back_to_reverse_with_one_warning():
    torch.manual_seed(0)
    model = CustomOpNet().double()
    meta = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    reference, _ = net_gradient(model, x, y, meta, "reverse")
    model_a = copy.deepcopy(model)
    opt = torch.optim.SGD(model_a.parameters(), lr=0.5)
    rw = MetaReweighter(model_a, opt, [meta], net="logitnet", num_classes=K, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rw.step(x, y, model_a(x))
        got = [p.grad.clone() for p in rw.net.parameters()]
        for _ in range(3):
            rw.step(x, y, model_a(x))
    fallbacks = [w for w in caught if "falling back to 'reverse'" in str(w.message)]
    assert len(fallbacks) == 1 and rw.engine_name == "reverse"
    for r, g in zip(reference, got):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-12)
    with pytest.raises(NotImplementedError):  # an explicitly chosen engine does not fall back
        net_gradient(model, x, y, meta, "forward")


@pytest.mark.parametrize("engine", ["finite_difference", "higher"])
def test_other_engines_leave_no_trace(engine):
    torch.manual_seed(0)
    model = make_cnn(torch.float32)
    model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_batch(8, torch.float32)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    rw = MetaReweighter(model, opt, [make_batch(6, torch.float32, seed=2)], engine=engine, virtual_step="optimizer")
    logits = model(x)
    before, rng = snapshot(model, opt), torch.get_rng_state()
    rw.step(x, y, logits)
    assert_same(before, snapshot(model, opt))
    assert torch.equal(rng, torch.get_rng_state())


def test_missing_higher_extra_is_named(monkeypatch):
    """Refused by the constructor, not at the first step; the other engines do not need the package."""
    monkeypatch.setitem(__import__("sys").modules, "higher", None)  # `import higher` now raises ImportError
    model = make_cnn(torch.float32)
    args = (model, torch.optim.SGD(model.parameters(), lr=0.1), [make_batch(4, torch.float32)])
    with pytest.raises(ImportError, match=r'pip install "reweight\[higher\]"'):
        MetaReweighter(*args, engine="higher")
    MetaReweighter(*args, engine="forward")


def test_refused_head_reweighter_leaves_no_hook():
    model = make_cnn(torch.float32)
    with pytest.raises(ValueError, match="meta_loader is empty"):
        MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [], lookahead="head")
    assert len(model.fc._forward_hooks) == 0
