"""What every meta-gradient engine receives and returns, the engine registry, and shared steps.

An engine is a pure function ``engine(problem: MetaProblem) -> MetaGradient``. It computes the
derivative of the meta loss at the looked-ahead parameters with respect to each per-sample weight,
``c_i = dL_meta(theta_hat(w)) / dw_i``, where the virtual training loss is ``mean_i(w_i * L_i(theta))``.
The reweighter turns ``c`` into the weighting net's gradient by backpropagating ``sum_i c_i * w_i(phi)``;
that is exact because ``c`` does not depend on ``phi`` (see docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from .._batch import Inputs, LogitsFn, as_logits, call_model
from .._profiling import phase
from .._registry import Registry
from ..distributed import DataParallelGroup
from ..lookahead import HeadCapture
from ..losses import PerSampleLoss
from ..sharded import is_sharded, reshard_all
from ..virtual_step import VirtualStep, apply_virtual_step

__all__ = [
    "MetaProblem",
    "MetaGradient",
    "Engine",
    "EngineSpec",
    "ForwardCapture",
    "register_engine",
    "get_engine",
    "get_engine_spec",
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
        capture: the engine's capture of the caller's forward (made by its spec's ``capture`` factory),
            or ``None`` when it declares none or the reweighter does not capture.
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
    capture: Any = None

    @property
    def global_batch_size(self) -> int:
        """Size of the batch over all data-parallel ranks (equal shards assumed)."""
        return self.weights.shape[0] * self.group.world_size

    def meta_now(self) -> tuple[Tensor, Tensor]:
        """The meta batch's per-sample losses and its logits at the current parameters (no grad, buffers cloned):
        what the veto's evidence reads the training losses against, both at the same parameters, and what the
        model's competence on the meta set reads."""
        with torch.no_grad(), phase("evidence_pass"):
            logits = call_model(self.model, {}, self.meta_inputs, self.logits_fn)
            losses = self.meta_loss_fn(logits, self.meta_targets)
        if is_sharded(self.params.values()):
            reshard_all(self.model)  # nothing stays gathered, as after an engine's own forwards
        return losses, logits


class MetaGradient(NamedTuple):
    """``coefficients[i] = dL_meta / dw_i`` (shape ``(batch,)``) and the meta batch's per-sample losses at
    ``theta_hat`` (detached, shape ``(meta_batch,)``; the reweighter reports their mean as ``last_meta_loss`` and
    LossNet's evidence of label noise reads them, :mod:`reweight.noise_evidence`)."""

    coefficients: Tensor
    meta_losses: Tensor

    @property
    def meta_loss(self) -> Tensor:
        """The mean meta loss at ``theta_hat``."""
        return self.meta_losses.mean()


Engine = Callable[[MetaProblem], MetaGradient]
ExactnessCheck = Callable[[nn.Module, Mapping[str, Tensor]], "str | None"]


class ForwardCapture(Protocol):
    """What a capture factory returns: hooks on the model that record the caller's forward while ``armed``.

    The reweighter arms it before each updating step, disarms it inside ``step`` (the look-ahead's own
    forwards are not the caller's), hands it to the engine as ``MetaProblem.capture`` and calls
    :meth:`remove` when the engine changes or on ``remove_hooks()``.
    """

    armed: bool

    def remove(self) -> None: ...


CaptureFactory = Callable[[nn.Module, Callable[[], Mapping[str, Tensor]]], ForwardCapture]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine declares when registered; the reweighter reads nothing else about it.

    Attributes:
        name: the registered name.
        fn: ``fn(problem) -> MetaGradient``.
        description: one line for :func:`list_engines`.
        data_parallel: whether the engine splits over data-parallel ranks (averages its gradients with
            ``problem.group``); an engine that does not is refused under DDP at construction.
        exactness: ``check(model, lookahead_params) -> reason | None``: why the engine may not be exact for
            the model (``None``: exact). ``auto`` skips an engine whose check gives a reason.
        capture: factory ``(model, params_fn) -> ForwardCapture`` of hooks that record the caller's forward
            for the engine to reuse (reaches the engine as ``MetaProblem.capture``).
        needs_head: the engine works on ``lookahead="head"`` only (it reads ``problem.head_features``).
        auto: rank among the engines ``auto`` may pick (lower first); ``None``: never picked by ``auto``.
        requires: called at construction to check that an optional dependency is installed (raises
            ``ImportError`` naming it).
        sharded: the engine handles look-ahead parameters sharded by FSDP2's ``fully_shard`` (``DTensor``
            shards, through the module's own forward and backward: :mod:`reweight.sharded`); an engine that
            does not is refused for such a model at construction.
        coordinate_scales: the engine accepts a look-ahead ``scale`` per coordinate (a tensor shaped as the
            parameter: the step of Adam / AdamW mirrored, :mod:`reweight.virtual_step`) on unsharded parameters;
            otherwise ``virtual_step="optimizer"`` is refused with Adam / AdamW at construction.
    """

    name: str
    fn: Engine
    description: str = ""
    data_parallel: bool = True
    exactness: ExactnessCheck | None = None
    capture: CaptureFactory | None = None
    needs_head: bool = False
    auto: int | None = None
    requires: Callable[[], object] | None = None
    sharded: bool = False
    coordinate_scales: bool = False

    def __call__(self, problem: MetaProblem) -> MetaGradient:
        return self.fn(problem)


_ENGINES: Registry[EngineSpec] = Registry("engine")


def register_engine(
    name: str,
    *,
    description: str = "",
    data_parallel: bool = True,
    exactness: ExactnessCheck | None = None,
    capture: CaptureFactory | None = None,
    needs_head: bool = False,
    auto: int | None = None,
    requires: Callable[[], object] | None = None,
    sharded: bool = False,
    coordinate_scales: bool = False,
) -> Callable[[Engine], Engine]:
    """Register ``engine(problem) -> MetaGradient`` under ``name`` with what it needs (:class:`EngineSpec`).

    Example:
        >>> @register_engine("zero", description="all-zero coefficients (a toy)", data_parallel=True)
        ... def zero(problem):
        ...     return MetaGradient(torch.zeros_like(problem.weights), torch.zeros(len(problem.meta_targets)))
        >>> get_engine_spec("zero").data_parallel
        True
        >>> _ENGINES.unregister("zero")
    """

    def decorator(fn: Engine) -> Engine:
        spec = EngineSpec(
            name, fn, description, data_parallel, exactness, capture, needs_head, auto, requires, sharded,
            coordinate_scales,
        )  # fmt: skip
        _ENGINES.register(name, description=description)(spec)
        return fn

    return decorator


def get_engine_spec(name: str) -> EngineSpec:
    """The spec registered as ``name``; ``ValueError`` listing the registered names otherwise."""
    return _ENGINES.get(name)


def get_engine(name: str) -> Engine:
    """The engine function registered as ``name``; ``ValueError`` listing the registered names otherwise."""
    return _ENGINES.get(name).fn


def list_engines(with_description: bool = False) -> list[str] | dict[str, str]:
    """Names of the registered engines (with descriptions if asked)."""
    return _ENGINES.describe() if with_description else _ENGINES.names()


def engine_specs() -> list[EngineSpec]:
    """Every registered spec, by name."""
    return [_ENGINES.get(name) for name in _ENGINES.names()]


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
    """The meta batch's per-sample losses at ``theta_hat`` (detached) and the gradient ``v`` of their mean with
    respect to it."""
    with phase("meta_pass"):
        leaves = {k: t.detach().requires_grad_() for k, t in theta_hat.items()}
        logits = call_model(problem.model, leaves, problem.meta_inputs, problem.logits_fn)
        losses = problem.meta_loss_fn(logits, problem.meta_targets)
        values = list(leaves.values())
        grads = torch.autograd.grad(losses.mean(), values, allow_unused=True)
    return losses.detach(), dict(zip(leaves, _zeros_for_unused(grads, values)))


def lookahead(problem: MetaProblem) -> tuple[Tensor, dict[str, Tensor]]:
    """First-order part shared by the linearised engines: ``theta_hat`` at ``problem.weights``, then
    ``(meta_losses, tangent)`` with ``tangent_p = scale_p * v_p``, so that
    ``c_i = -<tangent, g_i> / problem.global_batch_size``. Under data parallelism the weighted gradient
    and ``v`` are averaged over ranks: those of the concatenated batches."""
    with torch.enable_grad():
        grads = problem.group.mean(weighted_train_gradient(problem, problem.weights))
        theta_hat = apply_virtual_step(detached_params(problem), grads, problem.step)
        meta_losses, v = meta_loss_and_gradient(problem, theta_hat)
    v = problem.group.mean(v)
    return meta_losses, {k: problem.step.scale[k] * v[k] for k in v}
