"""Closed-form meta-gradient for a look-ahead restricted to the final Linear layer.

With ``z = W h + b`` and ``delta_i = dL_i/dz_i``, the per-sample head gradients are
``g_i = (delta_i h_i^T, delta_i)``, so the virtual step, ``v`` and ``c_i = -<scale * v, g_i> / n`` need
only the training batch's features (captured from the caller's forward), one no-grad forward of the
meta batch and a few small matrix products: no extra forward or backward through the body.

Token-level heads (a causal LM's ``lm_head``: features ``(batch, seq, hidden)``, logits ``(batch, seq,
vocab)``) use the same closed form over every position: ``delta`` has the logits' shape (zero at ignored
tokens), the weighted gradient sums ``delta_{i,t} h_{i,t}^T`` over samples and positions, and sample ``i``'s
inner product sums over its own positions, ``sum_t delta_{i,t}^T (scale * v_W) h_{i,t} + delta_{i,t}^T
(scale * v_b)``. Its cost is that of the head's forward on the batch (one ``(tokens, vocab) x (vocab,
hidden)`` product) and one no-grad forward of the meta batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._batch import call_model
from ..virtual_step import apply_virtual_step
from .base import MetaGradient, MetaProblem, register_engine

__all__ = ["linear_head_meta_gradient"]


def _logit_gradients(problem: MetaProblem, logits: Tensor) -> Tensor:
    """``delta_i = dL_i / dz_i`` for any per-sample loss (each ``L_i`` depends on ``z_i`` only)."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        (delta,) = torch.autograd.grad(problem.loss_fn(z, problem.targets).sum(), z)
    return delta


@register_engine(
    "linear_head",
    description="exact closed form for lookahead='head' (final Linear layer)",
    needs_head=True,
    auto=0,
    coordinate_scales=True,
)
def linear_head_meta_gradient(problem: MetaProblem) -> MetaGradient:
    """Exact meta-gradient of a head-only look-ahead, from features and logit gradients."""
    head = problem.head
    if head is None or problem.head_features is None:
        raise ValueError("engine 'linear_head' needs lookahead='head'")
    w_name, b_name = head.weight_name, head.bias_name
    if not set(problem.params) <= {w_name, b_name}:
        raise ValueError("engine 'linear_head' moves only the final Linear layer; use lookahead='head'")
    h = problem.head_features.detach()
    if h.ndim < 2:
        raise ValueError(f"engine 'linear_head' needs (batch, ..., features) inputs to the head, got {tuple(h.shape)}")
    weight = problem.params[w_name].detach()
    bias = None if head.module.bias is None else head.module.bias.detach()
    delta = _logit_gradients(problem, F.linear(h.to(weight.dtype), weight, bias))
    h = h.to(delta.dtype)
    n = h.shape[0]
    per_sample = (problem.weights.to(delta.dtype) / n).view(n, *[1] * (delta.ndim - 1))
    scaled = (delta * per_sample).reshape(-1, delta.shape[-1])  # every (sample, position) row
    grads = {w_name: scaled.T @ h.reshape(-1, h.shape[-1])}
    if b_name in problem.params:
        grads[b_name] = scaled.sum(0)
    grads = problem.group.mean(grads)
    theta_hat = apply_virtual_step({k: p.detach() for k, p in problem.params.items()}, grads, problem.step)

    with torch.no_grad():
        # fills head.features with the meta batch's
        call_model(problem.model, {}, problem.meta_inputs, problem.logits_fn)
    if head.features is None:
        raise RuntimeError(f"the forward of the meta batch did not run the head {head.name!r}")
    meta_h = head.features.detach().to(weight.dtype)
    head.features = None  # the meta batch's: never taken for a later training batch
    with torch.enable_grad():
        leaves = {k: t.detach().requires_grad_() for k, t in theta_hat.items()}
        meta_bias = leaves.get(b_name, bias) if b_name is not None else None
        meta_logits = F.linear(meta_h, leaves[w_name], meta_bias)
        meta_losses = problem.meta_loss_fn(meta_logits, problem.meta_targets)
        v = dict(zip(leaves, torch.autograd.grad(meta_losses.mean(), list(leaves.values()))))
    v = problem.group.mean(v)
    jvp = ((delta @ (problem.step.scale[w_name] * v[w_name])) * h).reshape(n, -1).sum(1)
    if b_name in v:
        jvp = jvp + (delta @ (problem.step.scale[b_name] * v[b_name])).reshape(n, -1).sum(1)
    return MetaGradient(-jvp / problem.global_batch_size, meta_losses.detach())
