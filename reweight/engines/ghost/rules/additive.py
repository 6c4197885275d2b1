"""``add`` and ``sub`` of a tracked tensor and data (``x + pos_embed``, a bias, a shift).

The derivatives in the tracked operand do not read the data operand: the record keeps only the data's
shape and dtype (a broadcast zero, no memory), and the generic JVP/VJP run on that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..records import Tracked, shape_only
from .fallback import Rule

__all__ = ["AdditiveRule"]


class AdditiveRule(Rule):
    functions = (
        torch.add,
        torch.sub,
        torch.subtract,
        torch.rsub,
        Tensor.add,
        Tensor.sub,
        Tensor.subtract,
        Tensor.__add__,
        Tensor.__radd__,
        Tensor.__sub__,
        Tensor.__rsub__,
    )

    def stored(self, args: tuple, kwargs: dict, tracked: Tracked) -> tuple[tuple, dict]:
        return tuple(shape_only(a) if isinstance(a, Tensor) and not tracked(a) else a for a in args), kwargs
