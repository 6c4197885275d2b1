"""``F.linear``: closed forms for a linear layer of data (``nn.Linear``, attention projections, LoRA).

With input ``a`` (data) and output gradient ``G``: the weighted gradient is ``G_w^T a`` and ``sum G_w``;
the output tangent ``a V^T + b``; sample ``i``'s inner product ``sum_t G_{i,t}^T V a_{i,t}``, taken on the
narrower side of ``V`` (``<G V, a>`` when ``V`` has fewer columns than rows). A parameter-derived input
goes by the generic JVP/VJP.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..records import Record, TangentOf, Tracked, batched_dot, bind
from .fallback import Rule

__all__ = ["LinearRule"]

_SIGNATURE = (("input", "weight", "bias"), (None,))


def _bound(rec: Record) -> list:
    return bind(rec.args, rec.kwargs, *_SIGNATURE)


class LinearRule(Rule):
    functions = (F.linear,)
    modules = (nn.Linear,)

    def weighted_grads(self, rec: Record, tracked: Tracked, wg: Tensor) -> list[tuple[Tensor, Tensor]]:
        x, weight, bias = _bound(rec)
        if tracked(x):
            return super().weighted_grads(rec, tracked, wg)
        flat = wg.reshape(-1, wg.shape[-1])
        out = []
        if tracked(weight):
            out.append((weight, flat.T @ x.detach().reshape(-1, x.shape[-1]).to(wg.dtype)))
        if bias is not None and tracked(bias):
            out.append((bias, flat.sum(0)))
        return out

    def output_tangent(self, rec: Record, tangent_of: TangentOf) -> Tensor | None:
        x, weight, bias = _bound(rec)
        if tangent_of(x) is not None:
            return super().output_tangent(rec, tangent_of)
        x = x.detach()
        tw = tangent_of(weight)
        tb = None if bias is None else tangent_of(bias)
        if tw is None:
            return None if tb is None else tb.to(x.dtype)
        return F.linear(x, tw.to(x.dtype), None if tb is None else tb.to(x.dtype))

    def contribution(self, rec: Record, tangent_of: TangentOf, grad: Tensor) -> Tensor | None:
        x, weight, bias = _bound(rec)
        tw = tangent_of(weight)
        if tangent_of(x) is None and tw is not None and tw.shape[1] < tw.shape[0]:  # <G V, a>
            tb = None if bias is None else tangent_of(bias)
            grad = grad.to(x.dtype)
            part = batched_dot(grad @ tw.to(x.dtype), x.detach(), rec.batch_dim)
            if tb is not None:
                part = part + batched_dot(grad, tb.to(x.dtype), rec.batch_dim)
            return part
        return super().contribution(rec, tangent_of, grad)
