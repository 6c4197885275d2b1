"""Batches, outputs and functional model calls: the plumbing shared by the reweighter and the engines."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._compat import compiled_original

__all__ = [
    "Inputs",
    "LogitsFn",
    "as_logits",
    "logits_of",
    "batch_size",
    "to_device",
    "split_batch",
    "call_model",
    "unwrap_model",
    "net_dtype",
]

Inputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


LogitsFn = Callable[[Any], Tensor]


def _describe(outputs: Any) -> str:
    """What a model returned, for error messages: the type, and the keys, fields or length it has."""
    kind = type(outputs).__name__
    if isinstance(outputs, Mapping):
        return f"{kind} with keys {sorted(map(str, outputs))}"
    if isinstance(outputs, tuple) and hasattr(outputs, "_fields"):
        return f"{kind} with fields {list(outputs._fields)}"
    if isinstance(outputs, Sequence) and not isinstance(outputs, str):
        return f"{kind} of length {len(outputs)}"
    if isinstance(outputs, Tensor):
        return f"Tensor of shape {tuple(outputs.shape)}"
    return kind


def as_logits(outputs: Any) -> Tensor:
    """The logits tensor of a model's outputs: a tensor, an object with ``.logits``, or a mapping with ``"logits"``.

    Raises:
        TypeError: for anything else; the message names what the model returned and the way out
            (``logits_fn``).

    Example:
        >>> as_logits({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, Mapping) and outputs:
        hint = f"lambda out: out[{next(iter(outputs))!r}]"
    elif isinstance(outputs, Sequence) and not isinstance(outputs, str) and len(outputs):
        hint = "lambda out: out[0]"
    else:
        hint = "lambda out: <the logits tensor in out>"
    raise TypeError(
        f"the model returned a {_describe(outputs)}, which holds no logits that reweight can find (a Tensor, a "
        "'.logits' attribute or a 'logits' key); say where they are with MetaReweighter(..., "
        f"logits_fn={hint}), used for your outputs and the look-ahead alike"
    )


def logits_of(outputs: Any, logits_fn: LogitsFn = as_logits) -> Tensor:
    """``logits_fn(outputs)``, checked to be a tensor; a failing user ``logits_fn`` is named in the error.

    Raises:
        TypeError: if ``logits_fn`` fails on ``outputs`` or returns something other than a tensor.
    """
    if logits_fn is as_logits:
        return as_logits(outputs)
    try:
        logits = logits_fn(outputs)
    except Exception as err:
        raise TypeError(
            f"logits_fn failed on the model's outputs, a {_describe(outputs)} ({type(err).__name__}: {err}); "
            "pass step() what the model returned, unchanged: logits_fn maps it to the logits"
        ) from err
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits_fn must return a Tensor of logits, got {type(logits).__name__}")
    return logits


def _tensors(inputs: Inputs) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, Tensor)]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return [v for v in inputs if isinstance(v, Tensor)]
    raise TypeError(
        f"inputs must be a Tensor, a tuple/list of tensors or a dict of tensors, got {type(inputs).__name__}"
    )


def batch_size(inputs: Inputs) -> int:
    """The common leading dimension of every tensor in ``inputs``.

    Raises:
        ValueError: if the inputs hold no tensor, a 0-d tensor, or tensors with different batch sizes.
    """
    tensors = _tensors(inputs)
    if not tensors:
        raise ValueError("inputs hold no tensor")
    if any(t.ndim == 0 for t in tensors):
        raise ValueError("inputs must have a leading batch dimension; got a 0-d tensor")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"input tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside ``obj`` (tensor, tuple, list, mapping) to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def split_batch(batch: Any) -> tuple[Inputs, Tensor]:
    """``(inputs, targets)`` from a meta batch: a pair, or a mapping with a ``"labels"`` key (Hugging Face style).

    Raises:
        TypeError: for any other batch layout.
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(
                f"a meta batch given as a mapping needs a 'labels' key; found keys {sorted(map(str, batch))}"
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "meta batches must be (inputs, targets) pairs or mappings with a 'labels' key; "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
    )


def call_model(
    model: nn.Module, tensors: Mapping[str, Tensor], inputs: Inputs, logits_fn: LogitsFn = as_logits
) -> Tensor:
    """Logits (``logits_fn`` of the outputs) of ``model`` run statelessly with ``tensors`` replacing its
    parameters and buffers.

    Buffers are always cloned, so BatchNorm running statistics of ``model`` are never touched.
    """
    state = {name: b.clone() for name, b in model.named_buffers()}
    state.update(tensors)
    if isinstance(inputs, Mapping):
        out = functional_call(model, state, args=(), kwargs=dict(inputs))
    elif isinstance(inputs, Tensor):
        out = functional_call(model, state, args=(inputs,))
    else:
        out = functional_call(model, state, args=tuple(inputs))
    return logits_of(out, logits_fn)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module behind DataParallel / DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif compiled_original(model) is not None:
            model = compiled_original(model)
        else:
            return model


def net_dtype(module: nn.Module) -> torch.dtype:
    """The weighting net's dtype for ``module``: float64 if any of its floating parameters is, else float32."""
    dtypes = [p.dtype for p in module.parameters() if p.is_floating_point()]
    return torch.float64 if torch.float64 in dtypes else torch.float32
