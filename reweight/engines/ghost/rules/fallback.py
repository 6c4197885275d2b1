"""The rule every operation without one of its own gets: the JVP and VJP of that one operation.

:class:`Rule` is the base of every rule; its methods are the generic path. The tangent of a recorded
operation's output is a forward-mode JVP of the operation in its tracked inputs (the data detached); the
weighted gradient of its tracked inputs is a VJP of the operation with the output gradient already scaled
per sample. Both are exact for an operation that acts on each sample separately: ``x + pos_embed``,
``cat([cls_token.expand(...), x])``, batch norm in eval mode, a parameter-derived input of a linear layer.
A rule of its own for an op family replaces one or more methods by closed forms (one matmul instead of a
JVP) or holds per-sample gradients instead of the output gradient (:meth:`Rule.holds_sample_gradients`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..records import LayerGradient, Record, TangentOf, Tracked, batched_dot, walk

__all__ = ["Rule", "FALLBACK", "jvp", "vjp"]

Slot = tuple[tuple[str, Any], int]


def _slots(rec: Record, keep: Callable[[Tensor], bool]) -> tuple[list[Slot], list[Tensor]]:
    """Where the tensors ``keep`` selects sit in ``rec``'s arguments (``(("a", i) or ("k", name), j)``)."""
    slots: list[Slot] = []
    found: list[Tensor] = []
    for key, obj in [*((("a", i), a) for i, a in enumerate(rec.args)), *((("k", k), a) for k, a in rec.kwargs.items())]:
        for j, t in enumerate(walk(obj)):
            if keep(t):
                slots.append((key, j))
                found.append(t)
    return slots, found


def _rebuilt(rec: Record, slots: list[Slot]) -> Callable[..., Any]:
    """``rec``'s operation as a function of the tensors at ``slots``."""

    def fn(*xs: Tensor) -> Any:
        args, kwargs = list(rec.args), dict(rec.kwargs)
        for ((kind, where), j), x in zip(slots, xs):
            obj = args[where] if kind == "a" else kwargs[where]
            if isinstance(obj, Tensor):
                obj = x
            else:
                items = list(obj)
                items[[m for m, it in enumerate(items) if isinstance(it, Tensor)][j]] = x
                obj = type(obj)(items)
            if kind == "a":
                args[where] = obj
            else:
                kwargs[where] = obj
        return rec.func(*args, **kwargs)

    return fn


def jvp(rec: Record, tangent_of: TangentOf) -> Tensor | None:
    """Tangent of ``rec``'s output: a forward-mode JVP of that one operation in its inputs that carry a
    tangent (``None`` when none does)."""
    slots, primals = _slots(rec, lambda t: tangent_of(t) is not None)
    if not primals:
        return None
    detached = tuple(p.detach() for p in primals)
    tangents = tuple(tangent_of(p).to(d.dtype) for p, d in zip(primals, detached))  # type: ignore[union-attr]
    try:
        return torch.func.jvp(_rebuilt(rec, slots), detached, tangents)[1]
    except (NotImplementedError, RuntimeError) as error:  # no forward-mode rule: refuse, never guess
        name = getattr(rec.func, "__name__", repr(rec.func))
        raise NotImplementedError(f"engine 'ghost': {name} has no rule and no forward-mode JVP ({error})") from error


def vjp(rec: Record, tracked: Tracked, grad: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(input, grad^T d out / d input)`` for each tracked input of ``rec``: a VJP of that one operation."""
    slots, primals = _slots(rec, tracked)
    if not primals:
        return []
    pullback = torch.func.vjp(_rebuilt(rec, slots), *(p.detach() for p in primals))[1]
    if rec.output is not None:
        grad = grad.to(rec.output.dtype)
    return list(zip(primals, pullback(grad)))


class Rule:
    """How the engine handles one family of torch functions; this base is the generic path (JVP/VJP).

    Attributes:
        functions: the torch functions the rule is registered for (the keys of the registry).
        modules: the layers whose look-ahead parameters the rule handles exactly, for the static check
            (:meth:`covers`, :meth:`module_problem`).

    Capture (while the training forward runs): :meth:`run` calls the operation under the capture,
    :meth:`refusal` and :meth:`record_problem` name what the engine cannot do exactly, :meth:`stored` is
    what the record keeps of the arguments. Engine (a batched record and its output gradient ``G``):
    :meth:`holds_sample_gradients` and :meth:`sample_grads` (what the layer keeps for the step),
    :meth:`weighted_grads` (``sum_i coef_i dL_i / d input``), :meth:`output_tangent` and
    :meth:`contribution` (``<J out_i [tangent], G_i>`` per sample).
    """

    functions: tuple[Callable, ...] = ()
    modules: tuple[type[nn.Module], ...] = ()

    # ------------------------------------------------------------ static check

    def covers(self, module: nn.Module) -> bool:
        """Whether the rule handles the look-ahead parameters ``module`` holds (it is one of :attr:`modules`)."""
        return bool(self.modules) and isinstance(module, self.modules)

    def module_problem(self, module: nn.Module, holds_lookahead: bool) -> str | None:
        """Why a covered ``module`` may not be exact (the reason after its name), or ``None``."""
        return None

    # ------------------------------------------------------------ capture

    def run(self, capture: Any, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Run ``func`` under ``capture`` (:class:`~reweight.engines.ghost.capture.LayerCapture`)."""
        return capture.call(func, args, kwargs)

    def refusal(self, args: tuple, kwargs: dict, batched: bool) -> str | None:
        """Why a call with these arguments couples the samples of a batch (checked tracked or not)."""
        return None

    def record_problem(self, args: tuple, kwargs: dict, out: Tensor, batch_dim: int) -> str | None:
        """Why a batched call on a look-ahead parameter cannot be handled exactly, or ``None``."""
        return None

    def stored(self, args: tuple, kwargs: dict, tracked: Tracked) -> tuple[tuple, dict]:
        """The arguments the record keeps (all of them: the JVP and VJP read the data)."""
        return args, kwargs

    # ------------------------------------------------------------ engine

    def holds_sample_gradients(self, rec: Record, tracked: Tracked) -> bool:
        """Whether the layer keeps :meth:`sample_grads` (smaller than ``G``) instead of ``G``."""
        return False

    def sample_grads(self, rec: Record, tracked: Tracked, grad: Tensor) -> LayerGradient:
        """What the layer keeps of its output gradient ``grad``: here ``G`` itself."""
        return grad

    def weighted_grads(self, rec: Record, tracked: Tracked, wg: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(input, sum_i coef_i dL_i / d input)`` for each tracked input, from ``wg`` (``G`` scaled by
        ``coef`` per sample)."""
        return vjp(rec, tracked, wg)

    def output_tangent(self, rec: Record, tangent_of: TangentOf) -> Tensor | None:
        """Tangent of the output along the look-ahead direction (``None``: constant along it)."""
        return jvp(rec, tangent_of)

    def contribution(self, rec: Record, tangent_of: TangentOf, grad: Tensor) -> Tensor | None:
        """``<J out_i [tangent], G_i>`` per sample, shape ``(n,)``."""
        dout = self.output_tangent(rec, tangent_of)
        return None if dout is None else batched_dot(dout, grad, rec.batch_dim)


FALLBACK = Rule()
