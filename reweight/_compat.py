"""Every private torch name the package uses, in one place, each with a public fallback.

Private names change without notice between torch releases. Each helper below uses the private name when
it exists and works, and otherwise a public equivalent (slower or less precise, never wrong), so that a
release that renames one degrades speed, not correctness. Nothing else in ``reweight`` imports a private
torch name; ``tests/test_compat.py`` runs each fallback.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "profiler_enabled",
    "assert_async",
    "load_jvp_decompositions",
    "compiled_original",
    "is_compiled",
    "from_compiled_graph",
    "is_donated_buffer_error",
    "compiled_in_place",
    "eager_calls",
    "tensor_version",
    "convolution_backward",
]


def compiled_original(model: Any) -> Any:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps, or ``None`` for any other object.

    ``OptimizedModule._orig_mod`` is the only way to it; without that attribute a wrapper is not recognised
    and the reweighter works on the wrapper itself (slower, never wrong: its parameters are the same).
    """
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, torch.nn.Module) else None


def is_compiled(model: Any) -> bool:
    """Whether calling ``model`` runs a ``torch.compile``d forward: an ``OptimizedModule`` wrapper, or a module
    compiled in place by ``nn.Module.compile()`` (its private ``_compiled_call_impl``; without that attribute
    such a module counts as eager, and :func:`from_compiled_graph` still recognises its outputs)."""
    if compiled_original(model) is not None:
        return True
    return getattr(model, "_compiled_call_impl", None) is not None


def from_compiled_graph(t: Any, limit: int = 64) -> bool:
    """Whether ``t``'s autograd graph holds a compiled (AOTAutograd) backward within ``limit`` nodes of its root.

    A compiled backward may donate its saved buffers, so its graph must be backpropagated once only
    (``retain_graph=False``); the reweighter then does not reuse it. The node's class is
    ``CompiledFunctionBackward``; the walk stops at ``limit`` nodes (a graph whose compiled part lies deeper
    is caught by :func:`is_donated_buffer_error` instead).
    """
    root = getattr(t, "grad_fn", None)
    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__.startswith("CompiledFunction"):
            return True
        stack.extend(child for child, _ in getattr(node, "next_functions", ()) if child is not None)
    return False


def is_donated_buffer_error(err: BaseException) -> bool:
    """Whether ``err`` is AOTAutograd's refusal to backpropagate a second time through a compiled backward
    that donated its buffers (``torch._functorch.config.donated_buffer``); raised before that backward runs,
    so the graph is intact and the caller may go on without reusing it."""
    return isinstance(err, RuntimeError) and "donated buffer" in str(err)


def compiled_in_place(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of ``module`` (itself included) compiled in place by ``nn.Module.compile()``: those whose
    private ``_compiled_call_impl`` is set (without that attribute, none: their look-ahead forwards then run
    compiled, slower to start, never wrong)."""
    return [m for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]


@contextmanager
def eager_calls(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Within the block, calling one of ``modules`` runs its eager forward, not the compiled one that
    ``nn.Module.compile()`` installed; restored on exit (the caller's own calls stay compiled)."""
    saved = [(m, m._compiled_call_impl) for m in modules]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl


def tensor_version(t: Tensor) -> int | None:
    """``t``'s in-place version counter (``Tensor._version``; bumped by every in-place change), or ``None``
    without it: a cache keyed on it then never hits (slower, never wrong)."""
    version = getattr(t, "_version", None)
    return version if isinstance(version, int) else None


def profiler_enabled() -> bool:
    """Whether a profiler is recording (the private flag is 0.5 us; the public fallback is always ``True``,
    which only opens a ``record_function`` range that no profiler reads)."""
    flag = getattr(torch.autograd, "_profiler_enabled", None)
    return bool(flag()) if callable(flag) else True


def assert_async(condition: Tensor, message: str) -> None:
    """Raise ``RuntimeError(message)`` when ``condition`` (a 0-d bool tensor) is false, without a host sync
    where torch offers a device-side assert; the fallback reads the value (one sync)."""
    check = getattr(torch, "_assert_async", None)
    if callable(check):
        check(condition, message)
    elif not bool(condition):
        raise RuntimeError(message)


def load_jvp_decompositions() -> None:
    """Import torch's forward-AD decompositions with exactly their ``torch.jit.script`` FutureWarning silenced.

    ``fwAD.make_dual`` imports ``torch._decomp.decompositions_for_jvp`` on first use, which scripts its rules
    with the deprecated ``torch.jit.script`` and so warns once per process; nothing else is filtered, and a
    torch without that module (the import happens inside ``make_dual`` then, with its warning) is left alone.
    """
    name = "torch._decomp.decompositions_for_jvp"
    if name in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        try:
            importlib.import_module(name)
        except ImportError:
            pass


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _aten_convolution_backward() -> Any:
    return getattr(torch.ops.aten, "convolution_backward", None)


def convolution_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_input, grad_weight, grad_bias)`` of a (non-transposed) convolution, those ``output_mask``
    asks for: ``torch.ops.aten.convolution_backward`` where torch has it, else a VJP of ``F.conv{k}d``."""
    op = _aten_convolution_backward()
    if op is not None:
        k = weight.ndim - 2
        gi, gw, gb = op(
            grad, x, weight, bias_sizes, stride, padding, dilation, False, [0] * k, groups, list(output_mask)
        )
        return gi, gw, gb
    conv = _CONV[weight.ndim - 2]
    pullback = torch.func.vjp(lambda xx, ww: conv(xx, ww, None, stride, padding, dilation, groups), x, weight)[1]
    gi, gw = pullback(grad)
    gb = grad.sum([d for d in range(grad.ndim) if d != 1]) if output_mask[2] else None
    return (gi if output_mask[0] else None, gw if output_mask[1] else None, gb)
