"""Normalisations: ``F.layer_norm`` and ``F.group_norm`` of data, and ``F.batch_norm``.

``out = x_hat * weight + bias`` with ``x_hat`` a function of one sample's data: a layer or group norm of
data keeps per sample ``sum G * x_hat`` and ``sum G`` over the positions (the size of its parameters)
instead of ``G``. Batch norm in train mode normalises over the batch and is refused; in eval mode it is a
per-sample affine map, handled by the generic JVP/VJP.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..records import LayerGradient, Record, SampleGradients, TangentOf, Tracked, bind, sum_over
from .fallback import Rule

__all__ = ["AffineNormRule", "LayerNormRule", "GroupNormRule", "BatchNormRule"]

_BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)
_BN_SIGNATURE = (
    ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    (None, None, False, 0.1, 1e-5),
)


class AffineNormRule(Rule, ABC):
    """A normalisation of one sample's data followed by an elementwise affine map.

    Subclasses give :attr:`signature` (input, shape or groups, weight, bias, eps first) and
    :meth:`positions`, the input's dimensions that the parameters do not span (the batch excepted)."""

    signature: tuple[tuple[str, ...], tuple]

    @abstractmethod
    def normalise(self, x: Tensor, shape: object, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        """The operation itself (with ``weight = bias = None``: ``x_hat``)."""

    def arguments(self, rec: Record) -> list:
        """``[input, shape or groups, weight, bias, eps]`` of the call."""
        return bind(rec.args, rec.kwargs, *self.signature)

    @abstractmethod
    def positions(self, rec: Record, b: list) -> list[int]:
        """The dimensions of the input that the parameters do not span, the batch excepted."""

    def _parts(self, rec: Record) -> tuple[list, list[int]]:
        b = self.arguments(rec)
        return b, self.positions(rec, b)

    def holds_sample_gradients(self, rec: Record, tracked: Tracked) -> bool:
        return not tracked(self.arguments(rec)[0])

    def sample_grads(self, rec: Record, tracked: Tracked, grad: Tensor) -> LayerGradient:
        return self._per_sample(rec, tracked, grad)

    def _per_sample(self, rec: Record, tracked: Tracked, grad: Tensor) -> SampleGradients:
        """Per sample ``sum G * x_hat`` (weight) and ``sum G`` (bias) over the positions."""
        (x, shape, weight, bias, eps), reduce = self._parts(rec)
        dtype = torch.promote_types(grad.dtype, x.dtype)
        grad, x = grad.to(dtype), x.detach().to(dtype)
        pairs = []
        if weight is not None and tracked(weight):
            pairs.append((weight, sum_over(self.normalise(x, shape, None, None, eps).mul_(grad), reduce)))
        if bias is not None and tracked(bias):
            pairs.append((bias, sum_over(grad, reduce)))
        return SampleGradients(tuple(pairs))

    def weighted_grads(self, rec: Record, tracked: Tracked, wg: Tensor) -> list[tuple[Tensor, Tensor]]:
        if not self.holds_sample_gradients(rec, tracked):  # a parameter-derived input
            return super().weighted_grads(rec, tracked, wg)
        return [(t, g.sum(0)) for t, g in self._per_sample(rec, tracked, wg).pairs]

    def output_tangent(self, rec: Record, tangent_of: TangentOf) -> Tensor | None:
        x, shape, weight, bias, eps = self.arguments(rec)
        if tangent_of(x) is not None:
            return super().output_tangent(rec, tangent_of)
        x = x.detach()
        tw = None if weight is None else tangent_of(weight)
        tb = None if bias is None else tangent_of(bias)
        if tw is None and tb is None:
            return None
        shape_of = (tw if tw is not None else tb).shape  # type: ignore[union-attr]
        tw = x.new_zeros(shape_of) if tw is None else tw.to(x.dtype)
        tb = x.new_zeros(shape_of) if tb is None else tb.to(x.dtype)
        return self.normalise(x, shape, tw, tb, eps)


class LayerNormRule(AffineNormRule):
    functions = (F.layer_norm,)
    modules = (nn.LayerNorm,)
    signature = (("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5))

    def normalise(self, x: Tensor, shape: object, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        return F.layer_norm(x, shape, weight, bias, eps)  # type: ignore[arg-type]

    def positions(self, rec: Record, b: list) -> list[int]:
        return [d for d in range(b[0].ndim - len(b[1])) if d != rec.batch_dim]

    def record_problem(self, args: tuple, kwargs: dict, out: Tensor, batch_dim: int) -> str | None:
        shape = bind(args, kwargs, *self.signature)[1]
        return "layer_norm normalises over the batch dimension" if batch_dim >= out.ndim - len(shape) else None


class GroupNormRule(AffineNormRule):
    functions = (F.group_norm,)
    modules = (nn.GroupNorm,)
    signature = (("input", "num_groups", "weight", "bias", "eps"), (None, None, 1e-5))

    def normalise(self, x: Tensor, shape: object, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        return F.group_norm(x, shape, weight, bias, eps)  # type: ignore[arg-type]

    def positions(self, rec: Record, b: list) -> list[int]:
        return list(range(2, b[0].ndim))

    def record_problem(self, args: tuple, kwargs: dict, out: Tensor, batch_dim: int) -> str | None:
        return "group_norm whose batch is not its first dimension" if batch_dim != 0 else None


class BatchNormRule(Rule):
    """Refused in train mode (it couples the samples); in eval mode the generic path is exact."""

    functions = (F.batch_norm,)
    modules = _BATCH_NORMS

    def module_problem(self, module: nn.Module, holds_lookahead: bool) -> str | None:
        if module.training or getattr(module, "running_mean", None) is None:
            return "normalises over the batch in train mode"
        return None

    def refusal(self, args: tuple, kwargs: dict, batched: bool) -> str | None:
        if batched and bind(args, kwargs, *_BN_SIGNATURE)[5]:
            return "batch norm in train mode couples the samples of a batch"
        return None
