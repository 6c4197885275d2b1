"""Exact meta-gradient from each layer's inputs and output gradients ("ghost" inner products).

``c_i = -<scale * v, g_i> / n`` splits over the operations that consume a look-ahead parameter. For an
operation ``out = f(a, theta)`` that acts on each sample separately, sample ``i``'s share is
``<J_theta f(a_i) [scale * v], G_i>`` with ``G_i = dL_i / d out_i``: for ``nn.Linear`` that is
``sum_t G_{i,t}^T V a_{i,t}``, one matmul with the cost of the layer's forward (the per-sample inner
product of DP-SGD's ghost clipping). The ``G_i`` of all layers come from one backward of the unweighted
per-sample losses (``grad_outputs`` of ones: no division by weights, so zero and tiny weights are exact);
the look-ahead's weighted gradient ``sum_i (w_i / n) g_i`` is formed from the same ``G`` and inputs by each
rule's weight-gradient formula, so one activation backward serves both.

A ``TorchFunctionMode`` records, during the training batch's forward, every operation that takes a
look-ahead parameter: its inputs and the gradient edge of its output. Operations on the data
("batched": computed from the model's inputs) are closed by a rule (``linear``, ``conv1d/2d``,
``embedding``: the tangent of the output is the operation applied to the tangent of its parameters;
``layer_norm``, ``group_norm``: per-sample gradients of the affine parameters), or by a forward-mode JVP
of that one operation (``x + pos_embed``,
``cat([cls_token.expand(...), x])``, batch norm in eval mode, anything else). Operations on parameters
alone (``pos[:, :L]``, ``cls_token.expand(...)``, a parametrisation) are followed by JVPs of those small
tensors. ``nn.MultiheadAttention``'s functional core is recomputed op for op with its projections recorded
(self-attention, packed weights, ``need_weights=False``: what ``nn.TransformerEncoderLayer`` calls).

When the caller's forward ran under the capture (the reweighter arms it before each updating step, see
:class:`ForwardCapture`), nothing of the training batch is recomputed: the look-ahead reuses the caller's
graph: the meta step is one backward of the unweighted losses, the weight-gradient formulas, the meta
batch's forward and backward, and the per-layer products. Otherwise the engine runs its own forward.
The ``G`` are held across the meta batch's pass, except that a layer or group norm of data keeps only
``sum G * x_hat`` and ``sum G`` per sample and channel, and a convolution whose weight is smaller than
one sample's output keeps its per-sample weight gradients (one grouped convolution backward, the batch as
groups): :class:`SampleGradients`, smaller than ``G``, formed by pre-hooks while the backward runs;
``ghost_lean`` trades one more backward for holding none.

Exact when samples do not interact and activations keep the batch in dimension 0. Batch norm in train
mode, an operation of a parameter with a batched output whose batch dimension is not ``n``, in-place
updates of parameters, and unsupported attention settings raise ``NotImplementedError`` (``auto`` then
falls back to ``forward``); :func:`ghost_exactness_problem` is the static check ``auto`` uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode

from .._batch import _tensors, call_model
from .._profiling import phase
from ..virtual_step import apply_virtual_step
from .base import MetaGradient, MetaProblem, detached_params, meta_loss_and_gradient, register_engine

__all__ = ["ghost_meta_gradient", "ghost_exactness_problem", "ForwardCapture", "LayerCapture"]

_CONV = {F.conv1d: 1, F.conv2d: 2}
_NORMS = (F.layer_norm, F.group_norm)
_RULE_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.MultiheadAttention,
)


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list:
    """Positional view of a call of a function with signature ``names`` (trailing ``defaults``)."""
    bound = list(args) + [None] * (len(names) - len(args))
    first_default = len(names) - len(defaults)
    for i, name in enumerate(names):
        if i >= len(args):
            bound[i] = kwargs.get(name, defaults[i - first_default] if i >= first_default else None)
    return bound


_SIGNATURES: dict[Callable, tuple[tuple[str, ...], tuple]] = {
    F.linear: (("input", "weight", "bias"), (None,)),
    F.conv1d: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1)),
    F.conv2d: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1)),
    F.embedding: (
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        (None, None, 2.0, False, False),
    ),
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5)),
    F.group_norm: (("input", "num_groups", "weight", "bias", "eps"), (None, None, 1e-5)),
}


class _Record(NamedTuple):
    """One operation on a look-ahead parameter: ``func(*args, **kwargs)``, its output's gradient edge
    (``None`` for an operation on parameters alone) and the batch dimension of its output."""

    func: Callable
    args: tuple
    kwargs: dict
    edge: GradientEdge | None
    output: Tensor | None
    batch_dim: int
    size: torch.Size | None = None  # a batched output's shape


class SampleGradients(NamedTuple):
    """One layer's per-sample parameter gradients, held instead of its output gradient ``G`` where smaller.

    ``pairs`` holds ``(parameter, g)`` with ``g[i]`` sample ``i``'s gradient of that (recorded) parameter:
    the weighted gradient is ``sum_i coef_i g[i]`` and the inner products ``<tangent, g[i]>``, small matmuls.
    A layer or group norm of data always qualifies (``sum G * x_hat`` and ``sum G`` over the positions: the
    size of its parameters); a convolution when its weight is smaller than one sample's output.
    """

    pairs: tuple[tuple[Tensor, Tensor], ...]


LayerGradient = Tensor | SampleGradients | None


_ADDITIVE = frozenset({"add", "__add__", "__radd__", "sub", "__sub__", "__rsub__"})


def _shape_only(t: Tensor) -> Tensor:
    """A tensor of ``t``'s shape and dtype that holds no memory (a broadcast zero)."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def _walk(obj: Any) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            if isinstance(item, Tensor):
                yield item


class LayerCapture(TorchFunctionMode):
    """Records the operations of one forward that take a look-ahead parameter (a ``TorchFunctionMode``).

    Args:
        params: the look-ahead parameters by name, as the forward sees them.
        roots: the forward's input tensors; everything computed from them is "batched".
        batch_size: the size ``n`` of their leading dimension.
    """

    def __init__(self, params: Mapping[str, Tensor], roots: Iterable[Tensor], batch_size: int) -> None:
        super().__init__()
        self.names = {id(p): k for k, p in params.items()}
        self._params = dict(params)  # keeps the ids valid
        self.n = batch_size
        self.records: list[_Record] = []
        self.chain: list[_Record] = []  # operations on parameters alone, in forward order
        self._derived: dict[int, Tensor] = {}
        self._batched: dict[int, weakref.ref] = {}
        self._batch_dim = 0
        self.error: str | None = None
        self.output: Any = None  # the forward's outputs, set by ForwardCapture
        for t in roots:
            self._mark(t)

    # ---------------------------------------------------------------- bookkeeping

    def _mark(self, out: Any) -> None:
        for t in _walk(out):
            self._batched[id(t)] = weakref.ref(t)

    def _is_batched(self, t: Tensor) -> bool:
        ref = self._batched.get(id(t))
        return ref is not None and ref() is t

    def _is_tracked(self, t: Tensor) -> bool:
        return id(t) in self.names or id(t) in self._derived

    def _scan(self, args: tuple, kwargs: dict) -> tuple[bool, bool]:
        tracked = batched = False
        for obj in (*args, *kwargs.values()):
            for t in _walk(obj):
                if id(t) in self.names or id(t) in self._derived:
                    tracked = True
                elif self._is_batched(t):
                    batched = True
        return tracked, batched

    def fail(self, reason: str) -> None:
        """Mark the capture unusable (the forward itself goes on unchanged)."""
        if self.error is None:
            self.error = reason

    def check(self) -> None:
        """Raise ``NotImplementedError`` naming the first operation the engine cannot handle exactly."""
        if self.error is not None:
            raise NotImplementedError(f"engine 'ghost': {self.error}")

    # ---------------------------------------------------------------- the mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return self._attention(args, kwargs)
        tracked, batched = self._scan(args, kwargs)
        if func is F.batch_norm and batched and _bind(args, kwargs, _BN_NAMES, _BN_DEFAULTS)[5]:
            self.fail("batch norm in train mode couples the samples of a batch")
        out = func(*args, **kwargs)
        if tracked:
            self._record(func, args, kwargs, out, batched)
        elif batched:
            self._mark(out)
        return out

    def _record(self, func, args: tuple, kwargs: dict, out: Any, batched: bool, batch_dim: int | None = None) -> None:
        name = getattr(func, "__name__", repr(func))
        if not isinstance(out, Tensor):
            if any(True for _ in _walk(out)):
                self.fail(f"{name} returns several tensors computed from a look-ahead parameter")
            return
        if name.endswith("_") and not name.endswith("__") or any(out is t for t in _walk(args)):
            self.fail(f"in-place operation {name} on a look-ahead parameter")
            return
        if not batched:
            self._derived[id(out)] = out
            self.chain.append(_Record(func, args, kwargs, None, out, 0))
            return
        bd = self._batch_dim if batch_dim is None else batch_dim
        if out.ndim <= bd or out.shape[bd] != self.n:
            self.fail(f"{name} of a look-ahead parameter has output {tuple(out.shape)} without the batch of {self.n}")
            return
        if not out.requires_grad:
            self.fail(f"{name} of a look-ahead parameter has no gradient (run the forward with grad enabled)")
            return
        if func is F.embedding:
            b = _bind(args, kwargs, *_SIGNATURES[F.embedding])
            if b[3] is not None or b[5]:
                self.fail("embedding with max_norm or scale_grad_by_freq")
        if func is F.layer_norm and bd >= out.ndim - len(_bind(args, kwargs, *_SIGNATURES[func])[1]):
            self.fail("layer_norm normalises over the batch dimension")
        if func is F.group_norm and bd != 0:
            self.fail("group_norm whose batch is not its first dimension")
        if name in _ADDITIVE:  # its derivatives do not read the data operand: keep its shape, not its memory
            args = tuple(_shape_only(a) if isinstance(a, Tensor) and not self._is_tracked(a) else a for a in args)
        self.records.append(_Record(func, args, kwargs, get_gradient_edge(out), None, bd, out.shape))
        self._mark(out)

    def _linear(self, x: Tensor, w: Tensor, b: Tensor | None, batch_dim: int) -> Tensor:
        out = F.linear(x, w, b)
        if self._is_tracked(w) or (b is not None and self._is_tracked(b)):
            self._record(F.linear, (x, w, b), {}, out, True, batch_dim)
        return out

    def _attention(self, args: tuple, kwargs: dict) -> Any:
        """``F.multi_head_attention_forward`` recomputed op for op, its projections recorded."""
        b = _bind(args, kwargs, _MHA_NAMES, _MHA_DEFAULTS)
        p = dict(zip(_MHA_NAMES, b))
        query, key, value = p["query"], p["key"], p["value"]
        tracked, batched = self._scan(args, kwargs)
        supported = (
            query is key
            and key is value
            and query.ndim == 3
            and not p["use_separate_proj_weight"]
            and p["bias_k"] is None
            and p["bias_v"] is None
            and not p["add_zero_attn"]
            and p["static_k"] is None
            and p["static_v"] is None
            and not p["need_weights"]
            and batched
        )
        if not supported:
            result = F.multi_head_attention_forward(*args, **kwargs)
            if tracked:
                self.fail("nn.MultiheadAttention other than batched self-attention with need_weights=False")
            if batched:
                self._mark(result)
            return result
        tgt_len, bsz, embed_dim = query.shape
        num_heads = p["num_heads"]
        head_dim = embed_dim // num_heads
        attn_mask, key_padding_mask, is_causal = p["attn_mask"], p["key_padding_mask"], p["is_causal"]
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False
        # the copy a batch-first module's transposed input gets inside linear anyway, made here so that the
        # record holds the tensor autograd saves rather than keeping the layer's input alive beside it
        proj = self._linear(query.contiguous(), p["in_proj_weight"], p["in_proj_bias"], 1)
        proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q, k, v = proj[0], proj[1], proj[2]
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        src_len = k.size(1)
        if key_padding_mask is not None:
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, num_heads, -1, -1)
                .reshape(bsz * num_heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = p["dropout_p"] if p["training"] else 0.0
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        attn = attn.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
        out = self._linear(attn, p["out_proj_weight"], p["out_proj_bias"], 1)
        if batched:
            self._mark(out)
        return out, None

    # ---------------------------------------------------------------- weighted gradient

    def holds_sample_gradients(self, rec: _Record) -> bool:
        """Whether ``rec``'s layer keeps its :class:`SampleGradients` rather than its ``G``."""
        return _holds_sample_gradients(rec, self._is_tracked)

    def weighted_gradients(self, grads: Iterable[LayerGradient], coef: Tensor) -> dict[str, Tensor]:
        """``sum_i coef_i g_i`` for every look-ahead parameter, from the recorded inputs and the ``G`` of the
        unweighted losses, or their :class:`SampleGradients` (``coef = weights / n`` gives the look-ahead's
        weighted gradient)."""
        total: dict[int, Tensor] = {}

        def add(t: Tensor, g: Tensor) -> None:
            total[id(t)] = g if id(t) not in total else total[id(t)] + g

        tracked = self._is_tracked
        for rec, grad in zip(self.records, grads):
            if grad is None:
                continue
            if isinstance(grad, SampleGradients):
                for t, g in grad.pairs:
                    add(t, torch.tensordot(coef.to(g.dtype), g, dims=([0], [0])))
                continue
            shape = [1] * grad.ndim
            shape[rec.batch_dim] = -1
            for t, g in _weighted_grads(rec, tracked, grad * coef.to(grad.dtype).view(shape)):
                add(t, g)
        for rec in reversed(self.chain):  # parameter-derived tensors, latest first
            assert rec.output is not None
            if id(rec.output) in total:
                g = total.pop(id(rec.output))
                for t, gt in _vjp(rec, tracked, g):
                    add(t, gt)
        return {k: total[id(p)].to(p.dtype) if id(p) in total else torch.zeros_like(p) for k, p in self._params.items()}

    # ---------------------------------------------------------------- inner products

    def inner_products(self, tangent: Mapping[str, Tensor], grads: Iterable[LayerGradient]) -> Tensor:
        """``sum_layers <J_theta out_i [tangent], G_i>`` per sample, shape ``(n,)``."""
        tangents: dict[int, Tensor] = {}

        def tangent_of(t: Tensor) -> Tensor | None:
            if id(t) in self.names:
                return tangent.get(self.names[id(t)])
            return tangents.get(id(t))

        for rec in self.chain:
            derived = _jvp(rec, tangent_of)
            if derived is not None:  # else the output is constant along the tangent, as if untracked
                tangents[id(rec.output)] = derived
        total: Tensor | None = None
        for rec, grad in zip(self.records, grads):
            if grad is None:
                continue
            if isinstance(grad, SampleGradients):
                part = _sample_contribution(tangent_of, grad)
            else:
                part = _contribution(rec, tangent_of, grad)
            if part is not None:
                total = part if total is None else total + part
        if total is None:
            some = next(iter(self._params.values()))
            return torch.zeros(self.n, dtype=some.dtype, device=some.device)
        return total


_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = (None, None, False, 0.1, 1e-5)
_MHA_NAMES = (
    "query",
    "key",
    "value",
    "embed_dim_to_check",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
    "dropout_p",
    "out_proj_weight",
    "out_proj_bias",
    "training",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "use_separate_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "static_k",
    "static_v",
    "average_attn_weights",
    "is_causal",
)
_MHA_DEFAULTS = (True, None, True, None, False, None, None, None, None, None, True, False)


def _slots(rec: _Record, keep: Callable[[Tensor], bool]) -> tuple[list[tuple[tuple[str, Any], int]], list[Tensor]]:
    """Where the tensors ``keep`` selects sit in ``rec``'s arguments (``(("a", i) or ("k", name), j)``)."""
    slots: list[tuple[tuple[str, Any], int]] = []
    found: list[Tensor] = []
    for key, obj in [*((("a", i), a) for i, a in enumerate(rec.args)), *((("k", k), a) for k, a in rec.kwargs.items())]:
        for j, t in enumerate(_walk(obj)):
            if keep(t):
                slots.append((key, j))
                found.append(t)
    return slots, found


def _rebuilt(rec: _Record, slots: list[tuple[tuple[str, Any], int]]) -> Callable[..., Any]:
    """``rec``'s operation as a function of the tensors at ``slots``."""

    def fn(*xs: Tensor) -> Any:
        args, kwargs = list(rec.args), dict(rec.kwargs)
        for ((kind, where), j), x in zip(slots, xs):
            obj = args[where] if kind == "a" else kwargs[where]
            if isinstance(obj, Tensor):
                obj = x
            else:
                items = list(obj)
                items[[m for m, it in enumerate(items) if isinstance(it, Tensor)][j]] = x
                obj = type(obj)(items)
            if kind == "a":
                args[where] = obj
            else:
                kwargs[where] = obj
        return rec.func(*args, **kwargs)

    return fn


def _jvp(rec: _Record, tangent_of: Callable[[Tensor], Tensor | None]) -> Tensor | None:
    """Tangent of ``rec``'s output: a forward-mode JVP of that one operation in its tracked inputs (``None``
    when none of them carries a tangent)."""
    slots, primals = _slots(rec, lambda t: tangent_of(t) is not None)
    if not primals:
        return None
    tangents = [tangent_of(t) for t in primals]
    detached = tuple(p.detach() for p in primals)
    return torch.func.jvp(_rebuilt(rec, slots), detached, tuple(t.to(p.dtype) for t, p in zip(tangents, detached)))[1]  # type: ignore[union-attr]


def _vjp(rec: _Record, tracked: Callable[[Tensor], bool], grad: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(input, grad_output^T d out / d input)`` for each tracked input of ``rec``: a VJP of that one operation."""
    slots, primals = _slots(rec, tracked)
    if not primals:
        return []
    pullback = torch.func.vjp(_rebuilt(rec, slots), *(p.detach() for p in primals))[1]
    return list(zip(primals, pullback(grad.to(rec.output.dtype if rec.output is not None else grad.dtype))))


def _weighted_grads(rec: _Record, tracked: Callable[[Tensor], bool], wg: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``sum_i coef_i dL_i / d input`` for each tracked input of a batched operation, from its recorded inputs
    and ``wg`` (its output gradient already scaled per sample): the weight-gradient formula of each rule
    (norms of data come as :class:`SampleGradients`)."""
    sig = _SIGNATURES.get(rec.func)
    if sig is None:
        return _vjp_batched(rec, tracked, wg)
    b = _bind(rec.args, rec.kwargs, *sig)
    x = b[0]
    if tracked(x):
        return _vjp_batched(rec, tracked, wg)
    x = x.detach()
    out: list[tuple[Tensor, Tensor]] = []
    if rec.func is F.embedding:
        weight = b[1]
        if tracked(weight):
            g = torch.zeros_like(weight, dtype=wg.dtype).index_add_(0, x.reshape(-1), wg.reshape(-1, weight.shape[1]))
            if b[2] is not None:
                g[b[2]] = 0
            out.append((weight, g))
        return out
    if rec.func is F.linear:
        weight, bias = b[1], b[2]
        flat = wg.reshape(-1, wg.shape[-1])
        if tracked(weight):
            out.append((weight, flat.T @ x.reshape(-1, x.shape[-1]).to(wg.dtype)))
        if bias is not None and tracked(bias):
            out.append((bias, flat.sum(0)))
        return out
    if rec.func in _CONV:
        weight, bias = b[1], b[2]
        if isinstance(b[4], str):  # padding="same" / "valid": no closed form needed, one VJP
            return _vjp_batched(rec, tracked, wg)
        need_w, need_b = tracked(weight), bias is not None and tracked(bias)
        gw, gb = _conv_parameter_grads(rec, wg, x, weight, need_w, need_b)
        if gw is not None:
            out.append((weight, gw))
        if gb is not None:
            out.append((bias, gb))
        return out
    raise AssertionError(f"{rec.func.__name__} of data is held as SampleGradients")  # see holds_sample_gradients()


def _norm_parts(rec: _Record) -> tuple[list, list[int]]:
    """A normalisation record's bound arguments (input, shape or groups, weight, bias, eps) and the
    dimensions of its input that its parameters do not span, the batch excepted (it stays first)."""
    b = _bind(rec.args, rec.kwargs, *_SIGNATURES[rec.func])
    if rec.func is F.layer_norm:
        return b, [d for d in range(b[0].ndim - len(b[1])) if d != rec.batch_dim]
    return b, list(range(2, b[0].ndim))


def _holds_sample_gradients(rec: _Record, tracked: Callable[[Tensor], bool]) -> bool:
    """A layer or group norm of data (per-sample gradients the size of its parameters), or a convolution of
    data whose weight is smaller than one sample's output (integer padding, batch first)."""
    if rec.func in _NORMS:
        return not tracked(_norm_parts(rec)[0][0])
    if rec.func in _CONV and rec.size is not None:
        x, weight, _, _, padding = _bind(rec.args, rec.kwargs, *_SIGNATURES[rec.func])[:5]
        per_sample = rec.size[1:].numel()
        return not tracked(x) and not isinstance(padding, str) and rec.batch_dim == 0 and weight.numel() < per_sample
    return False


def _sample_gradients(rec: _Record, tracked: Callable[[Tensor], bool], grad: Tensor) -> SampleGradients:
    """The :class:`SampleGradients` of a layer that holds them (:func:`_holds_sample_gradients`), from its ``G``."""
    with torch.no_grad():
        if rec.func in _NORMS:
            return _norm_sample_gradients(rec, tracked, grad)
        return _conv_sample_gradients(rec, tracked, grad)


def _norm_sample_gradients(rec: _Record, tracked: Callable[[Tensor], bool], grad: Tensor) -> SampleGradients:
    """``out = x_hat * weight + bias``: per sample ``sum G * x_hat`` and ``sum G`` over the positions."""
    (x, shape, weight, bias, eps), reduce = _norm_parts(rec)
    dtype = torch.promote_types(grad.dtype, x.dtype)
    grad, x = grad.to(dtype), x.detach().to(dtype)
    pairs = []
    if weight is not None and tracked(weight):
        norm = F.layer_norm if rec.func is F.layer_norm else F.group_norm
        pairs.append((weight, _sum_over(norm(x, shape, None, None, eps).mul_(grad), reduce)))
    if bias is not None and tracked(bias):
        pairs.append((bias, _sum_over(grad, reduce)))
    return SampleGradients(tuple(pairs))


def _sum_over(t: Tensor, dims: list[int]) -> Tensor:
    """``t`` summed over ``dims`` (none: ``t`` itself; ``Tensor.sum([])`` would sum over everything)."""
    return t.sum(dims) if dims else t


def _conv_sample_gradients(rec: _Record, tracked: Callable[[Tensor], bool], grad: Tensor) -> SampleGradients:
    """Per-sample weight gradients of a convolution of data, one grouped convolution backward with the
    batch folded into the channels (``n * groups`` groups); the bias's are ``G`` summed over the positions."""
    x, weight, bias = _bind(rec.args, rec.kwargs, *_SIGNATURES[rec.func])[:3]
    n = grad.shape[0]
    pairs = []
    if tracked(weight):
        per_sample, _ = _conv_parameter_grads(
            rec,
            grad.reshape(1, -1, *grad.shape[2:]),
            x.detach().reshape(1, -1, *x.shape[2:]),
            weight.detach().repeat(n, *[1] * (weight.ndim - 1)),
            need_weight=True,
            need_bias=False,
            batch_groups=n,
        )
        assert per_sample is not None
        pairs.append((weight, per_sample.view(n, *weight.shape)))
    if bias is not None and tracked(bias):
        pairs.append((bias, grad.sum(list(range(2, grad.ndim)))))
    return SampleGradients(tuple(pairs))


def _conv_parameter_grads(
    rec: _Record, grad: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool, batch_groups: int = 1
) -> tuple[Tensor | None, Tensor | None]:
    """Weight and bias gradients of ``rec``'s convolution (its stride, integer padding, dilation and groups)
    for output gradient ``grad`` and input ``x``, computed in ``grad``'s dtype; ``batch_groups`` multiplies
    the groups (the batch folded into the channels gives per-sample weight gradients)."""
    stride, padding, dilation, groups = _bind(rec.args, rec.kwargs, *_SIGNATURES[rec.func])[3:]
    k = _CONV[rec.func]

    def tup(v: Any) -> list[int]:
        return list(v) if isinstance(v, tuple | list) else [v] * k

    _, gw, gb = torch.ops.aten.convolution_backward(
        grad,
        x.to(grad.dtype),
        weight.detach().to(grad.dtype),
        [weight.shape[0]] if need_bias else None,
        tup(stride),
        tup(padding),
        tup(dilation),
        False,
        [0] * k,
        groups * batch_groups,
        [False, need_weight, need_bias],
    )
    return gw, gb


def _sample_contribution(tangent_of: Callable[[Tensor], Tensor | None], held: SampleGradients) -> Tensor | None:
    """``sum_p <tangent_p, g_p[i]>`` per sample."""
    total = None
    for param, g in held.pairs:
        t = tangent_of(param)
        if t is not None:
            part = g.flatten(1) @ t.to(g.dtype).flatten()
            total = part if total is None else total + part
    return total


def _vjp_batched(rec: _Record, tracked: Callable[[Tensor], bool], wg: Tensor) -> list[tuple[Tensor, Tensor]]:
    slots, primals = _slots(rec, tracked)
    if not primals:
        return []
    pullback = torch.func.vjp(_rebuilt(rec, slots), *(p.detach() for p in primals))[1]
    return list(zip(primals, pullback(wg)))


def _batched_dot(u: Tensor, v: Tensor, batch_dim: int) -> Tensor:
    """``sum`` of ``u * v`` over every dimension but ``batch_dim`` (``u`` may broadcast against ``v``).

    A multiply and a reduction: on the CPU several times faster than a batched ``bmm`` of row vectors."""
    dtype = torch.promote_types(u.dtype, v.dtype)
    prod = u.to(dtype) * v.to(dtype)
    return prod.sum([d for d in range(prod.ndim) if d != batch_dim])


def _contribution(rec: _Record, tangent_of: Callable[[Tensor], Tensor | None], grad: Tensor) -> Tensor | None:
    """``<J_theta out_i [tangent], G_i>`` per sample for one recorded operation."""
    if rec.func is F.linear and tangent_of(rec.args[0] if rec.args else rec.kwargs["input"]) is None:
        x, weight, bias = _bind(rec.args, rec.kwargs, *_SIGNATURES[F.linear])[:3]
        tw = tangent_of(weight)
        tb = None if bias is None else tangent_of(bias)
        if tw is not None and tw.shape[1] < tw.shape[0]:  # <G V, a>: the narrower of the two sides
            grad = grad.to(x.dtype)
            part = _batched_dot(grad @ tw.to(x.dtype), x.detach(), rec.batch_dim)
            if tb is not None:
                part = part + _batched_dot(grad, tb.to(x.dtype), rec.batch_dim)
            return part
    dout = _output_tangent(rec, tangent_of)
    return None if dout is None else _batched_dot(dout, grad, rec.batch_dim)


def _output_tangent(rec: _Record, tangent_of: Callable[[Tensor], Tensor | None]) -> Tensor | None:
    """Tangent of a batched operation's output: a closed-form rule where one exists, else a JVP (norms of
    data come as :class:`SampleGradients`)."""
    sig = _SIGNATURES.get(rec.func)
    if sig is None:
        return _jvp(rec, tangent_of)
    b = _bind(rec.args, rec.kwargs, *sig)
    x = b[0]
    if tangent_of(x) is not None:  # a parameter-derived input: no closed form
        return _jvp(rec, tangent_of)
    x = x.detach()
    if rec.func is F.embedding:
        weight = b[1]
        tw = tangent_of(weight)
        if tw is None:
            return None
        padding_idx = b[2]
        out = F.embedding(x, tw.to(weight.dtype))
        if padding_idx is not None:
            if padding_idx < 0:
                padding_idx += weight.shape[0]
            out = out * (x != padding_idx).unsqueeze(-1).to(out.dtype)
        return out
    if rec.func is F.linear or rec.func in _CONV:
        weight, bias = b[1], b[2]
        tw = tangent_of(weight)
        tb = None if bias is None else tangent_of(bias)
        if tw is None:
            if tb is None:
                return None
            shape = [1] * x.ndim
            shape[-1 if rec.func is F.linear else 1] = -1
            return tb.to(x.dtype).view(shape)
        tw = tw.to(x.dtype)
        tb = None if tb is None else tb.to(x.dtype)
        if rec.func is F.linear:
            return F.linear(x, tw, tb)
        return rec.func(x, tw, tb, *b[3:])
    raise AssertionError(f"{rec.func.__name__} of data is held as SampleGradients")  # see holds_sample_gradients()


# -------------------------------------------------------------------- capture of the caller's forward


class ForwardCapture:
    """Runs the caller's forward of ``module`` under a :class:`LayerCapture` while armed.

    Installed by the reweighter when the engine is ``"ghost"``, armed before each step that updates
    the weighting net, disarmed inside :meth:`MetaReweighter.step`. The engine uses the latest capture
    when its logits are the outputs handed to ``step``, and runs its own forward otherwise.

    Args:
        module: the bare model (hooks go on it; :meth:`remove` takes them off).
        params: returns the current look-ahead parameters by name.
    """

    _installed: weakref.WeakKeyDictionary[nn.Module, ForwardCapture] = weakref.WeakKeyDictionary()

    def __init__(self, module: nn.Module, params: Callable[[], Mapping[str, Tensor]]) -> None:
        self.module = module
        self._params = params
        self.armed = False
        self.latest: LayerCapture | None = None
        self._active: LayerCapture | None = None
        self._handles = [
            module.register_forward_pre_hook(self._enter, with_kwargs=True),
            module.register_forward_hook(self._exit, always_call=True),
        ]
        ForwardCapture._installed[module] = self

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.armed or self._active is not None or not torch.is_grad_enabled():
            return
        roots = [t for obj in (*args, *kwargs.values()) for t in _walk(obj)]
        if not roots or roots[0].ndim == 0:
            return
        capture = LayerCapture(self._params(), roots, roots[0].shape[0])
        capture.__enter__()
        self._active = capture

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        capture, self._active = self._active, None
        if capture is None:
            return
        capture.__exit__(None, None, None)
        capture.output = output
        self.latest = capture

    def take(self, problem: MetaProblem) -> LayerCapture | None:
        """The capture of ``problem``'s training forward, if the caller's forward was captured (then cleared)."""
        capture, self.latest = self.latest, None
        if capture is None or problem.train_logits is None:
            return None
        try:
            if problem.logits_fn(capture.output) is not problem.train_logits:
                return None
        except Exception:  # noqa: BLE001  (outputs the logits function does not take: not this batch's)
            return None
        if capture.n != problem.weights.shape[0]:
            return None
        if {id(p): k for k, p in problem.params.items()} != capture.names:
            return None
        return capture

    def remove(self) -> None:
        """Remove the hooks from the module."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.latest = None
        if ForwardCapture._installed.get(self.module) is self:
            del ForwardCapture._installed[self.module]


# -------------------------------------------------------------------- the engine


def _own_capture(problem: MetaProblem) -> tuple[MetaProblem, LayerCapture]:
    """A fresh forward of the training batch under a capture; the problem then reuses its logits."""
    params = detached_params(problem, requires_grad=True)
    capture = LayerCapture(params, _tensors(problem.inputs), problem.weights.shape[0])
    with torch.enable_grad(), capture:
        logits = call_model(problem.model, params, problem.inputs, problem.logits_fn)
    return problem._replace(params=params, train_logits=logits), capture


def captured(problem: MetaProblem) -> tuple[MetaProblem, LayerCapture, bool]:
    """The capture of the training forward: the caller's (reused, ``True``) or the engine's own (``False``);
    with its own, the returned problem's parameters and logits are those of that forward."""
    installed = ForwardCapture._installed.get(problem.model)
    capture = None if installed is None else installed.take(problem)
    reused = capture is not None
    if capture is None:
        problem, capture = _own_capture(problem)
    capture.check()
    return problem, capture, reused


def layer_output_gradients(problem: MetaProblem, capture: LayerCapture, retain: bool) -> list[LayerGradient]:
    """What each recorded layer holds for the step: one backward of the unweighted per-sample losses
    (``grad_outputs`` of ones, no weight gradient computed) gives every ``G``; a layer that holds
    per-sample gradients (:meth:`LayerCapture.holds_sample_gradients`) forms them from its ``G`` while the
    backward runs (a pre-hook on its node), so that those ``G`` never all exist at once."""
    records = capture.records
    edges = [rec.edge for rec in records if rec.edge is not None]
    assert len(edges) == len(records)  # a batched operation's record keeps its output's edge
    logits = problem.train_logits
    assert logits is not None  # the captured forward's (take() checks it) or the engine's own
    if not records:
        return []
    with torch.enable_grad():
        losses = problem.loss_fn(logits, problem.targets)
    small = [capture.holds_sample_gradients(rec) for rec in records]
    returned = _returned_records(losses.grad_fn, edges, small)
    held: list[LayerGradient] = [None] * len(records)

    def keep(i: int) -> Callable[[tuple[Tensor | None, ...]], None]:
        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            grad = grad_outputs[edges[i].output_nr]
            if grad is not None:
                held[i] = _sample_gradients(records[i], capture._is_tracked, grad)

        return hook

    handles = [edges[i].node.register_prehook(keep(i)) for i in range(len(edges)) if small[i] and i not in returned]
    try:
        with torch.enable_grad(), phase("layer_gradients"):
            grads = torch.autograd.grad(
                losses,
                [edges[i] for i in returned],
                grad_outputs=torch.ones_like(losses),
                retain_graph=retain,
                allow_unused=True,
            )
    finally:
        for handle in handles:
            handle.remove()
    for i, grad in zip(returned, grads):
        held[i] = grad if grad is None or not small[i] else _sample_gradients(records[i], capture._is_tracked, grad)
    return held


def _returned_records(root: Any, edges: list[GradientEdge], small: list[bool]) -> list[int]:
    """Indices of the records whose output gradient the backward must return: every record holding ``G``,
    and a record holding per-sample gradients whose node leads to no returned gradient (autograd would not
    run it, so its pre-hook would not fire: the first layers of a network).

    One post-order walk of the graph from ``root`` (the losses' node): a node is needed when it or a node
    after it in the backward is a returned edge's node."""
    on_node: dict[Any, list[int]] = {}
    for i, edge in enumerate(edges):
        on_node.setdefault(edge.node, []).append(i)
    returned = {i for i, s in enumerate(small) if not s}
    targets = {edges[i].node for i in returned}
    needed: dict[Any, bool] = {}
    stack: list[tuple[Any, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, expanded = stack.pop()
        if node in needed:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in needed)
            continue
        below = any(needed[child] for child in children)
        for i in on_node.get(node, ()):
            if small[i] and not below:
                returned.add(i)
        needed[node] = below or node in targets or any(i in returned for i in on_node.get(node, ()))
    return sorted(returned)


def coefficients_from(
    problem: MetaProblem, capture: LayerCapture, tangent: Mapping[str, Tensor], grads: list[LayerGradient]
) -> Tensor:
    """``c_i = -<tangent, g_i> / n`` from the per-layer inner products."""
    with torch.no_grad(), phase("inner_products"):
        products = capture.inner_products(tangent, grads).to(problem.weights.device)
    return -products.to(problem.weights.dtype) / problem.global_batch_size


@register_engine(
    "ghost",
    description="exact: per-layer inner products from activations and output gradients",
    exactness=lambda model, params: ghost_exactness_problem(model, params),
    capture=lambda module, params: ForwardCapture(module, params),
    auto=0,
)
def ghost_meta_gradient(problem: MetaProblem) -> MetaGradient:
    """Meta-gradient from per-layer activations and output gradients of the unweighted per-sample losses.

    One backward gives every layer's ``G``; the look-ahead's weighted gradient is formed from them (weights
    multiply, never divide) and they are kept for the inner products, across the meta batch's pass (a
    norm's as its two per-sample sums).
    """
    problem, capture, reused = captured(problem)
    grads = layer_output_gradients(problem, capture, retain=reused)
    with torch.no_grad(), phase("weighted_gradient"):
        weighted = capture.weighted_gradients(grads, problem.weights / problem.weights.shape[0])
    weighted = problem.group.mean({k: weighted[k] for k in problem.params})
    theta_hat = apply_virtual_step(detached_params(problem), weighted, problem.step)
    with torch.enable_grad():
        meta_loss, v = meta_loss_and_gradient(problem, theta_hat)
    v = problem.group.mean(v)
    tangent = {k: problem.step.scale[k] * v[k] for k in v}
    return MetaGradient(coefficients_from(problem, capture, tangent, grads), meta_loss)


# -------------------------------------------------------------------- static exactness check


def ghost_exactness_problem(model: nn.Module, names: Iterable[str]) -> str | None:
    """Why ``"ghost"`` may not be exact for ``model`` with look-ahead parameters ``names``, or ``None``.

    Exact needs samples that do not interact and a rule for every layer holding a look-ahead parameter:
    no BatchNorm in train mode, no sequence-first attention, no unknown layer (a module without
    submodules) that holds parameters or buffers. Parameters held by modules with submodules (a ViT's
    ``pos_embed`` and ``cls_token``) are followed operation by operation.
    """
    names = set(names)
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None:
                return f"{prefix or 'model'} ({kind}) normalises over the batch in train mode"
            continue
        if isinstance(module, nn.MultiheadAttention):
            if not module.batch_first:
                return f"{prefix} (MultiheadAttention) is sequence-first (batch_first=False)"
            if module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
                return f"{prefix} (MultiheadAttention) uses bias_k/bias_v, add_zero_attn or separate kdim/vdim"
            continue
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
            return f"{prefix} (Embedding) uses max_norm or scale_grad_by_freq"
        if isinstance(module, _RULE_MODULES) or next(module.children(), None) is not None:
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own_buffers = [n for n, _ in module.named_buffers(recurse=False)]
        if own or own_buffers:
            return f"{prefix or 'model'} ({kind}) is a layer without a rule holding parameters or buffers"
    if not names:
        return "no look-ahead parameter"
    return None
