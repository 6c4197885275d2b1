"""``F.conv1d`` / ``F.conv2d`` of data: closed forms from one convolution backward.

The weighted gradient is the convolution's weight and bias gradient of the scaled ``G``; the output
tangent the convolution of the input with the tangent kernel. A convolution whose weight is smaller than
one sample's output keeps per-sample weight gradients instead of ``G``: one grouped convolution backward
with the batch folded into the channels (``n * groups`` groups). String padding (``"same"``/``"valid"``)
goes by the generic VJP.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ...._compat import convolution_backward
from ..records import LayerGradient, Record, SampleGradients, TangentOf, Tracked, bind
from .fallback import Rule

__all__ = ["ConvRule"]

_SIGNATURE = (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1))
_DIMS = {F.conv1d: 1, F.conv2d: 2}


def _parameter_grads(
    rec: Record, grad: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool, batch_groups: int = 1
) -> tuple[Tensor | None, Tensor | None]:
    """Weight and bias gradients of ``rec``'s convolution for output gradient ``grad`` and input ``x``, in
    ``grad``'s dtype; ``batch_groups`` multiplies the groups (the batch folded into the channels)."""
    stride, padding, dilation, groups = bind(rec.args, rec.kwargs, *_SIGNATURE)[3:]
    k = _DIMS[rec.func]

    def tup(v: Any) -> list[int]:
        return list(v) if isinstance(v, tuple | list) else [v] * k

    _, gw, gb = convolution_backward(
        grad,
        x.to(grad.dtype),
        weight.detach().to(grad.dtype),
        [weight.shape[0]] if need_bias else None,
        tup(stride),
        tup(padding),
        tup(dilation),
        groups * batch_groups,
        (False, need_weight, need_bias),
    )
    return gw, gb


class ConvRule(Rule):
    functions = (F.conv1d, F.conv2d)
    modules = (nn.Conv1d, nn.Conv2d)

    def holds_sample_gradients(self, rec: Record, tracked: Tracked) -> bool:
        x, weight, _, _, padding = bind(rec.args, rec.kwargs, *_SIGNATURE)[:5]
        if rec.size is None or tracked(x) or isinstance(padding, str) or rec.batch_dim != 0:
            return False
        return weight.numel() < rec.size[1:].numel()

    def sample_grads(self, rec: Record, tracked: Tracked, grad: Tensor) -> LayerGradient:
        x, weight, bias = bind(rec.args, rec.kwargs, *_SIGNATURE)[:3]
        n = grad.shape[0]
        pairs = []
        if tracked(weight):
            per_sample, _ = _parameter_grads(
                rec,
                grad.reshape(1, -1, *grad.shape[2:]),
                x.detach().reshape(1, -1, *x.shape[2:]),
                # the kernel's shape only: a weight gradient does not read the weight (whose storage an
                # FSDP2 unit has freed by the time the first layers' gradients are held)
                weight.new_zeros((n * weight.shape[0], *weight.shape[1:])),
                need_weight=True,
                need_bias=False,
                batch_groups=n,
            )
            if per_sample is not None:
                pairs.append((weight, per_sample.view(n, *weight.shape)))
        if bias is not None and tracked(bias):
            pairs.append((bias, grad.sum(list(range(2, grad.ndim)))))
        return SampleGradients(tuple(pairs))

    def weighted_grads(self, rec: Record, tracked: Tracked, wg: Tensor) -> list[tuple[Tensor, Tensor]]:
        x, weight, bias, _, padding = bind(rec.args, rec.kwargs, *_SIGNATURE)[:5]
        if tracked(x) or isinstance(padding, str):
            return super().weighted_grads(rec, tracked, wg)
        need_b = bias is not None and tracked(bias)
        gw, gb = _parameter_grads(rec, wg, x.detach(), weight, tracked(weight), need_b)
        return [(t, g) for t, g in ((weight, gw), (bias, gb)) if g is not None]

    def output_tangent(self, rec: Record, tangent_of: TangentOf) -> Tensor | None:
        x, weight, bias, *rest = bind(rec.args, rec.kwargs, *_SIGNATURE)
        if tangent_of(x) is not None:
            return super().output_tangent(rec, tangent_of)
        x = x.detach()
        tw = tangent_of(weight)
        tb = None if bias is None else tangent_of(bias)
        if tw is None:
            return None if tb is None else tb.to(x.dtype).view([1, -1] + [1] * (x.ndim - 2))
        return rec.func(x, tw.to(x.dtype), None if tb is None else tb.to(x.dtype), *rest)
