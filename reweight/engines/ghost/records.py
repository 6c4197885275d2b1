"""What a captured operation is: its record, its bound arguments, per-sample gradients; no rule lives here.

A :class:`Record` is one call ``func(*args, **kwargs)`` of the training forward that takes a look-ahead
parameter (or a tensor computed from parameters alone). The rules in :mod:`.rules` read records through
:func:`bind`; the engine hands them a ``tracked`` predicate (is this tensor a look-ahead parameter or
derived from parameters alone?) and a ``tangent_of`` lookup (its tangent along the look-ahead direction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = [
    "Record",
    "SampleGradients",
    "LayerGradient",
    "Tracked",
    "TangentOf",
    "bind",
    "walk",
    "shape_only",
    "batched_dot",
    "sum_over",
]

Tracked = Callable[[Tensor], bool]
TangentOf = Callable[[Tensor], "Tensor | None"]


class Record(NamedTuple):
    """One operation on a look-ahead parameter: ``func(*args, **kwargs)``, its output's gradient edge
    (``None`` for an operation on parameters alone), that output (kept for parameters alone only), the
    batch dimension of a batched output and its shape."""

    func: Callable
    args: tuple
    kwargs: dict
    edge: GradientEdge | None
    output: Tensor | None
    batch_dim: int
    size: torch.Size | None = None


class SampleGradients(NamedTuple):
    """One layer's per-sample parameter gradients, held instead of its output gradient ``G`` where smaller.

    ``pairs`` holds ``(tensor, g)`` with ``g[i]`` sample ``i``'s gradient of that tracked tensor (a
    look-ahead parameter or one derived from parameters alone): the weighted gradient is
    ``sum_i coef_i g[i]`` and the inner products ``<tangent, g[i]>``, small matmuls.
    """

    pairs: tuple[tuple[Tensor, Tensor], ...]


LayerGradient = Tensor | SampleGradients | None


def bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list:
    """Positional view of a call of a function with signature ``names`` (trailing ``defaults``)."""
    bound = list(args) + [None] * (len(names) - len(args))
    first_default = len(names) - len(defaults)
    for i, name in enumerate(names):
        if i >= len(args):
            bound[i] = kwargs.get(name, defaults[i - first_default] if i >= first_default else None)
    return bound


def walk(obj: Any) -> Iterable[Tensor]:
    """The tensors of one argument: itself, or the tensors of a list or tuple."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            if isinstance(item, Tensor):
                yield item


def shape_only(t: Tensor) -> Tensor:
    """A tensor of ``t``'s shape and dtype that holds no memory (a broadcast zero)."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def batched_dot(u: Tensor, v: Tensor, batch_dim: int) -> Tensor:
    """``sum`` of ``u * v`` over every dimension but ``batch_dim`` (``u`` may broadcast against ``v``).

    A multiply and a reduction: on the CPU several times faster than a batched ``bmm`` of row vectors."""
    dtype = torch.promote_types(u.dtype, v.dtype)
    prod = u.to(dtype) * v.to(dtype)
    return prod.sum([d for d in range(prod.ndim) if d != batch_dim])


def sum_over(t: Tensor, dims: list[int]) -> Tensor:
    """``t`` summed over ``dims`` (none: ``t`` itself; ``Tensor.sum([])`` would sum over everything)."""
    return t.sum(dims) if dims else t
