"""Approximate meta-gradient from two no-grad forwards: a central difference along ``scale * v``.

Step-size rule: the perturbation ``h * t`` has norm ``cbrt(eps) * max(1, ||theta||)``, where ``eps`` is
the machine epsilon of the parameters' dtype and ``theta`` the look-ahead parameters. ``cbrt(eps)``
balances the central difference's O(h^2) truncation error against its O(eps / h) rounding error;
scaling by ``||theta||`` makes the step relative to the parameters it perturbs. Both forwards draw the
same dropout masks.
"""

from __future__ import annotations

import torch

from .._batch import call_model
from .._rng import replayable_rng
from .base import MetaGradient, MetaProblem, detached_params, lookahead, register_engine

__all__ = ["finite_difference_meta_gradient", "finite_difference_step"]


def finite_difference_step(params: dict[str, torch.Tensor], tangent: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scalar ``h`` of the rule above (a 0-d tensor; 0 when the tangent is zero)."""
    dtype = next(iter(params.values())).dtype
    theta_norm = torch.stack([p.double().square().sum() for p in params.values()]).sum().sqrt()
    t_norm = torch.stack([t.double().square().sum() for t in tangent.values()]).sum().sqrt()
    size = torch.finfo(dtype).eps ** (1 / 3) * torch.clamp(theta_norm, min=1.0)
    return torch.where(t_norm > 0, size / t_norm.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(t_norm))


@register_engine(
    "finite_difference", description="approximate: central difference, two no-grad forwards", coordinate_scales=True
)
def finite_difference_meta_gradient(problem: MetaProblem) -> MetaGradient:
    """``<scale * v, g_i> ~ (L_i(theta + h t) - L_i(theta - h t)) / 2h``; no second-order or forward-mode AD."""
    meta_losses, tangent = lookahead(problem)
    params = detached_params(problem)
    h = finite_difference_step(params, tangent)
    h = torch.where(h == 0, torch.ones_like(h), h)  # a zero tangent: up == down, so 0 / 2 (no host sync)
    device = problem.weights.device
    with torch.no_grad(), replayable_rng(device) as rewind:
        hd = h.to(problem.weights.dtype)
        plus = {k: p + hd * tangent[k].to(p.dtype) for k, p in params.items()}
        minus = {k: p - hd * tangent[k].to(p.dtype) for k, p in params.items()}
        up = problem.loss_fn(call_model(problem.model, plus, problem.inputs, problem.logits_fn), problem.targets)
        rewind()
        down = problem.loss_fn(call_model(problem.model, minus, problem.inputs, problem.logits_fn), problem.targets)
    jvp = (up.double() - down.double()) / (2 * h)
    return MetaGradient((-jvp / problem.global_batch_size).to(problem.weights.dtype), meta_losses)
