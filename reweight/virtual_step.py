"""The virtual (look-ahead) step of Algorithm 1, line 9: ``theta_hat = theta - scale * grad - offset``.

For plain SGD ``scale`` is the learning rate and ``offset`` is zero. Mirroring the training optimizer keeps the
update linear in the weighted gradient: ``torch.optim.SGD``'s momentum, dampening, Nesterov and weight decay change
the scalar ``scale`` and add a weight-independent ``offset``; ``torch.optim.Adam`` and ``AdamW`` divide each
coordinate by the root of its second moment, held at the last step's value, so ``scale`` becomes a tensor shaped as
the parameter (the carried first moment and the weight decay go into ``offset``). Every engine stays exact for the
step it mirrors; an engine declares whether it accepts per-coordinate scales (``EngineSpec.coordinate_scales``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["VirtualStep", "plan_virtual_step", "apply_virtual_step", "check_virtual_step", "ADAPTIVE"]

VirtualStepMode = Literal["sgd", "optimizer"]
#: The optimizers whose step ``virtual_step="optimizer"`` mirrors with a per-coordinate scale.
ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW)


class VirtualStep(NamedTuple):
    """Per-parameter ``scale`` (a float, or a tensor shaped as the parameter) and ``offset`` (only where
    non-zero)."""

    scale: dict[str, float | Tensor]
    offset: dict[str, Tensor]


def check_virtual_step(mode: str, optimizer: torch.optim.Optimizer, coordinate_scales: bool) -> str:
    """``mode`` (``"sgd"`` or ``"optimizer"``) if the look-ahead can mirror ``optimizer`` with the engine in use,
    which accepts per-coordinate scales or not (``coordinate_scales``: not ``engine="higher"``, not FSDP2 shards).

    Raises:
        ValueError: for ``mode="optimizer"`` with an optimizer other than SGD, Adam and AdamW, or with Adam /
            AdamW where the engine in use takes scalar scales only (the message names the alternatives).
    """
    adaptive = isinstance(optimizer, ADAPTIVE)
    if mode == "optimizer" and not (adaptive or isinstance(optimizer, torch.optim.SGD)):
        raise ValueError(
            f"virtual_step='optimizer' mirrors torch.optim.SGD, Adam and AdamW only, got {type(optimizer).__name__}; "
            "use virtual_step='sgd'"
        )
    if mode == "optimizer" and adaptive and not coordinate_scales:
        raise ValueError(
            f"virtual_step='optimizer' mirrors {type(optimizer).__name__} with a scale per coordinate, which this "
            "engine does not accept (engine='higher', or a model sharded by FSDP2); use virtual_step='sgd' or "
            "another engine"
        )
    return mode


def plan_virtual_step(
    params: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    mode: VirtualStepMode = "sgd",
    lr: float | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> VirtualStep:
    """The coefficients of the look-ahead for ``params`` under ``optimizer``'s current param groups and state.

    Args:
        params: the look-ahead parameters by name (the optimizer's own tensors).
        optimizer: the user's optimizer; each parameter's group supplies its current ``lr``.
        mode: ``"sgd"`` (plain SGD step, as the reference code) or ``"optimizer"``: mirror a ``torch.optim.SGD``
            (momentum, dampening, Nesterov, weight decay) or a ``torch.optim.Adam`` / ``AdamW`` (each
            coordinate's step over the root of its second moment as of the last step, the carried first moment,
            the weight decay; a parameter without a second moment yet takes the plain SGD step) (default:
            ``"sgd"``).
        lr: a look-ahead learning rate replacing every group's ``lr`` (default: ``None``, use the groups').
        groups: each parameter's param group by name, when the caller holds them (default: ``None``, looked up
            in ``optimizer.param_groups``).

    Raises:
        ValueError: if ``mode="optimizer"`` and the optimizer is none of SGD, Adam and AdamW, or uses
            ``maximize``.
    """
    if groups is None:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        groups = {name: group_of[id(p)] for name, p in params.items()}
    adaptive = isinstance(optimizer, ADAPTIVE)
    if mode == "optimizer":
        check_virtual_step(mode, optimizer, coordinate_scales=True)
    scale: dict[str, float | Tensor] = {}
    offset: dict[str, Tensor] = {}
    for name, p in params.items():
        group = groups[name]
        step_lr = float(group["lr"]) if lr is None else lr
        if mode == "sgd":
            scale[name] = step_lr
            continue
        if group.get("maximize", False):
            raise ValueError(f"virtual_step='optimizer' does not support {type(optimizer).__name__}(maximize=True)")
        state = optimizer.state.get(p, {})
        if adaptive:
            decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            scale[name], b = _adam_terms(p.detach(), group, state, step_lr, decoupled)
        else:
            scale[name], b = _sgd_terms(p.detach(), group, state, step_lr)
        if b is not None:
            offset[name] = b
    return VirtualStep(scale, offset)


def _sgd_terms(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any], lr: float) -> tuple[float, Tensor | None]:
    """``torch.optim.SGD``'s step as ``(scale, offset)``."""
    momentum, dampening = group["momentum"], group["dampening"]
    nesterov, decay = group["nesterov"], group["weight_decay"]
    buf = state.get("momentum_buffer") if momentum else None
    damp = 1.0 if buf is None else 1.0 - dampening  # torch's first step stores the raw gradient
    a = 1.0 + momentum * damp if nesterov else damp
    b = a * decay * p if decay else None
    if buf is not None:
        carried = (momentum * momentum if nesterov else momentum) * buf
        b = carried if b is None else b + carried
    return lr * a, None if b is None else lr * b


def _adam_terms(
    p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any], lr: float, decoupled: bool
) -> tuple[float | Tensor, Tensor | None]:
    """``torch.optim.Adam`` / ``AdamW``'s step as ``(scale, offset)``, the second moment held at the last step's
    (the step's own gradient enters it squared); the plain SGD step where there is none yet."""
    second, steps = state.get("max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"), state.get("step")
    on_device = torch.is_tensor(steps) and steps.device.type != "cpu"  # capturable / fused: no host sync
    steps = steps if on_device or steps is None else float(steps)
    if second is None or steps is None or (not on_device and steps == 0):
        return lr, None
    beta1, beta2 = group["betas"]
    denom = (second.detach() / (1 - beta2**steps)).sqrt() + group["eps"]
    first = lr / (1 - beta1 ** (steps + 1))  # the bias correction of the step to come
    scale = first * (1 - beta1) / denom
    offset = first * beta1 * state["exp_avg"].detach() / denom
    decay = group["weight_decay"]
    if decay:
        offset = offset + (lr * decay * p if decoupled else scale * decay * p)
    return scale, offset


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
