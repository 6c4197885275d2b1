"""Models sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): what is accepted, and the in-place look-ahead.

``fully_shard`` turns each parameter into a ``DTensor`` sharded on dim 0 over a 1-D device mesh; the module
all-gathers a unit's parameters in its pre-forward hook, installs them as plain parameters for the
forward, frees them after it (the root keeps its own until the backward) and reduce-scatters the
gradients in the backward into sharded ``.grad``, averaged over the ranks. ``torch.func.functional_call``
cannot replace those parameters (the hooks install their own), so an engine that declares
``sharded=True`` (:class:`~reweight.engines.base.EngineSpec`) works through the module itself:

- :func:`saved_grads`: the user's ``.grad`` of every parameter is set aside, the engine's backwards write
  fresh sharded gradients, and the user's are put back;
- :func:`moved_shards`: ``theta_hat`` is written in place into the local shards (the saved local shards,
  ``1 / world`` of the model, are restored afterwards), and every unit is resharded before and after, so
  that the next forward gathers the moved (then the restored) values;
- :func:`gathered`: one tensor's full value (an all-gather), for per-layer work one layer at a time.

Nothing here gathers the whole model: beyond what FSDP's own forward and backward hold, a rank holds its
saved shards and one layer's full tensors at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn

from .virtual_step import VirtualStep

__all__ = [
    "dtensor_type",
    "is_sharded",
    "sharded_layout_problem",
    "fsdp_process_group",
    "saved_grads",
    "moved_shards",
    "gathered",
    "reshard_all",
]

ALTERNATIVE = "train with DistributedDataParallel (exact under reweighting, see docs/distributed.md)"


def dtensor_type() -> type | None:
    """``DTensor``, or ``None`` in a torch built without distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch built without distributed
        return None
    return DTensor


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    kind = dtensor_type()
    return kind is not None and any(isinstance(t, kind) for t in tensors)


def fsdp_units(module: nn.Module) -> list[Any]:
    """The modules ``fully_shard`` made units of (``FSDPModule``), in ``modules()`` order."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def sharded_layout_problem(module: nn.Module) -> str | None:
    """Why ``module``'s ``DTensor`` parameters are not a layout the sharded look-ahead handles exactly, or
    ``None``: every parameter must be an FSDP2 shard (``Shard(0)`` on one 1-D mesh, no tensor parallelism),
    under ``fully_shard`` without a mixed-precision or CPU-offload policy (untested)."""
    kind = dtensor_type()
    assert kind is not None
    from torch.distributed.tensor import Shard

    named: list[tuple[str, Any]] = list(module.named_parameters())  # DTensors (checked below)
    plain = next((name for name, p in named if not isinstance(p, kind)), None)
    if plain is not None:
        return f"parameter {plain!r} is a plain tensor beside DTensor parameters (a partly sharded model)"
    meshes = set()
    for name, p in named:
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            return (
                f"parameter {name!r} is a DTensor with placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D "
                "mesh (tensor parallelism or HSDP); only FSDP2's Shard(0) on a 1-D mesh is supported"
            )
        meshes.add(p.device_mesh)
    if len(meshes) > 1:
        return "the DTensor parameters live on different device meshes"
    fsdp = fsdp_units(module)
    if not fsdp:
        return "the DTensor parameters are not managed by fully_shard (no FSDPModule in the model)"
    for m in fsdp:
        group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
        if group is None:
            continue
        policy = group.mp_policy
        if any(getattr(policy, f) is not None for f in ("param_dtype", "reduce_dtype", "output_dtype")):
            return "fully_shard's MixedPrecisionPolicy changes dtypes (untested); use torch.autocast instead"
        if group.fsdp_params and group.fsdp_params[0].offload_to_cpu:
            return "fully_shard's CPUOffloadPolicy is not supported"
    return None


def fsdp_process_group(module: nn.Module) -> Any | None:
    """The process group of an FSDP2 model's mesh, or ``None`` when no parameter is a ``DTensor``."""
    kind = dtensor_type()
    if kind is None:
        return None
    for p in module.parameters():
        if isinstance(p, kind):
            return cast(Any, p).device_mesh.get_group()
    return None


def reshard_all(module: nn.Module) -> None:
    """Free every unit's unsharded parameters (the next forward gathers the shards' current values)."""
    for m in fsdp_units(module):
        m.reshard()


@contextmanager
def saved_grads(module: nn.Module) -> Iterator[None]:
    """Set the user's ``.grad`` of every parameter aside for the block (each starts at ``None``), then put them
    back, whatever the block did with them."""
    params = list(module.parameters())
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def clear_grads(params: Iterable[Tensor]) -> None:
    for p in params:
        p.grad = None


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (sharing its storage), or ``t``."""
    kind = dtensor_type()
    return cast(Any, t).to_local() if kind is not None and isinstance(t, kind) else t


@contextmanager
def moved_shards(params: Mapping[str, Tensor], grads: dict[str, Tensor], step: VirtualStep) -> Iterator[None]:
    """``theta_hat = theta - scale * grad - offset`` written in place into each parameter's local shard for the
    block; the saved local shards are copied back afterwards. ``grads`` is emptied once applied (its shards
    are not held through the block). The caller reshards the model around it."""
    with torch.no_grad():
        shards = {k: local(p) for k, p in params.items()}
        saved = {k: s.clone() for k, s in shards.items()}
        try:
            for k, s in shards.items():
                s.sub_(local(grads.pop(k)).to(s.dtype), alpha=float(step.scale[k]))  # SGD's step on shards
                if k in step.offset:
                    s.sub_(local(step.offset[k]).to(s.dtype))
            grads.clear()
            yield
        finally:
            for k, s in shards.items():
                s.copy_(saved[k])


def gathered(t: Tensor) -> Tensor:
    """The full value of a ``DTensor`` (an all-gather, a collective: every rank calls it in the same order)."""
    kind = dtensor_type()
    return cast(Any, t).full_tensor() if kind is not None and isinstance(t, kind) else t


def forward_logits(module: nn.Module, inputs: Any, logits_fn: Any) -> Tensor:
    """The module's own forward (its FSDP hooks gather and free the parameters) on ``inputs``."""
    from ._batch import logits_of

    if isinstance(inputs, Mapping):
        out = module(**inputs)
    elif isinstance(inputs, Tensor):
        out = module(inputs)
    else:
        out = module(*inputs)
    return logits_of(out, logits_fn)
