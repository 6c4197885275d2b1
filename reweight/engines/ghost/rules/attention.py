"""``nn.MultiheadAttention``: a rule over its projections.

The capture does not see inside ``F.multi_head_attention_forward``, so this rule runs batched
self-attention (``query is key is value``, packed in-projection, ``need_weights=False``: what
``nn.TransformerEncoderLayer`` calls) as its three steps with public operations: the in-projection
``F.linear`` and the out-projection ``F.linear`` are recorded (the :class:`~.linear.LinearRule` handles
them, batch in dimension 1), and ``F.scaled_dot_product_attention`` between them acts on data only, so
autograd alone carries its gradients. Any other setting runs the function unchanged and, when it takes a
look-ahead parameter, marks the capture unusable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..records import bind
from .fallback import Rule

__all__ = ["AttentionRule"]

_NAMES = (
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
_DEFAULTS = (True, None, True, None, False, None, None, None, None, None, True, False)


def _mask_ok(mask: Tensor | None) -> bool:
    return mask is None or mask.dtype == torch.bool or torch.is_floating_point(mask)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (``True``: not attended) as the additive float mask SDPA adds to the scores."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class AttentionRule(Rule):
    functions = (F.multi_head_attention_forward,)
    modules = (nn.MultiheadAttention,)

    def module_problem(self, module: nn.Module, holds_lookahead: bool) -> str | None:
        if not holds_lookahead:
            return None
        if not module.batch_first:
            return "is sequence-first (batch_first=False)"
        if module.bias_k is not None or module.add_zero_attn or module.in_proj_weight is None:
            return "uses bias_k/bias_v, add_zero_attn or separate kdim/vdim"
        return None

    def run(self, capture: Any, func: Callable, args: tuple, kwargs: dict) -> Any:
        p = dict(zip(_NAMES, bind(args, kwargs, _NAMES, _DEFAULTS)))
        query = p["query"]
        tracked, batched = capture.scan(args, kwargs)
        supported = (
            query is p["key"]
            and query is p["value"]
            and query.ndim == 3
            and not p["use_separate_proj_weight"]
            and p["bias_k"] is None
            and p["bias_v"] is None
            and not p["add_zero_attn"]
            and p["static_k"] is None
            and p["static_v"] is None
            and not p["need_weights"]
            and _mask_ok(p["attn_mask"])
            and _mask_ok(p["key_padding_mask"])
            and batched
        )
        if not supported:
            result = func(*args, **kwargs)
            if tracked:
                capture.fail("nn.MultiheadAttention other than batched self-attention with need_weights=False")
            if batched:
                capture.mark(result)
            return result
        out = self._self_attention(capture, p)
        capture.mark(out)
        return out, None

    def _self_attention(self, capture: Any, p: dict) -> Tensor:
        """Packed in-projection, SDPA, out-projection; sequence-first ``(L, N, E)`` in and out."""
        query = p["query"]
        tgt_len, bsz, embed_dim = query.shape
        num_heads = p["num_heads"]
        head_dim = embed_dim // num_heads
        attn_mask, is_causal = p["attn_mask"], p["is_causal"]
        key_padding_mask = _additive(p["key_padding_mask"], query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None:
            attn_mask = None
        else:
            attn_mask = _additive(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False
        # the copy a batch-first module's transposed input gets inside linear anyway, made here so that the
        # record holds the tensor autograd saves rather than keeping the layer's input alive beside it
        x = query.contiguous()
        capture.mark(x)  # computed here, out of the capture's sight: data all the same
        proj = capture.call(F.linear, (x, p["in_proj_weight"], p["in_proj_bias"]), {}, batch_dim=1)
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
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        dropout_p = p["dropout_p"] if p["training"] else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        attn = attn.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
        capture.mark(attn)
        return capture.call(F.linear, (attn, p["out_proj_weight"], p["out_proj_bias"]), {}, batch_dim=1)
