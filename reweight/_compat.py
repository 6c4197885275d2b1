"""Every private or unstable torch name the package uses, each behind a version guard or a public fallback.

Code elsewhere imports these names from here, never from torch's private modules, so that a torch release
that moves or drops one touches this file only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["convolution_backward"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def convolution_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_input, grad_weight, grad_bias)`` of a (non-transposed) convolution, those ``output_mask``
    asks for: ``torch.ops.aten.convolution_backward`` where torch has it, else a VJP of ``F.conv{k}d``."""
    op = getattr(torch.ops.aten, "convolution_backward", None)
    if op is not None:
        k = weight.ndim - 2
        gi, gw, gb = op(
            grad, x, weight, bias_sizes, stride, padding, dilation, False, [0] * k, groups, list(output_mask)
        )
        return gi, gw, gb
    conv = _CONV[weight.ndim - 2]  # pragma: no cover  (every supported torch has the aten op)
    pullback = torch.func.vjp(lambda xx, ww: conv(xx, ww, None, stride, padding, dilation, groups), x, weight)[1]
    gi, gw = pullback(grad)
    gb = grad.sum([d for d in range(grad.ndim) if d != 1]) if output_mask[2] else None
    return (gi if output_mask[0] else None, gw if output_mask[1] else None, gb)
