"""The look-ahead through the ``higher`` library's differentiable optimizer (optional extra).

Exact and equivalent to ``reverse``; offered for users who already build on ``higher``. The virtual
step is a throwaway ``torch.optim.SGD`` with one group per look-ahead parameter at its ``scale``; the
weight-independent ``offset`` of a mirrored momentum step is added to the gradient via ``grad_callback``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._batch import call_model, logits_of
from .base import MetaGradient, MetaProblem, register_engine

__all__ = ["higher_meta_gradient"]


def import_higher() -> ModuleType:
    """The ``higher`` module; ``ImportError`` naming the extra to install when it is missing."""
    try:
        import higher
    except ImportError as err:  # pragma: no cover - exercised without the extra
        raise ImportError('engine="higher" needs the higher package: pip install "reweight[higher]"') from err
    return higher


def _call(module, inputs, logits_fn):
    if isinstance(inputs, dict):
        return logits_of(module(**inputs), logits_fn)
    if isinstance(inputs, torch.Tensor):
        return logits_of(module(inputs), logits_fn)
    return logits_of(module(*inputs), logits_fn)


@register_engine(
    "higher",
    description="exact: higher's differentiable SGD (optional extra)",
    data_parallel=False,
    requires=lambda: import_higher(),
)
def higher_meta_gradient(problem: MetaProblem) -> MetaGradient:
    """Meta-gradient by unrolling one differentiable SGD step with ``higher.innerloop_ctx``."""
    higher = import_higher()
    model = problem.model
    order = list(model.parameters())
    index = {id(p): i for i, p in enumerate(order)}
    names = [k for k in problem.params if problem.step.scale[k] != 0]
    groups = [{"params": [problem.params[k]], "lr": problem.step.scale[k]} for k in names]
    if not groups:  # nothing moves: no coefficient, the meta losses at the parameters as they are
        with torch.no_grad():
            meta_logits = call_model(model, {}, problem.meta_inputs, problem.logits_fn)  # buffers cloned
            meta_losses = problem.meta_loss_fn(meta_logits, problem.meta_targets)
        return MetaGradient(torch.zeros_like(problem.weights), meta_losses)
    extra = {
        index[id(problem.params[k])]: problem.step.offset[k] / problem.step.scale[k]
        for k in names
        if k in problem.step.offset
    }

    def add_offsets(grads):
        return [g + extra[i] if i in extra and g is not None else g for i, g in enumerate(grads)]

    with torch.enable_grad():
        weights = problem.weights.detach().requires_grad_()
        throwaway = torch.optim.SGD(groups, lr=0.0)
        with higher.innerloop_ctx(model, throwaway, copy_initial_weights=True) as (fmodel, diffopt):
            with sdpa_kernel([SDPBackend.MATH]):  # differentiated twice: the fused attention kernels cannot be
                losses = problem.loss_fn(_call(fmodel, problem.inputs, problem.logits_fn), problem.targets)
                diffopt.step((weights * losses).mean(), grad_callback=add_offsets)
            meta_logits = _call(fmodel, problem.meta_inputs, problem.logits_fn)
            meta_losses = problem.meta_loss_fn(meta_logits, problem.meta_targets)
            (coefficients,) = torch.autograd.grad(meta_losses.mean(), weights)
    return MetaGradient(coefficients, meta_losses.detach())
