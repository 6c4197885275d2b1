"""The ghost engine's passes, each a loop over the recorded operations and their rules.

``c_i = -<scale * v, g_i> / n`` splits over the operations that consume a look-ahead parameter. For an
operation ``out = f(a, theta)`` that acts on each sample separately, sample ``i``'s share is
``<J_theta f(a_i) [scale * v], G_i>`` with ``G_i = dL_i / d out_i``: for ``nn.Linear`` that is
``sum_t G_{i,t}^T V a_{i,t}``, one matmul with the cost of the layer's forward (the per-sample inner
product of DP-SGD's ghost clipping). The passes:

1. :func:`layer_output_gradients`: one backward of the unweighted per-sample losses (``grad_outputs`` of
   ones: no division by weights, so zero and tiny weights are exact) gives every recorded layer's ``G``;
   a layer whose rule holds per-sample gradients (smaller than ``G``) forms them in a pre-hook while the
   backward runs.
2. :func:`weighted_gradients`: the look-ahead's ``sum_i (w_i / n) g_i`` from the same ``G`` and inputs, by
   each rule's weight-gradient formula, then back through the operations on parameters alone.
3. The meta batch's forward and backward at the looked-ahead parameters (``v``).
4. :func:`inner_products` and :func:`coefficients_from`: each rule's per-sample ``<J out_i [tangent], G_i>``.

When the caller's forward was captured (``MetaProblem.capture``) nothing of the training batch is
recomputed; otherwise the engine runs its own forward under a capture. Exact when samples do not interact
and activations keep the batch in dimension 0; what the capture cannot do exactly raises
``NotImplementedError`` (``auto`` then falls back to ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ..._profiling import phase
from ...sharded import is_sharded
from ...virtual_step import apply_virtual_step
from ..base import MetaGradient, MetaProblem, detached_params, meta_loss_and_gradient, register_engine
from .capture import ForwardCapture, LayerCapture, captured
from .exactness import ghost_exactness_problem
from .records import LayerGradient, SampleGradients
from .rules import rule_for
from .rules.fallback import jvp, vjp

__all__ = [
    "ghost_meta_gradient",
    "layer_output_gradients",
    "weighted_gradients",
    "inner_products",
    "coefficients_from",
]


def layer_output_gradients(problem: MetaProblem, capture: LayerCapture, retain: bool) -> list[LayerGradient]:
    """What each recorded layer holds for the step: its ``G``, or its rule's per-sample gradients
    (:meth:`LayerCapture.holds_sample_gradients`) formed from ``G`` while the backward runs (a pre-hook on
    its node), so that those ``G`` never all exist at once."""
    records = capture.records
    edges = [rec.edge for rec in records if rec.edge is not None]
    assert len(edges) == len(records)  # a batched operation's record keeps its output's edge
    logits = problem.train_logits
    assert logits is not None  # the captured forward's (take() checks it) or the engine's own
    if not records:
        return []
    with torch.enable_grad():
        losses = problem.loss_fn(logits, problem.targets)
    small = [capture.holds_sample_gradients(rec) for rec in records]
    returned = _returned_records(losses.grad_fn, edges, small)
    held: list[LayerGradient] = [None] * len(records)

    def hold(i: int, grad: Tensor) -> LayerGradient:
        if not small[i]:
            return grad
        with torch.no_grad():
            return rule_for(records[i].func).sample_grads(records[i], capture.tracked, grad)

    def keep(i: int) -> Callable[[tuple[Tensor | None, ...]], None]:
        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            grad = grad_outputs[edges[i].output_nr]
            if grad is not None:
                held[i] = hold(i, grad)

        return hook

    handles = [edges[i].node.register_prehook(keep(i)) for i in range(len(edges)) if small[i] and i not in returned]
    try:
        with torch.enable_grad(), phase("layer_gradients"):
            grads = torch.autograd.grad(
                losses,
                [edges[i] for i in returned],
                grad_outputs=torch.ones_like(losses),
                retain_graph=retain,
                allow_unused=True,
            )
    finally:
        for handle in handles:
            handle.remove()
    for i, grad in zip(returned, grads):
        held[i] = None if grad is None else hold(i, grad)
    return held


def _returned_records(root: Any, edges: list[GradientEdge], small: list[bool]) -> list[int]:
    """Indices of the records whose output gradient the backward must return: every record holding ``G``,
    and a record holding per-sample gradients whose node leads to no returned gradient (autograd would not
    run it, so its pre-hook would not fire: the first layers of a network).

    One post-order walk of the graph from ``root`` (the losses' node): a node is needed when it or a node
    after it in the backward is a returned edge's node."""
    on_node: dict[Any, list[int]] = {}
    for i, edge in enumerate(edges):
        on_node.setdefault(edge.node, []).append(i)
    returned = {i for i, s in enumerate(small) if not s}
    targets = {edges[i].node for i in returned}
    needed: dict[Any, bool] = {}
    stack: list[tuple[Any, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, expanded = stack.pop()
        if node in needed:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in needed)
            continue
        below = any(needed[child] for child in children)
        for i in on_node.get(node, ()):
            if small[i] and not below:
                returned.add(i)
        needed[node] = below or node in targets or any(i in returned for i in on_node.get(node, ()))
    return sorted(returned)


def weighted_gradients(capture: LayerCapture, grads: Iterable[LayerGradient], coef: Tensor) -> dict[str, Tensor]:
    """``sum_i coef_i g_i`` for every look-ahead parameter from each layer's ``G`` (each rule's
    ``weighted_grads`` of ``G`` scaled per sample) or per-sample gradients, then back through the operations
    on parameters alone (``coef = weights / n`` gives the look-ahead's weighted gradient)."""
    total: dict[int, Tensor] = {}

    def add(t: Tensor, g: Tensor) -> None:
        total[id(t)] = g if id(t) not in total else total[id(t)] + g

    for rec, grad in zip(capture.records, grads):
        if grad is None:
            continue
        if isinstance(grad, SampleGradients):
            for t, g in grad.pairs:
                add(t, torch.tensordot(coef.to(g.dtype), g, dims=([0], [0])))
            continue
        shape = [1] * grad.ndim
        shape[rec.batch_dim] = -1
        for t, g in rule_for(rec.func).weighted_grads(rec, capture.tracked, grad * coef.to(grad.dtype).view(shape)):
            add(t, g)
    for rec in reversed(capture.chain):  # parameter-derived tensors, latest first
        if rec.output is not None and id(rec.output) in total:
            for t, g in vjp(rec, capture.tracked, total.pop(id(rec.output))):
                add(t, g)
    return {k: total[id(p)].to(p.dtype) if id(p) in total else torch.zeros_like(p) for k, p in capture.params.items()}


def inner_products(capture: LayerCapture, tangent: Mapping[str, Tensor], grads: Iterable[LayerGradient]) -> Tensor:
    """``sum_layers <J_theta out_i [tangent], G_i>`` per sample, shape ``(n,)``."""
    tangents: dict[int, Tensor] = {}

    def tangent_of(t: Tensor) -> Tensor | None:
        if id(t) in capture.names:
            return tangent.get(capture.names[id(t)])
        return tangents.get(id(t))

    for rec in capture.chain:
        derived = jvp(rec, tangent_of)
        if derived is not None and rec.output is not None:  # else constant along the tangent, as if untracked
            tangents[id(rec.output)] = derived
    total: Tensor | None = None
    for rec, grad in zip(capture.records, grads):
        if grad is None:
            continue
        if isinstance(grad, SampleGradients):
            part = _sample_contribution(tangent_of, grad)
        else:
            part = rule_for(rec.func).contribution(rec, tangent_of, grad)
        if part is not None:
            total = part if total is None else total + part
    if total is None:
        some = next(iter(capture.params.values()))
        return torch.zeros(capture.n, dtype=some.dtype, device=some.device)
    return total


def _sample_contribution(tangent_of: Callable[[Tensor], Tensor | None], held: SampleGradients) -> Tensor | None:
    """``sum_p <tangent_p, g_p[i]>`` per sample."""
    total = None
    for t, g in held.pairs:
        tt = tangent_of(t)
        if tt is not None:
            part = g.reshape(g.shape[0], -1) @ tt.to(g.dtype).flatten()
            total = part if total is None else total + part
    return total


def coefficients_from(
    problem: MetaProblem, capture: LayerCapture, tangent: Mapping[str, Tensor], grads: list[LayerGradient]
) -> Tensor:
    """``c_i = -<tangent, g_i> / n`` from the per-layer inner products."""
    with torch.no_grad(), phase("inner_products"):
        products = inner_products(capture, tangent, grads).to(problem.weights.device)
    return -products.to(problem.weights.dtype) / problem.global_batch_size


@register_engine(
    "ghost",
    description="exact: per-layer inner products from activations and output gradients",
    data_parallel=True,
    exactness=ghost_exactness_problem,
    capture=ForwardCapture,
    auto=0,
    sharded=True,
    coordinate_scales=True,
)
def ghost_meta_gradient(problem: MetaProblem) -> MetaGradient:
    """Meta-gradient from per-layer activations and output gradients of the unweighted per-sample losses.

    One backward gives every layer's ``G``; the look-ahead's weighted gradient is formed from them (weights
    multiply, never divide) and they are kept for the inner products, across the meta batch's pass (as
    per-sample gradients where a rule holds those). On an FSDP2 model every pass goes through the module
    itself (:func:`.sharded.sharded_ghost_meta_gradient`).
    """
    if is_sharded(problem.params.values()):
        from .sharded import sharded_ghost_meta_gradient

        return sharded_ghost_meta_gradient(problem)
    problem, capture, reused = captured(problem)
    grads = layer_output_gradients(problem, capture, retain=reused)
    with torch.no_grad(), phase("weighted_gradient"):
        weighted = weighted_gradients(capture, grads, problem.weights / problem.weights.shape[0])
    weighted = problem.group.mean({k: weighted[k] for k in problem.params})
    theta_hat = apply_virtual_step(detached_params(problem), weighted, problem.step)
    with torch.enable_grad():
        meta_losses, v = meta_loss_and_gradient(problem, theta_hat)
    v = problem.group.mean(v)
    tangent = {k: problem.step.scale[k] * v[k] for k in v}
    return MetaGradient(coefficients_from(problem, capture, tangent, grads), meta_losses)
