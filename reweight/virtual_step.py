"""The virtual (look-ahead) step of Algorithm 1, line 9: ``theta_hat = theta - scale * grad - offset``.

For plain SGD ``scale`` is the learning rate and ``offset`` is zero. Mirroring ``torch.optim.SGD``
(momentum, dampening, Nesterov, weight decay) keeps the update linear in the weighted gradient: only
``scale`` changes and a weight-independent ``offset`` appears, so every engine stays exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["VirtualStep", "plan_virtual_step", "apply_virtual_step"]

VirtualStepMode = Literal["sgd", "optimizer"]


class VirtualStep(NamedTuple):
    """Per-parameter ``scale`` (float) and ``offset`` (tensor, only where non-zero)."""

    scale: dict[str, float]
    offset: dict[str, Tensor]


def plan_virtual_step(
    params: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    mode: VirtualStepMode = "sgd",
    lr: float | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> VirtualStep:
    """The coefficients of the look-ahead for ``params`` under ``optimizer``'s current param groups.

    Args:
        params: the look-ahead parameters by name (the optimizer's own tensors).
        optimizer: the user's optimizer; each parameter's group supplies its current ``lr``.
        mode: ``"sgd"`` (plain SGD step, as the reference code) or ``"optimizer"`` (mirror the momentum,
            dampening, Nesterov and weight decay of a ``torch.optim.SGD``) (default: ``"sgd"``).
        lr: a look-ahead learning rate replacing every group's ``lr`` (default: ``None``, use the groups').
        groups: each parameter's param group by name, when the caller holds them (default: ``None``, looked up
            in ``optimizer.param_groups``).

    Raises:
        ValueError: if ``mode="optimizer"`` and the optimizer is not ``torch.optim.SGD``, or uses ``maximize``.
    """
    if groups is None:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        groups = {name: group_of[id(p)] for name, p in params.items()}
    if mode == "optimizer":
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(
                f"virtual_step='optimizer' mirrors torch.optim.SGD only, got {type(optimizer).__name__}; "
                "use virtual_step='sgd'"
            )
    scale: dict[str, float] = {}
    offset: dict[str, Tensor] = {}
    for name, p in params.items():
        group = groups[name]
        step_lr = float(group["lr"]) if lr is None else lr
        if mode == "sgd":
            scale[name] = step_lr
            continue
        if group.get("maximize", False):
            raise ValueError("virtual_step='optimizer' does not support SGD(maximize=True)")
        momentum, dampening = group["momentum"], group["dampening"]
        nesterov, decay = group["nesterov"], group["weight_decay"]
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if momentum else None
        damp = 1.0 if buf is None else 1.0 - dampening  # torch's first step stores the raw gradient
        a = 1.0 + momentum * damp if nesterov else damp
        b = a * decay * p.detach() if decay else None
        if buf is not None:
            carried = (momentum * momentum if nesterov else momentum) * buf
            b = carried if b is None else b + carried
        scale[name] = step_lr * a
        if b is not None:
            offset[name] = step_lr * b
    return VirtualStep(scale, offset)


def apply_virtual_step(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor], step: VirtualStep
) -> dict[str, Tensor]:
    """``theta_hat = theta - scale * grad - offset`` for each parameter (differentiable in ``grads``)."""
    out = {}
    for name, p in params.items():
        new = p - step.scale[name] * grads[name]
        if name in step.offset:
            new = new - step.offset[name]
        out[name] = new
    return out
