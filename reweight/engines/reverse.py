"""The reference engine: a differentiable (``create_graph``) look-ahead, reverse-over-reverse."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._batch import call_model
from ..virtual_step import apply_virtual_step
from .base import MetaGradient, MetaProblem, detached_params, register_engine, weighted_train_gradient

__all__ = ["reverse_meta_gradient"]


@register_engine(
    "reverse",
    description="create_graph look-ahead and second-order backward (the reference)",
    data_parallel=False,
    auto=2,
    coordinate_scales=True,
)
def reverse_meta_gradient(problem: MetaProblem) -> MetaGradient:
    """Meta-gradient by differentiating through the virtual step, as Meta-Weight-Net's code does.

    Exact; costs a second-order backward and keeps the look-ahead graph in memory. Single process only:
    under data parallelism use a linearised engine (``"forward"``).
    """
    with torch.enable_grad():
        weights = problem.weights.detach().requires_grad_()
        with sdpa_kernel([SDPBackend.MATH]):  # differentiated twice: the fused attention kernels cannot be
            grads = weighted_train_gradient(problem, weights, create_graph=True)
        theta_hat = apply_virtual_step(detached_params(problem), grads, problem.step)
        logits = call_model(problem.model, theta_hat, problem.meta_inputs, problem.logits_fn)
        meta_losses = problem.meta_loss_fn(logits, problem.meta_targets)
        (coefficients,) = torch.autograd.grad(meta_losses.mean(), weights)
    return MetaGradient(coefficients, meta_losses.detach())
