"""``mul`` of a tracked tensor and data: a per-feature scale (HF's RMSNorm weight, LayerScale, a gain).

``out = t * x`` with ``t`` a look-ahead parameter (or derived from parameters alone) that broadcasts
against the data ``x`` without spanning the batch: sample ``i``'s gradient of ``t`` is ``G_i * x_i``
summed over the dimensions ``t`` broadcasts over. Where that is smaller than one sample's output the layer
keeps it instead of ``G``; otherwise (or when ``t`` spans the batch dimension) the generic JVP/VJP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..records import LayerGradient, Record, SampleGradients, Tracked, bind
from .fallback import Rule

__all__ = ["ScaleRule"]

_SIGNATURE = (("input", "other"), ())


def _operands(rec: Record, tracked: Tracked) -> tuple[Tensor, Tensor] | None:
    """``(t, x)``: the tracked operand and the data, when the record is a scale of data."""
    a, b = bind(rec.args, rec.kwargs, *_SIGNATURE)
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return None
    if tracked(a) and not tracked(b):
        return a, b
    if tracked(b) and not tracked(a):
        return b, a
    return None


class ScaleRule(Rule):
    functions = (
        torch.mul,
        torch.multiply,
        Tensor.mul,
        Tensor.multiply,
        Tensor.__mul__,
        Tensor.__rmul__,
    )

    def holds_sample_gradients(self, rec: Record, tracked: Tracked) -> bool:
        pair = _operands(rec, tracked)
        if pair is None or rec.size is None:
            return False
        t = pair[0]
        lead = len(rec.size) - t.ndim
        if lead < 0 or (rec.batch_dim >= lead and t.shape[rec.batch_dim - lead] != 1):
            return False  # t spans the batch dimension
        return t.numel() < rec.size.numel() // rec.size[rec.batch_dim]

    def sample_grads(self, rec: Record, tracked: Tracked, grad: Tensor) -> LayerGradient:
        pair = _operands(rec, tracked)
        if pair is None:  # holds_sample_gradients() said no
            return grad
        t, x = pair
        dtype = torch.promote_types(grad.dtype, x.dtype)
        prod = grad.to(dtype) * x.detach().to(dtype)
        padded = (1,) * (prod.ndim - t.ndim) + tuple(t.shape)
        dims = [d for d in range(prod.ndim) if d != rec.batch_dim and padded[d] == 1 and prod.shape[d] != 1]
        if dims:
            prod = prod.sum(dims, keepdim=True)
        return SampleGradients(((t, prod.movedim(rec.batch_dim, 0).reshape(prod.shape[rec.batch_dim], *t.shape)),))
