"""The ``ghost`` engine equals ``reverse`` (float64, 1e-6) on models whose samples do not interact, and
``auto`` picks it exactly for those models."""

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from reweight import MetaReweighter
from reweight._rng import isolated_rng
from reweight.engines import MetaProblem, get_engine
from reweight.engines import ghost as ghost_module
from reweight.losses import cross_entropy
from reweight.virtual_step import VirtualStep

from conftest import NoForwardAD, SelfAttention, assert_same, make_batch, make_cnn, snapshot

K, VOCAB, SEQ = 4, 16, 6


class Transformer(nn.Module):
    """Embedding with padding_idx, a learned position table (a bare Parameter), a hand-written SDPA block,
    a pre-norm nn.TransformerEncoderLayer with dropout, LayerNorm and a head."""

    def __init__(self, d: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(SEQ, d))
        self.attn = SelfAttention(d, dropout=0.2)
        self.norm = nn.LayerNorm(d)
        self.layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(d, K)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos
        h = self.norm(h + self.attn(h))
        return self.head(self.layer(h).mean(1))


class TinyViT(nn.Module):
    """timm-style: patch convolution, class token and position embedding as bare Parameters."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(2, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, 5, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, K)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        return self.head(self.norm(self.block(x))[:, 0])


def group_norm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, K),
    )


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, dilation=2, bias=False),
        nn.Flatten(),
        nn.LayerNorm(24),
        nn.Linear(24, K),
    )


class Tied(nn.Module):
    """Input embedding and output projection share one Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mid(self.embed(tokens)))).mean(1)[:, :K]


def tokens(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    x[0, -2:] = 0  # padding
    return x, torch.randint(0, K, (n,), generator=g)


def images(n: int, seed: int, shape=(2, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, K, (n,), generator=g)


class Shifts(nn.Module):
    """Bare Parameters added and subtracted in each operand position (the record keeps only the data's
    shape for these), and one multiplied (it keeps the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 8 * 8, 8)
        self.shift = nn.Parameter(0.1 * torch.randn(8))
        self.offset = nn.Parameter(0.1 * torch.randn(8))
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(8))
        self.head = nn.Linear(8, K)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        h = torch.tanh(self.shift - h) + self.offset
        h = torch.sub(h, self.shift, alpha=0.5) * self.gain
        return self.head(1.0 + h - self.offset)


def wide_cnn() -> nn.Module:
    """Every convolution's weight is smaller than one sample's output: all of them hold per-sample
    gradients (grouped, strided, dilated, with and without bias), the last one with an existing group."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=(2, 1), dilation=(2, 1), groups=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 6, 1, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, K),
    )


CASES = {
    "transformer": (lambda: Transformer(), tokens),
    "vit": (lambda: TinyViT(), images),
    "groupnorm_cnn": (group_norm_cnn, images),
    "conv1d": (conv1d_net, lambda n, seed: images(n, seed, (2, 8))),
    "tied": (lambda: Tied(), tokens),
    "wide_cnn": (wide_cnn, lambda n, seed: images(n, seed, (2, 12, 12))),
    "shifts": (lambda: Shifts(), images),
}


def make_case(name: str):
    build, data = CASES[name]
    torch.manual_seed(0)
    return build().double(), data(10, 1), data(8, 2)


def weights_with_zero_and_tiny(n: int = 10) -> torch.Tensor:
    w = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    w[0], w[1] = 0.0, 1e-14
    return w


def coefficients(model, train, meta, weights, engine, names=None):
    """One engine on one MetaProblem, under the same RNG seed (so dropout draws the same masks)."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad and (names is None or k in names)}
    problem = MetaProblem(
        model=model,
        params=params,
        step=VirtualStep({k: 0.3 for k in params}, {}),
        inputs=train[0],
        targets=train[1],
        weights=weights,
        meta_inputs=meta[0],
        meta_targets=meta[1],
        loss_fn=cross_entropy,
        meta_loss_fn=cross_entropy,
    )
    with isolated_rng(0, torch.device("cpu")), sdpa_kernel([SDPBackend.MATH]):
        return get_engine(engine)(problem)


@pytest.mark.parametrize("engine", ["ghost", "ghost_lean"])
@pytest.mark.parametrize("case", list(CASES))
def test_ghost_equals_reverse(case, engine):
    model, train, meta = make_case(case)
    w = weights_with_zero_and_tiny()
    expected = coefficients(model, train, meta, w, "reverse")
    got = coefficients(model, train, meta, w, engine)
    assert expected.coefficients.abs().max() > 1e-4
    torch.testing.assert_close(got.coefficients, expected.coefficients, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got.meta_loss, expected.meta_loss, rtol=1e-12, atol=0)


def per_sample_reference(model, x, y) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the unweighted losses by ``torch.func.vmap`` over ``grad`` (independent)."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)


def held_gradients(case: str, monkeypatch=None, capture_all: bool = False):
    """``layer_output_gradients`` on one eval-mode forward of ``case`` (every ``G`` returned by autograd
    with ``capture_all``, instead of the per-sample gradients formed by pre-hooks during the backward)."""
    model, (x, y), _ = make_case(case)
    model.eval()
    params = dict(model.named_parameters())
    capture = ghost_module.LayerCapture(params, [x], x.shape[0])
    with capture:
        logits = model(x)
    if capture_all:
        monkeypatch.setattr(
            ghost_module.engine, "_returned_records", lambda root, edges, small: list(range(len(edges)))
        )
    problem = SimpleNamespace(train_logits=logits, loss_fn=cross_entropy, targets=y)
    return model, (x, y), params, capture, ghost_module.layer_output_gradients(problem, capture, retain=False)


@pytest.mark.parametrize("case, held", [("wide_cnn", 7), ("groupnorm_cnn", 6), ("conv1d", 4), ("transformer", 6)])
def test_layers_hold_their_per_sample_gradients_where_smaller(case, held, monkeypatch):
    """A layer keeps its per-sample parameter gradients instead of ``G`` for norms of data and for
    convolutions whose weight is smaller than one sample's output; each equals vmap's, and those formed
    by pre-hooks during the backward equal those formed from ``G`` returned by autograd."""
    model, (x, y), params, capture, got = held_gradients(case)
    reference = per_sample_reference(model, x, y)
    names = {id(p): k for k, p in params.items()}
    pairs = [pair for g in got if isinstance(g, ghost_module.SampleGradients) for pair in g.pairs]
    assert len(pairs) == held
    for param, per_sample in pairs:
        torch.testing.assert_close(per_sample, reference[names[id(param)]], rtol=1e-9, atol=1e-12)
    kept = [rec.func for rec, g in zip(capture.records, got) if isinstance(g, torch.Tensor)]
    assert F.layer_norm not in kept and F.group_norm not in kept
    if case == "groupnorm_cnn":  # its second convolution's weight (288) exceeds a sample's output (200)
        assert kept.count(F.conv2d) == 1
    *_, from_autograd = held_gradients(case, monkeypatch, capture_all=True)
    for a, b in zip(got, from_autograd):
        assert type(a) is type(b)
        for u, v in zip(*(g.pairs if isinstance(g, ghost_module.SampleGradients) else [(g, g)] for g in (a, b))):
            torch.testing.assert_close(u[1], v[1], rtol=0, atol=0)


def test_only_layers_that_autograd_would_not_run_are_returned_by_it():
    """Autograd runs a node only on the way to a returned gradient: in a CNN whose every convolution and
    norm holds per-sample gradients, only the first convolution's ``G`` is returned with the head's (the
    rest come from pre-hooks)."""
    model, (x, y), _ = make_case("wide_cnn")
    capture = ghost_module.LayerCapture(dict(model.named_parameters()), [x], x.shape[0])
    with capture:
        losses = cross_entropy(model(x), y)
    small = [capture.holds_sample_gradients(rec) for rec in capture.records]
    assert small == [True] * 4 + [False]  # the Linear head keeps its G
    edges = [rec.edge for rec in capture.records]
    assert ghost_module._returned_records(losses.grad_fn, edges, small) == [0, 4]


@pytest.mark.parametrize("engine", ["ghost", "ghost_lean"])
def test_ghost_at_zero_weights_equals_reverse(engine):
    """L2RW looks ahead at zero weights: the inner products must not come from the weighted backward."""
    model, train, meta = make_case("transformer")
    w = torch.zeros(10, dtype=torch.float64)
    expected = coefficients(model, train, meta, w, "reverse")
    got = coefficients(model, train, meta, w, engine)
    assert expected.coefficients.abs().max() > 1e-4
    torch.testing.assert_close(got.coefficients, expected.coefficients, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("case", ["transformer", "vit"])
def test_ghost_with_frozen_parameters_and_partial_lookahead(case):
    model, train, meta = make_case(case)
    frozen = "norm.weight"
    model.get_parameter(frozen).requires_grad_(False)
    names = {n for n, _ in model.named_parameters() if n.startswith(("layer.", "block.", "head.", "pos"))}
    names -= {"layer.norm1.weight", "block.norm1.weight"}  # a norm whose bias alone moves
    w = weights_with_zero_and_tiny()
    expected = coefficients(model, train, meta, w, "reverse", names)
    got = coefficients(model, train, meta, w, "ghost", names)
    full = coefficients(model, train, meta, w, "reverse")
    assert not torch.allclose(expected.coefficients, full.coefficients, rtol=1e-3)
    torch.testing.assert_close(got.coefficients, expected.coefficients, rtol=1e-6, atol=1e-12)


def net_gradient(model, train, meta, engine, **kwargs):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    rw = MetaReweighter(model, opt, [meta], net="logitnet", num_classes=K, engine=engine, seed=0, **kwargs)
    with sdpa_kernel([SDPBackend.MATH]):
        weights = rw.step(train[0], train[1], model(train[0]))
    return rw, [p.grad.clone() for p in rw.net.parameters()], weights


@pytest.mark.parametrize("case", list(CASES))
def test_auto_picks_ghost_and_reuses_the_callers_forward(case, monkeypatch):
    """Without dropout the caller's forward is the look-ahead's: auto's ghost equals reverse, and the
    engine runs no forward of its own (its fallback forward is disabled here)."""
    model, train, meta = make_case(case)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.eval()  # no dropout anywhere (the hand-written attention's too)
    _, expected, _ = net_gradient(model, train, meta, "reverse")

    def no_own_forward(problem):
        raise AssertionError("the caller's forward was not reused")

    monkeypatch.setattr(ghost_module.capture, "_own_capture", no_own_forward)
    rw, got, _ = net_gradient(model, train, meta, "auto")
    assert rw.engine_name == "ghost"
    _, lean, _ = net_gradient(model, train, meta, "ghost_lean")
    for e, g, h in zip(expected, got, lean):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(h, e, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lookahead": ["layer.*", "head.*"]},
        {"lookahead": "submodule layer"},
        {"virtual_step": "optimizer", "interval": 2},
        {"net": "l2rw"},
    ],
)
def test_ghost_options_equal_reverse(kwargs):
    model, train, meta = make_case("transformer")
    model.eval()
    kwargs = dict(kwargs)
    net = kwargs.pop("net", "lossnet")

    def run(engine):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
        F.cross_entropy(m(train[0]), train[1]).backward()
        opt.step()  # a momentum buffer, so the mirrored step has an offset
        opt.zero_grad()
        options = dict(kwargs)
        if options.get("lookahead") == "submodule layer":
            options["lookahead"] = m.layer
        rw = MetaReweighter(m, opt, [meta], net=net, engine=engine, seed=0, **options)
        out = []
        with sdpa_kernel([SDPBackend.MATH]):
            for _ in range(3):
                out.append(rw.step(train[0], train[1], m(train[0])))
        return rw, out

    rw, got = run("ghost")
    _, expected = run("reverse")
    assert rw.engine_name == "ghost"
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)


class Unknown(nn.Module):
    """A layer without a rule that holds a parameter (it might mix samples)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize(
    "build, engine",
    [
        (lambda: make_cnn(torch.float64), "forward"),  # BatchNorm in train mode
        (lambda: nn.Sequential(nn.Linear(4, 8), Unknown(8), nn.Linear(8, 3)).double(), "forward"),
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)).double(), "ghost"),
    ],
)
def test_auto_choice(build, engine):
    model = build()
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [(torch.randn(2, 4), torch.zeros(2))])
    assert rw.engine_name == engine


def test_batchnorm_switched_to_train_falls_back_to_forward():
    """A BatchNorm in eval mode at construction is per-sample; switched to train mode, the capture sees
    it couple the batch, and auto falls back to forward (exact) with one warning."""
    model = make_cnn(torch.float64)
    x, y = make_batch(12, seed=1)
    meta = make_batch(10, seed=2)
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rw = MetaReweighter(model, opt, [meta], seed=0)
    assert rw.engine_name == "ghost"
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rw.step(x, y, model(x))
    assert rw.engine_name == "forward"
    assert sum("falling back to 'forward'" in str(w.message) for w in caught) == 1
    with pytest.raises(NotImplementedError, match="batch norm in train mode"):
        coefficients(model, (x, y), meta, torch.ones(12, dtype=torch.float64), "ghost")


def test_ghost_leaves_no_trace_and_its_hooks_are_removable():
    model, train, meta = make_case("transformer")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = MetaReweighter(model, opt, [meta], engine="ghost", seed=0)
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    logits = model(train[0])
    before, rng = snapshot(model, opt), torch.get_rng_state()
    rw.step(train[0], train[1], logits)
    assert_same(before, snapshot(model, opt))
    assert torch.equal(rng, torch.get_rng_state())
    rw.remove_hooks()
    assert len(model._forward_hooks) == 0 and len(model._forward_pre_hooks) == 0
    rw.step(train[0], train[1], model(train[0]))  # runs its own forward now
    assert len(model._forward_hooks) == 0


def test_forward_outside_a_step_is_not_captured_under_no_grad():
    model, train, meta = make_case("groupnorm_cnn")
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [meta], seed=0)
    with torch.no_grad():
        model(train[0])
    assert rw._engine.capture is not None and rw._engine.capture.latest is None


def test_ghost_needs_no_forward_mode_support():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, K)).double()
    model.forward = lambda x: model[2](NoForwardAD.apply(model[1](model[0](x))))
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, K, (10,), generator=g))
    meta = (torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, K, (8,), generator=g))
    w = weights_with_zero_and_tiny()
    expected = coefficients(model, train, meta, w, "reverse")
    torch.testing.assert_close(coefficients(model, train, meta, w, "ghost").coefficients, expected.coefficients)
    with pytest.raises(NotImplementedError):
        coefficients(model, train, meta, w, "forward")


@pytest.mark.parametrize(
    "engine, train_pass_fused",
    [("ghost", set()), ("forward", {False}), ("reverse", {False}), ("finite_difference", {True})],
)
def test_math_attention_only_where_forward_mode_or_double_backward_needs_it(engine, train_pass_fused, monkeypatch):
    """Each SDPA call inside a step records whether the fused kernels were allowed. The meta batch's
    forward and backward (batch 8) and everything ghost runs keep the caller's choice (here torch's
    default, fused allowed); only the JVP (forward) and the create_graph pass (reverse) force math."""
    model, train, meta = make_case("transformer")  # train mode: the encoder layer's fused path stays off
    calls: list[tuple[int, bool]] = []
    original = F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        if recording.on:
            calls.append((q.shape[0], torch.backends.cuda.flash_sdp_enabled()))
        return original(q, *args, **kwargs)

    recording.on = False
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = MetaReweighter(model, opt, [meta], engine=engine, seed=0)
    logits = model(train[0])
    recording.on = True
    rw.step(train[0], train[1], logits)
    meta_calls = {flash for n, flash in calls if n == 8}
    train_calls = {flash for n, flash in calls if n == 10}
    assert meta_calls == {True}
    assert train_calls == train_pass_fused  # ghost reuses the caller's forward: no training-batch pass
    if engine == "ghost":  # its own forward of the training batch (no capture) keeps the kernel too
        rw.remove_hooks()
        calls.clear()
        rw.step(train[0], train[1], model(train[0]))
        assert {flash for _, flash in calls} == {True} and any(n == 10 for n, _ in calls)
