"""Cheaper forward-mode rules for batch and layer normalisation, used during the ``forward`` engine's JVP.

PyTorch's built-in forward-AD formula for ``batch_norm`` in training mode costs about three times the
normalisation itself. The Jacobian of a normalisation with respect to its input is symmetric (for batch
norm: ``w * invstd * (I - 11^T/N - xhat xhat^T/N)`` within each channel), so its JVP is the *backward*
kernel applied to the tangent: one fused ATen call. The parameters' tangents add ``xhat * tw + tb``.
The results equal the built-in formulas to rounding (tested); only the speed differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["FastNormJVP"]


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.ndim - 2)


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b


class _BatchNormTrain(torch.autograd.Function):
    """Batch norm with batch statistics; updates the running statistics it is given, like ``F.batch_norm``."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps):  # type: ignore[override]
        xhat, mean, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
        y = xhat if weight is not None or bias is not None else xhat.clone()  # y must not alias xhat
        if weight is not None:
            y = y * weight.view(_channel_shape(x))
        if bias is not None:
            y = y + bias.view(_channel_shape(x))
        return y, xhat, mean, invstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, *_, eps = inputs
        _, xhat, mean, invstd = output
        ctx.save_for_forward(x, weight, xhat, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(xhat, mean, invstd)

    @staticmethod
    def jvp(ctx: Any, tx, tw, tb, *_):  # type: ignore[override]
        x, weight, xhat, mean, invstd = ctx.saved_tensors
        ty = None
        if tx is not None:
            ty = torch.ops.aten.native_batch_norm_backward(
                tx, x, weight, None, None, mean, invstd, True, ctx.eps, [True, False, False]
            )[0]
        if tw is not None:
            ty = _add(ty, xhat * tw.view(_channel_shape(x)))
        if tb is not None:
            ty = _add(ty, tb.view(_channel_shape(x)).expand_as(xhat))
        if ty is None:
            ty = torch.zeros_like(xhat)
        return ty, None, None, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, normalized_shape, weight, bias, eps):  # type: ignore[override]
        xhat, mean, rstd = torch.native_layer_norm(x, normalized_shape, None, None, eps)
        y = xhat if weight is not None or bias is not None else xhat.clone()  # y must not alias xhat
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y, xhat, mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, normalized_shape, weight, _, _ = inputs
        _, xhat, mean, rstd = output
        ctx.save_for_forward(x, weight, xhat, mean, rstd)
        ctx.normalized_shape = normalized_shape
        ctx.mark_non_differentiable(xhat, mean, rstd)

    @staticmethod
    def jvp(ctx: Any, tx, _, tw, tb, __):  # type: ignore[override]
        x, weight, xhat, mean, rstd = ctx.saved_tensors
        ty = None
        if tx is not None:  # d xhat = rstd * P tx, the backward of the affine-free norm; w applies after P
            ty = torch.ops.aten.native_layer_norm_backward(
                tx, x, ctx.normalized_shape, mean, rstd, None, None, [True, False, False]
            )[0]
            if weight is not None:
                ty = ty * weight
        if tw is not None:
            ty = _add(ty, xhat * tw)
        if tb is not None:
            ty = _add(ty, tb.expand_as(xhat))
        if ty is None:
            ty = torch.zeros_like(xhat)
        return ty, None, None, None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


class FastNormJVP(TorchFunctionMode):
    """Routes ``F.batch_norm`` (batch statistics) and ``F.layer_norm`` through the rules above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            x, running_mean, running_var = (
                args[0],
                _arg(args, kwargs, 1, "running_mean"),
                _arg(args, kwargs, 2, "running_var"),
            )
            training = _arg(args, kwargs, 5, "training", False)
            if training or running_mean is None:
                weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
                momentum, eps = _arg(args, kwargs, 6, "momentum", 0.1), _arg(args, kwargs, 7, "eps", 1e-5)
                return _BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps)[0]
        elif func is F.layer_norm:
            x, shape = args[0], tuple(_arg(args, kwargs, 1, "normalized_shape"))
            weight, bias, eps = (
                _arg(args, kwargs, 2, "weight"),
                _arg(args, kwargs, 3, "bias"),
                _arg(args, kwargs, 4, "eps", 1e-5),
            )
            return _LayerNorm.apply(x, shape, weight, bias, eps)[0]
        return func(*args, **kwargs)
