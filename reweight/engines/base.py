"""What every meta-gradient engine receives and returns, the engine registry, and shared steps.

An engine is a pure function ``engine(problem: MetaProblem) -> MetaGradient``. It computes the
derivative of the meta loss at the looked-ahead parameters with respect to each per-sample weight,
``c_i = dL_meta(theta_hat(w)) / dw_i``, where the virtual training loss is ``mean_i(w_i * L_i(theta))``.
The reweighter turns ``c`` into the weighting net's gradient by backpropagating ``sum_i c_i * w_i(phi)``;
that is exact because ``c`` does not depend on ``phi`` (see docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._batch import Inputs, LogitsFn, as_logits, call_model
from .._profiling import phase
from .._registry import Registry
from ..distributed import DataParallelGroup
from ..lookahead import HeadCapture
from ..losses import PerSampleLoss
from ..virtual_step import VirtualStep, apply_virtual_step

__all__ = [
    "MetaProblem",
    "MetaGradient",
    "Engine",
    "register_engine",
    "get_engine",
    "list_engines",
    "weighted_train_gradient",
    "meta_loss_and_gradient",
]


class MetaProblem(NamedTuple):
    """One meta step's data, read-only for the engine.

    Attributes:
        model: the bare module, called statelessly (``torch.func.functional_call``) with cloned buffers.
        params: look-ahead parameters by name: the model's own tensors (engines must not modify them).
        step: the virtual step's coefficients for ``params``.
        inputs, targets: the training batch.
        weights: ``(batch,)`` detached weights at which the look-ahead is taken.
        meta_inputs, meta_targets: the clean meta batch.
        loss_fn, meta_loss_fn: per-sample losses for the training and the meta batch.
        train_logits: the caller's logits of ``inputs`` with their autograd graph, when they may be reused
            for first-order gradients (saves one forward), else ``None``.
        group: data-parallel ranks; the look-ahead and ``v`` are those of the global batch.
        head, head_features: with ``lookahead="head"``, the hook on the final Linear layer and the
            training batch's inputs to it from the caller's forward.
        logits_fn: the model's outputs to logits, for every forward an engine makes (``call_model``'s
            fourth argument).
    """

    model: nn.Module
    params: Mapping[str, Tensor]
    step: VirtualStep
    inputs: Inputs
    targets: Tensor
    weights: Tensor
    meta_inputs: Inputs
    meta_targets: Tensor
    loss_fn: PerSampleLoss
    meta_loss_fn: PerSampleLoss
    train_logits: Tensor | None = None
    group: DataParallelGroup = DataParallelGroup()
    head: HeadCapture | None = None
    head_features: Tensor | None = None
    logits_fn: LogitsFn = as_logits

    @property
    def global_batch_size(self) -> int:
        """Size of the batch over all data-parallel ranks (equal shards assumed)."""
        return self.weights.shape[0] * self.group.world_size


class MetaGradient(NamedTuple):
    """``coefficients[i] = dL_meta / dw_i`` (shape ``(batch,)``) and the meta loss at ``theta_hat`` (detached)."""

    coefficients: Tensor
    meta_loss: Tensor


Engine = Callable[[MetaProblem], MetaGradient]

_ENGINES: Registry[Engine] = Registry("engine")


def register_engine(name: str, *, description: str = "") -> Callable[[Engine], Engine]:
    """Register ``engine(problem) -> MetaGradient`` under ``name``."""
    return _ENGINES.register(name, description=description)


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``; ``ValueError`` listing the registered names otherwise."""
    return _ENGINES.get(name)


def list_engines(with_description: bool = False) -> list[str] | dict[str, str]:
    """Names of the registered engines (with descriptions if asked)."""
    return _ENGINES.describe() if with_description else _ENGINES.names()


def _zeros_for_unused(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def detached_params(problem: MetaProblem, requires_grad: bool = False) -> dict[str, Tensor]:
    """Fresh leaf tensors sharing storage with the look-ahead parameters."""
    return {k: p.detach().requires_grad_(requires_grad) for k, p in problem.params.items()}


def weighted_train_gradient(problem: MetaProblem, weights: Tensor, create_graph: bool = False) -> dict[str, Tensor]:
    """``grad_theta mean_i(weights_i * L_i(theta))`` over the look-ahead parameters.

    Reuses ``problem.train_logits`` (the caller's forward) when given and ``create_graph`` is false.
    With ``create_graph`` the gradient is differentiable in ``weights``.
    """
    if problem.train_logits is not None and not create_graph:
        params = dict(problem.params)
        logits = problem.train_logits
        retain = True  # the caller still owns this graph
    else:
        params = detached_params(problem, requires_grad=True)
        logits = call_model(problem.model, params, problem.inputs, problem.logits_fn)
        retain = create_graph
    losses = problem.loss_fn(logits, problem.targets)
    values = list(params.values())
    with phase("weighted_gradient"):
        grads = torch.autograd.grad(
            (weights * losses).mean(), values, create_graph=create_graph, retain_graph=retain, allow_unused=True
        )
    return dict(zip(params, _zeros_for_unused(grads, values)))


def meta_loss_and_gradient(problem: MetaProblem, theta_hat: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean meta loss at ``theta_hat`` (detached there) and its gradient ``v`` with respect to it."""
    with phase("meta_pass"):
        leaves = {k: t.detach().requires_grad_() for k, t in theta_hat.items()}
        logits = call_model(problem.model, leaves, problem.meta_inputs, problem.logits_fn)
        loss = problem.meta_loss_fn(logits, problem.meta_targets).mean()
        values = list(leaves.values())
        grads = torch.autograd.grad(loss, values, allow_unused=True)
    return loss.detach(), dict(zip(leaves, _zeros_for_unused(grads, values)))


def lookahead(problem: MetaProblem) -> tuple[Tensor, dict[str, Tensor]]:
    """First-order part shared by the linearised engines: ``theta_hat`` at ``problem.weights``, then
    ``(meta_loss, tangent)`` with ``tangent_p = scale_p * v_p``, so that
    ``c_i = -<tangent, g_i> / problem.global_batch_size``. Under data parallelism the weighted gradient
    and ``v`` are averaged over ranks: those of the concatenated batches."""
    with torch.enable_grad():
        grads = problem.group.mean(weighted_train_gradient(problem, problem.weights))
        theta_hat = apply_virtual_step(detached_params(problem), grads, problem.step)
        meta_loss, v = meta_loss_and_gradient(problem, theta_hat)
    v = problem.group.mean(v)
    return meta_loss, {k: problem.step.scale[k] * v[k] for k in v}
