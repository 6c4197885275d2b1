"""Records each operation of the training forward that takes a look-ahead parameter.

:class:`LayerCapture` is a ``TorchFunctionMode``: every torch function called during the forward goes to
the rule registered for it (:func:`.rules.rule_for`), which runs it through :meth:`LayerCapture.call`.
A call that takes a tracked tensor (a look-ahead parameter, or a tensor computed from parameters alone)
is recorded: with batched inputs (computed from the model's inputs) its inputs and its output's gradient
edge, for the engine's per-layer passes; on parameters alone its output, followed by JVPs and VJPs of those
small tensors (``pos[:, :L]``, ``cls_token.expand(...)``, a parametrisation). Whatever the engine cannot
do exactly (batch norm in train mode, an output without the batch, an in-place update of a parameter, a
rule's own refusals) marks the capture unusable; the forward itself always goes on unchanged.

:class:`ForwardCapture` runs the caller's own forward under a capture, so that the engine reuses it
(:func:`captured`); without one the engine runs its own forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from ..._batch import _tensors, call_model
from ..base import MetaProblem, detached_params
from .records import Record, walk
from .rules import rule_for

__all__ = ["LayerCapture", "ForwardCapture", "captured"]


class LayerCapture(TorchFunctionMode):
    """Records the operations of one forward that take a look-ahead parameter (a ``TorchFunctionMode``).

    Args:
        params: the look-ahead parameters by name, as the forward sees them.
        roots: the forward's input tensors; everything computed from them is "batched".
        batch_size: the size ``n`` of their leading dimension.
    """

    def __init__(self, params: Mapping[str, Tensor], roots: Iterable[Tensor], batch_size: int) -> None:
        super().__init__()
        self.names = {id(p): k for k, p in params.items()}
        self.params = dict(params)  # keeps the ids valid
        self.n = batch_size
        self.records: list[Record] = []
        self.chain: list[Record] = []  # operations on parameters alone, in forward order
        self._derived: dict[int, Tensor] = {}
        self._batched: dict[int, weakref.ref] = {}
        self.error: str | None = None
        self.output: Any = None  # the forward's outputs, set by ForwardCapture
        for t in roots:
            self.mark(t)

    # ---------------------------------------------------------------- bookkeeping

    def mark(self, out: Any) -> None:
        """Mark the tensors of ``out`` as batched."""
        for t in walk(out):
            self._batched[id(t)] = weakref.ref(t)

    def _is_batched(self, t: Tensor) -> bool:
        ref = self._batched.get(id(t))
        return ref is not None and ref() is t

    def tracked(self, t: Tensor) -> bool:
        """Whether ``t`` is a look-ahead parameter or computed from parameters alone."""
        return id(t) in self.names or id(t) in self._derived

    def scan(self, args: tuple, kwargs: dict) -> tuple[bool, bool]:
        """Whether the arguments hold a tracked tensor, and whether they hold a batched one."""
        tracked = batched = False
        for obj in (*args, *kwargs.values()):
            for t in walk(obj):
                if self.tracked(t):
                    tracked = True
                elif self._is_batched(t):
                    batched = True
        return tracked, batched

    def fail(self, reason: str) -> None:
        """Mark the capture unusable (the forward itself goes on unchanged)."""
        if self.error is None:
            self.error = reason

    def check(self) -> None:
        """Raise ``NotImplementedError`` naming the first operation the engine cannot handle exactly."""
        if self.error is not None:
            raise NotImplementedError(f"engine 'ghost': {self.error}")

    def holds_sample_gradients(self, rec: Record) -> bool:
        """Whether ``rec``'s layer keeps per-sample gradients rather than its ``G`` (its rule says)."""
        return rule_for(rec.func).holds_sample_gradients(rec, self.tracked)

    # ---------------------------------------------------------------- the mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return rule_for(func).run(self, func, args, kwargs or {})

    def call(self, func: Callable, args: tuple, kwargs: dict, batch_dim: int = 0) -> Any:
        """Run ``func(*args, **kwargs)`` and record it if it takes a tracked tensor (its output's batch in
        ``batch_dim``); rules call this for the operations they run."""
        tracked, batched = self.scan(args, kwargs)
        rule = rule_for(func)
        reason = rule.refusal(args, kwargs, batched)
        if reason is not None:
            self.fail(reason)
        out = func(*args, **kwargs)
        if tracked:
            self._record(func, args, kwargs, out, batched, batch_dim)
        elif batched:
            self.mark(out)
        return out

    def _record(self, func: Callable, args: tuple, kwargs: dict, out: Any, batched: bool, bd: int) -> None:
        name = getattr(func, "__name__", repr(func))
        if not isinstance(out, Tensor):
            if any(True for _ in walk(out)):
                self.fail(f"{name} returns several tensors computed from a look-ahead parameter")
            return
        if name.endswith("_") and not name.endswith("__") or any(out is t for t in walk(args)):
            self.fail(f"in-place operation {name} on a look-ahead parameter")
            return
        if not batched:
            self._derived[id(out)] = out
            self.chain.append(Record(func, args, kwargs, None, out, 0))
            return
        if out.ndim <= bd or out.shape[bd] != self.n:
            self.fail(f"{name} of a look-ahead parameter has output {tuple(out.shape)} without the batch of {self.n}")
            return
        if not out.requires_grad:
            self.fail(f"{name} of a look-ahead parameter has no gradient (run the forward with grad enabled)")
            return
        rule = rule_for(func)
        reason = rule.record_problem(args, kwargs, out, bd)
        if reason is not None:
            self.fail(reason)
        args, kwargs = rule.stored(args, kwargs, self.tracked)
        self.records.append(Record(func, args, kwargs, get_gradient_edge(out), None, bd, out.shape))
        self.mark(out)


class ForwardCapture:
    """Runs the caller's forward of ``module`` under a :class:`LayerCapture` while armed.

    The ghost engines' spec names this class as their capture factory: the reweighter makes one, arms it
    before each step that updates the weighting net, disarms it inside the step, and hands it to the engine
    as ``MetaProblem.capture``. The engine uses the latest capture when its logits are the outputs handed
    to the step, and runs its own forward otherwise.

    Args:
        module: the bare model (hooks go on it; :meth:`remove` takes them off).
        params: returns the current look-ahead parameters by name.
    """

    def __init__(self, module: nn.Module, params: Callable[[], Mapping[str, Tensor]]) -> None:
        self.module = module
        self._params = params
        self.armed = False
        self.latest: LayerCapture | None = None
        self._active: LayerCapture | None = None
        self._handles = [
            module.register_forward_pre_hook(self._enter, with_kwargs=True),
            module.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # a compiled forward is never captured: the hook traces to nothing, adding no graph break
        if torch.compiler.is_compiling() or not self.armed or self._active is not None:
            return
        if not torch.is_grad_enabled():
            return
        roots = [t for obj in (*args, *kwargs.values()) for t in walk(obj)]
        if not roots or roots[0].ndim == 0:
            return
        capture = LayerCapture(self._params(), roots, roots[0].shape[0])
        capture.__enter__()
        self._active = capture

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling() or self._active is None:
            return
        capture, self._active = self._active, None
        capture.__exit__(None, None, None)
        capture.output = output
        self.latest = capture

    def take(self, problem: MetaProblem) -> LayerCapture | None:
        """The capture of ``problem``'s training forward, if the caller's forward was captured (then cleared)."""
        capture, self.latest = self.latest, None
        if capture is None or problem.train_logits is None:
            return None
        try:
            if problem.logits_fn(capture.output) is not problem.train_logits:
                return None
        except Exception:  # noqa: BLE001  (outputs the logits function does not take: not this batch's)
            return None
        if capture.n != problem.weights.shape[0]:
            return None
        if {id(p): k for k, p in problem.params.items()} != capture.names:
            return None
        return capture

    def remove(self) -> None:
        """Remove the hooks from the module."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.latest = None


def _own_capture(problem: MetaProblem) -> tuple[MetaProblem, LayerCapture]:
    """A fresh forward of the training batch under a capture; the problem then reuses its logits."""
    params = detached_params(problem, requires_grad=True)
    capture = LayerCapture(params, _tensors(problem.inputs), problem.weights.shape[0])
    with torch.enable_grad(), capture:
        logits = call_model(problem.model, params, problem.inputs, problem.logits_fn)
    return problem._replace(params=params, train_logits=logits), capture


def captured(problem: MetaProblem) -> tuple[MetaProblem, LayerCapture, bool]:
    """The capture of the training forward: the caller's (``problem.capture``, reused: ``True``) or the
    engine's own (``False``); with its own, the returned problem's parameters and logits are those of
    that forward."""
    forward = problem.capture
    capture = forward.take(problem) if isinstance(forward, ForwardCapture) else None
    reused = capture is not None
    if capture is None:
        problem, capture = _own_capture(problem)
    capture.check()
    return problem, capture, reused
