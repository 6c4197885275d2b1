"""``F.embedding``: the weighted gradient is an ``index_add`` of ``G`` into the table's rows, the output
tangent a lookup in the tangent table (zero at ``padding_idx``). ``max_norm`` (renormalises the table in
place) and ``scale_grad_by_freq`` (couples the samples that share a token) are refused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..records import Record, TangentOf, Tracked, bind
from .fallback import Rule

__all__ = ["EmbeddingRule"]

_SIGNATURE = (
    ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    (None, None, 2.0, False, False),
)
_UNSUPPORTED = "uses max_norm or scale_grad_by_freq"


class EmbeddingRule(Rule):
    functions = (F.embedding,)
    modules = (nn.Embedding,)

    def module_problem(self, module: nn.Module, holds_lookahead: bool) -> str | None:
        return _UNSUPPORTED if module.max_norm is not None or module.scale_grad_by_freq else None

    def record_problem(self, args: tuple, kwargs: dict, out: Tensor, batch_dim: int) -> str | None:
        b = bind(args, kwargs, *_SIGNATURE)
        return f"embedding {_UNSUPPORTED}" if b[3] is not None or b[5] else None

    def weighted_grads(self, rec: Record, tracked: Tracked, wg: Tensor) -> list[tuple[Tensor, Tensor]]:
        x, weight, padding_idx = bind(rec.args, rec.kwargs, *_SIGNATURE)[:3]
        if not tracked(weight):
            return []
        g = torch.zeros_like(weight, dtype=wg.dtype).index_add_(0, x.reshape(-1), wg.reshape(-1, weight.shape[1]))
        if padding_idx is not None:
            g[padding_idx] = 0
        return [(weight, g)]

    def output_tangent(self, rec: Record, tangent_of: TangentOf) -> Tensor | None:
        x, weight, padding_idx = bind(rec.args, rec.kwargs, *_SIGNATURE)[:3]
        tw = tangent_of(weight)
        if tw is None:
            return None
        out = F.embedding(x, tw.to(weight.dtype))
        if padding_idx is not None:
            if padding_idx < 0:
                padding_idx += weight.shape[0]
            out = out * (x != padding_idx).unsqueeze(-1).to(out.dtype)
        return out
