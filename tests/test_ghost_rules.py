"""The ghost engine's rule registry: a rule registered from outside the package makes an op exact, RMSNorm
in each of its forms is exact, frozen layers never need a rule, and the static check names what it refuses."""

import pytest
import torch
import torch.nn.functional as F
from test_ghost_engine import K, coefficients, weights_with_zero_and_tiny
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

from reweight import MetaReweighter
from reweight.engines import ghost
from reweight.engines.ghost import Rule, ghost_exactness_problem, register_rule, unregister_rule

# ---------------------------------------------------------------- a custom op the package knows nothing of


class _Scale(torch.autograd.Function):
    """``x * w`` with a backward (twice differentiable) but no forward-mode rule."""

    @staticmethod
    def forward(x, w):
        return x * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, (grad * x).sum(0)


def channel_scale(x, w):
    """A torch function of its own: ``torch.overrides`` dispatch, so that a ``TorchFunctionMode`` sees it."""
    if has_torch_function((x, w)):
        return handle_torch_function(channel_scale, (x, w), x, w)
    return _Scale.apply(x, w)


class ChannelScale(nn.Module):
    def __init__(self, d: int, trainable: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(1 + 0.1 * torch.randn(d), requires_grad=trainable)

    def forward(self, x):
        return channel_scale(x, self.w)


class ChannelScaleRule(Rule):
    """What a user writes: the op's closed forms (the generic JVP would need forward-mode AD)."""

    functions = (channel_scale,)
    modules = (ChannelScale,)

    def weighted_grads(self, rec, tracked, wg):
        x, w = rec.args
        return [(w, (wg * x.detach()).sum(0))] if tracked(w) else []

    def output_tangent(self, rec, tangent_of):
        x, w = rec.args
        tw = tangent_of(w)
        return None if tw is None else x.detach() * tw


@pytest.fixture
def scale_rule():
    rule = register_rule(ChannelScaleRule())
    yield rule
    unregister_rule(rule)


def scaled_net(trainable: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), ChannelScale(8, trainable), nn.Tanh(), nn.Linear(8, K)).double()


def vectors(n: int, seed: int, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, K, (n,), generator=g)


def assert_ghost_equals_reverse(model, train, meta, atol=1e-12):
    w = weights_with_zero_and_tiny(train[1].shape[0])
    expected = coefficients(model, train, meta, w, "reverse")
    assert expected.coefficients.abs().max() > 1e-5
    for engine in ("ghost", "ghost_lean"):
        got = coefficients(model, train, meta, w, engine)
        torch.testing.assert_close(got.coefficients, expected.coefficients, rtol=1e-6, atol=atol)


def test_an_op_without_a_rule_is_refused_when_its_jvp_fails():
    """Before its rule is registered, the op goes to the fallback, whose JVP needs forward-mode AD that
    this op lacks: the engine refuses (``NotImplementedError``, so ``auto`` falls back), never a wrong
    answer; and the static check refuses the layer that holds it."""
    model = scaled_net()
    assert ghost_exactness_problem(model, dict(model.named_parameters())) == (
        "1 (ChannelScale) is a layer without a rule holding look-ahead parameters"
    )
    with pytest.raises(NotImplementedError, match="channel_scale"):
        coefficients(model, vectors(10, 1), vectors(8, 2), weights_with_zero_and_tiny(), "ghost")


def test_a_rule_registered_from_outside_makes_the_op_exact(scale_rule):
    model = scaled_net()
    assert ghost.rule_for(channel_scale) is scale_rule
    assert ghost_exactness_problem(model, dict(model.named_parameters())) is None
    assert_ghost_equals_reverse(model, vectors(10, 1), vectors(8, 2))
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [vectors(8, 2)])
    assert rw.engine_name == "ghost"


def test_a_frozen_layer_without_a_rule_does_not_block_ghost():
    """Only layers holding look-ahead parameters need a rule: a frozen one's output gradient passes by
    ordinary autograd (here through an op with no forward-mode rule, which the engine never differentiates)."""
    model = scaled_net(trainable=False)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert ghost_exactness_problem(model, params) is None
    assert_ghost_equals_reverse(model, vectors(10, 1), vectors(8, 2))


# ---------------------------------------------------------------- RMSNorm in each of its forms


class HandWrittenRMSNorm(nn.Module):
    """Gemma's: ``x_hat * (1 + weight)``, a scale by a tensor derived from the parameter alone."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x_hat * (1.0 + self.weight)


class FunctionalRMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.gain, 1e-6)


def llama_rms_norm(d: int) -> nn.Module:
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = modeling_llama.LlamaRMSNorm(d)
    nn.init.normal_(norm.weight, 1.0, 0.1)
    return norm


NORMS = {
    "module": lambda d: nn.RMSNorm(d, eps=1e-6),
    "functional": FunctionalRMSNorm,
    "hf_llama": llama_rms_norm,
    "gemma_style": HandWrittenRMSNorm,
}


class Tokens(nn.Module):
    """Sequence model: linear embedding, RMSNorm over features, head on the mean."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.inp, self.norm, self.mid, self.head = nn.Linear(6, 8), norm, nn.Linear(8, 8), nn.Linear(8, K)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.norm(self.inp(x)))).mean(1))


@pytest.mark.parametrize("form", list(NORMS))
def test_rms_norm_ghost_equals_reverse(form):
    torch.manual_seed(0)
    model = Tokens(NORMS[form](8)).double()
    assert ghost_exactness_problem(model, dict(model.named_parameters())) is None
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(10, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, K, (10,), generator=g))
    meta = (torch.randn(8, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, K, (8,), generator=g))
    # HF's norm computes in float32 whatever the model's dtype: both engines differentiate that rounding
    assert_ghost_equals_reverse(model, train, meta, atol=1e-9 if form == "hf_llama" else 1e-12)


@pytest.mark.parametrize("form", list(NORMS))
def test_rms_norm_weight_holds_per_sample_gradients(form):
    """The norm's weight keeps per-sample gradients (the size of the weight), not its output gradient."""
    torch.manual_seed(0)
    model = Tokens(NORMS[form](8)).double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    capture = ghost.LayerCapture(dict(model.named_parameters()), [x], 4)
    with capture:
        model(x)
    held = [capture.holds_sample_gradients(rec) for rec in capture.records]
    assert held == [False, True, False, False]


class Gains(nn.Module):
    """Scales of data by a scalar, a per-feature and a per-position parameter (each held per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(8, K)
        self.scalar = nn.Parameter(torch.tensor(1.2))
        self.feature = nn.Parameter(1 + 0.1 * torch.randn(8))
        self.position = nn.Parameter(1 + 0.1 * torch.randn(5, 1))

    def forward(self, x):
        h = torch.tanh(self.scalar * self.inp(x))
        h = torch.mul(h, self.feature) * self.position
        return self.head(h.mean(1))


def test_scales_of_data_hold_per_sample_gradients_and_equal_reverse():
    torch.manual_seed(0)
    model = Gains().double()
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(10, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, K, (10,), generator=g))
    meta = (torch.randn(8, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, K, (8,), generator=g))
    capture = ghost.LayerCapture(dict(model.named_parameters()), [train[0]], 10)
    with capture:
        model(train[0])
    assert [capture.holds_sample_gradients(rec) for rec in capture.records] == [False, True, True, True, False]
    assert_ghost_equals_reverse(model, train, meta)


# ---------------------------------------------------------------- the static check


def tiny_llama(lora: bool = False) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double()
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    return model


class LastToken(nn.Module):
    """A causal LM as a classifier of the next token (logits of the last position)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits[:, -1, :K]


@pytest.mark.parametrize("lora", [False, True])
def test_tiny_llama_is_exact(lora):
    model = LastToken(tiny_llama(lora))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert ghost_exactness_problem(model, params) is None
    if lora:
        assert all("lora_" in k for k in params)
        for p in params.values():  # LoRA's B starts at zero: move it, so that every term is exercised
            nn.init.normal_(p, 0.0, 0.1)
    g = torch.Generator().manual_seed(1)
    train = (torch.randint(0, 32, (6, 5), generator=g), torch.randint(0, K, (6,), generator=g))
    meta = (torch.randint(0, 32, (4, 5), generator=g), torch.randint(0, K, (4,), generator=g))
    w = weights_with_zero_and_tiny(6)
    names = set(params)
    expected = coefficients(model, train, meta, w, "reverse", names)
    got = coefficients(model, train, meta, w, "ghost", names)
    assert expected.coefficients.abs().max() > 1e-6
    torch.testing.assert_close(got.coefficients, expected.coefficients, rtol=1e-5, atol=1e-10)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential()])
        self.layers[0].add_module("fc", nn.Linear(4, 8))
        self.layers[0].add_module("bn", nn.BatchNorm1d(8))
        self.head = nn.Linear(8, K)


def test_exactness_names_the_module():
    model = WithBatchNorm()
    params = dict(model.named_parameters())
    assert ghost_exactness_problem(model, params) == "layers.0.bn (BatchNorm1d) normalises over the batch in train mode"
    assert ghost_exactness_problem(model, list(params)) == ghost_exactness_problem(model, params)  # names alone
    model.eval()
    assert ghost_exactness_problem(model, params) is None
    model.train()  # batch statistics couple the samples even when the norm is frozen
    frozen = {k: p for k, p in params.items() if not k.startswith("layers.0.bn")}
    assert ghost_exactness_problem(model, frozen) is not None
    assert ghost_exactness_problem(model, {}) is not None
    mha = nn.MultiheadAttention(8, 2)  # sequence-first: refused only when it holds look-ahead parameters
    assert ghost_exactness_problem(mha, dict(mha.named_parameters())) == (
        "model (MultiheadAttention) is sequence-first (batch_first=False)"
    )


# ---------------------------------------------------------------- attention masks through the projection rule


class MaskedAttention(nn.Module):
    """``nn.MultiheadAttention`` and an encoder layer with boolean and float masks, attention dropout on."""

    def __init__(self, masks: str) -> None:
        super().__init__()
        self.masks = masks
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dropout=0.1)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, K)

    def forward(self, x):
        n, length = x.shape[:2]
        pad = torch.zeros(n, length, dtype=torch.bool)
        pad[:, -1] = True
        pad[0, -2] = True
        causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=x.dtype)
        if self.masks == "padding":
            h = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        elif self.masks == "bool_causal":
            h = self.attn(x, x, x, attn_mask=causal.isinf(), need_weights=False)[0]
        elif self.masks == "both":
            h = self.attn(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0]
        else:
            h = self.attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        both = self.masks == "both"
        h = self.layer(x + h, src_mask=causal, src_key_padding_mask=pad if both else None, is_causal=not both)
        return self.head(h[:, 0])


@pytest.mark.parametrize("masks", ["padding", "bool_causal", "both", "is_causal"])
def test_attention_masks_ghost_equals_reverse(masks):
    torch.manual_seed(0)
    model = MaskedAttention(masks).double()
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(10, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, K, (10,), generator=g))
    meta = (torch.randn(8, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, K, (8,), generator=g))
    assert_ghost_equals_reverse(model, train, meta)
