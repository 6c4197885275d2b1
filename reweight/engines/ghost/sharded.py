"""The ghost engine on a model sharded by FSDP2 (``fully_shard``): the same meta-gradient, through the module.

``functional_call`` cannot replace parameters that FSDP's hooks install themselves, so every pass runs the
module's own forward and backward (:mod:`reweight.sharded`):

1. The training batch's forward under a :class:`LayerCapture` whose tracked tensors are the unsharded
   parameters each unit installs (a forward pre-hook on every unit, after FSDP's, names them), and the backward of the
   unweighted per-sample losses to the recorded outputs: every layer's ``G`` (as in one process).
2. The same forward again (same RNG) and the backward of ``mean_i(w_i L_i)``: FSDP reduce-scatters the
   look-ahead's weighted gradient into sharded ``.grad``, averaged over the ranks (the global batch's).
3. ``theta_hat`` written in place into the local shards; the meta batch's forward and backward give ``v``
   as sharded ``.grad`` (averaged over the ranks); the shards are restored.
4. The per-layer inner products, one record at a time: the layer's tangent ``scale * v`` and its
   parameters' values are gathered (``full_tensor()``) for that record only and dropped after it; tensors
   computed from parameters alone are recomputed from the gathered values (the captured ones are views of
   unsharded storage FSDP has freed).

The user's ``.grad`` are set aside and restored; the optimizer is not touched. A rank holds, beyond what
FSDP's own forward and backward hold, the captured activations and ``G`` (as ghost in one process), a copy
of its local shards, and one layer's full parameters and tangent at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..._batch import _tensors
from ..._profiling import phase
from ..._rng import replayable_rng
from ...sharded import (
    clear_grads,
    dtensor_type,
    forward_logits,
    fsdp_units,
    gathered,
    moved_shards,
    reshard_all,
    saved_grads,
)
from ..base import MetaGradient, MetaProblem
from .capture import LayerCapture
from .engine import _sample_contribution, layer_output_gradients
from .records import Record, SampleGradients
from .rules import rule_for
from .rules.fallback import jvp

__all__ = ["sharded_ghost_meta_gradient"]


def _naming_hooks(model: nn.Module, names: Mapping[str, Tensor], capture: LayerCapture) -> list[Any]:
    """Forward pre-hooks on every FSDP unit (after FSDP's own, which installs the unit's unsharded
    parameters on their modules) that name in ``capture`` each look-ahead parameter installed unsharded.

    By unit, not by the parameter's own module: a module may use another's parameter without calling it
    (``nn.MultiheadAttention`` passes ``out_proj.weight`` to the functional form); a parameter missed here
    would be data to the capture, its share of the meta-gradient silently dropped."""
    kind = dtensor_type()
    assert kind is not None  # the parameters are DTensors
    modules = dict(model.named_modules())
    owners = []
    for full in names:
        prefix, _, attr = full.rpartition(".")
        owners.append((modules[prefix], attr, full))

    def hook(module: nn.Module, args: Any) -> None:
        for owner, attr, full in owners:
            t = getattr(owner, attr)
            if not isinstance(t, kind):  # installed unsharded by this unit or an enclosing one
                capture.names[id(t)] = full
                capture.params[full] = t

    return [m.register_forward_pre_hook(hook) for m in fsdp_units(model)]


def _captured_forward(problem: MetaProblem) -> tuple[LayerCapture, Tensor]:
    capture = LayerCapture({}, _tensors(problem.inputs), problem.weights.shape[0])
    handles = _naming_hooks(problem.model, problem.params, capture)
    try:
        with torch.enable_grad(), capture:
            logits = forward_logits(problem.model, problem.inputs, problem.logits_fn)
    finally:
        for h in handles:
            h.remove()
    return capture, logits


def _grads_of(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}


def _swapped(obj: Any, values: Mapping[int, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return values.get(id(obj), obj)
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        return type(obj)(_swapped(item, values) for item in obj)
    return obj


class _Gathered:
    """One record's look-ahead parameters and tangents gathered in full (in the record's argument order, the
    same on every rank), and its parameter-derived tensors recomputed from gathered values (``derived``: the
    chain's outputs by id, with their values and tangents), with the record's arguments pointing to them: the
    captured ones are views of unsharded storage FSDP has freed since."""

    def __init__(
        self,
        rec: Record,
        capture: LayerCapture,
        params: Mapping[str, Tensor],
        tangent: Mapping[str, Tensor],
        derived: Mapping[int, tuple[Tensor, Tensor | None]],
    ) -> None:
        values: dict[int, Tensor] = {}
        self.tangents: dict[int, Tensor] = {}
        for obj in (*rec.args, *rec.kwargs.values()):
            for t in obj if isinstance(obj, list | tuple) else (obj,):
                if not isinstance(t, Tensor) or id(t) in values:
                    continue
                if id(t) in capture.names:
                    name = capture.names[id(t)]
                    values[id(t)] = gathered(params[name].detach())
                    self.tangents[id(values[id(t)])] = gathered(tangent[name])
                elif id(t) in derived:
                    values[id(t)], derived_tangent = derived[id(t)]
                    if derived_tangent is not None:
                        self.tangents[id(values[id(t)])] = derived_tangent
        self.record: Record = rec._replace(
            args=_swapped(rec.args, values), kwargs={k: _swapped(v, values) for k, v in rec.kwargs.items()}
        )

    def tangent_of(self, t: Tensor) -> Tensor | None:
        """The record's ``tangent_of``: its gathered parameters' and derived tensors' tangents."""
        return self.tangents.get(id(t))

    def value(self) -> Tensor:
        """The record's output recomputed from the gathered values (a chain record: parameters alone)."""
        return self.record.func(*self.record.args, **self.record.kwargs)


def _inner_products(
    capture: LayerCapture, params: Mapping[str, Tensor], tangent: Mapping[str, Tensor], grads: list[Any]
) -> Tensor:
    """``sum_layers <J_theta out_i [tangent], G_i>`` per sample, one record's full tensors at a time."""
    # the tensors computed from parameters alone (small: ``pos[:, :L]``), recomputed with their tangents
    derived: dict[int, tuple[Tensor, Tensor | None]] = {}
    for rec in capture.chain:
        here = _Gathered(rec, capture, params, tangent, derived)
        if rec.output is not None:
            derived[id(rec.output)] = (here.value(), jvp(here.record, here.tangent_of))
    total: Tensor | None = None
    for rec, grad in zip(capture.records, grads):
        if grad is None:
            continue
        if isinstance(grad, SampleGradients):
            held = {id(t): gathered(tangent[capture.names[id(t)]]) for t, _ in grad.pairs if id(t) in capture.names}
            held.update({id(t): d[1] for t, _ in grad.pairs if (d := derived.get(id(t))) and d[1] is not None})
            part = _sample_contribution(_table(held), grad)
        else:
            here = _Gathered(rec, capture, params, tangent, derived)
            part = rule_for(rec.func).contribution(here.record, here.tangent_of, grad)
        if part is not None:
            total = part if total is None else total + part
    if total is None:
        return torch.zeros(capture.n, dtype=problem_dtype(params), device=next(iter(params.values())).device)
    return total


def _table(tangents: Mapping[int, Tensor]) -> Any:
    """``tangent_of`` over a table keyed by tensor id."""
    return lambda t: tangents.get(id(t))


def problem_dtype(params: Mapping[str, Tensor]) -> torch.dtype:
    return next(iter(params.values())).dtype


def sharded_ghost_meta_gradient(problem: MetaProblem) -> MetaGradient:
    """Ghost's meta-gradient on an FSDP2 model, every pass through the module's own forward and backward."""
    model, params = problem.model, problem.params
    everything = list(model.parameters())
    device = next(iter(params.values())).device
    with replayable_rng(device) as rewind, saved_grads(model):
        capture, logits = _captured_forward(problem)
        capture.check()
        grads = layer_output_gradients(problem._replace(train_logits=logits), capture, retain=False)
        del logits
        rewind()  # the same forward again: the same dropout masks (CPU and accelerator RNG)
        with torch.enable_grad(), phase("weighted_gradient"):
            losses = problem.loss_fn(forward_logits(model, problem.inputs, problem.logits_fn), problem.targets)
            (problem.weights.to(losses.dtype) * losses).mean().backward()
        weighted = _grads_of(params)  # sharded, averaged over the ranks
        clear_grads(everything)
        reshard_all(model)
        try:
            with moved_shards(params, weighted, problem.step), torch.enable_grad(), phase("meta_pass"):
                clear_grads(everything)  # the weighted gradient's shards are freed once applied
                meta_logits = forward_logits(model, problem.meta_inputs, problem.logits_fn)
                meta_losses = problem.meta_loss_fn(meta_logits, problem.meta_targets)
                meta_losses.mean().backward()
        finally:
            reshard_all(model)  # nothing of theta_hat stays gathered
        tangent = _grads_of(params)  # v, sharded and averaged over the ranks; scaled in place (ours alone)
    with torch.no_grad():
        for k, t in tangent.items():
            t.mul_(problem.step.scale[k])
    with torch.no_grad(), phase("inner_products"):
        products = _inner_products(capture, params, tangent, grads).to(problem.weights.device)
    coefficients = -products.to(problem.weights.dtype) / problem.global_batch_size
    return MetaGradient(coefficients, meta_losses.detach())
