"""The engine a reweighter runs: its selection, the capture of the caller's forward it declared, the
fallback to the next engine when one meets an operation it cannot handle, and whether the caller's forward
may be reused.

A ``torch.compile``d forward is never reused: its compiled backward may donate its saved buffers, which
allows one backward only, and the engines' reuse backpropagates the caller's graph with
``retain_graph=True`` before the caller's own backward. With a compiled model (or logits from a compiled
graph) the engine runs its own eager forward of the batch on the bare module, and no capture hooks stay on
it; the caller's compiled forward and backward are left exactly as compiled. Modules compiled in place
(``model.compile()``, or a block's) run the engine's forwards eagerly too (:func:`~reweight._compat.eager_calls`):
no recompilation for the functional calls, duals or capture.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from .._compat import compiled_in_place, eager_calls, from_compiled_graph, is_donated_buffer_error
from .._profiling import phase
from .base import ForwardCapture, MetaGradient, MetaProblem
from .select import EngineSelection

__all__ = ["EngineRunner"]


class EngineRunner:
    """Runs :attr:`selection`'s engine on a :class:`MetaProblem`, holding the capture its spec declares.

    Args:
        selection: the engine chosen by :func:`~reweight.engines.select.select_engine`.
        module: the bare model the capture hooks go on.
        params: returns the current look-ahead parameters by name (for the capture).
        capture_allowed: whether the caller's forward may be captured (not under DDP, whose reducer owns
            the wrapper's graph).
        compiled: whether the caller's forward is compiled (a ``torch.compile`` wrapper was given): its
            outputs are then never reused and nothing is captured.
        on_failure: called with the problem and the error when an engine raises ``RuntimeError`` or
            ``TypeError``, to replace it by a clearer error (a meta batch the model cannot take).
    """

    def __init__(
        self,
        selection: EngineSelection,
        module: nn.Module,
        params: Callable[[], Mapping[str, Tensor]],
        capture_allowed: bool,
        on_failure: Callable[[MetaProblem, Exception], None],
        compiled: bool = False,
    ) -> None:
        self.selection = selection
        self.module, self._params, self._on_failure = module, params, on_failure
        self._allowed = capture_allowed and not compiled
        self.compiled = compiled
        self._graph_checked = compiled
        self._compiled_in_place = compiled_in_place(module)
        self.capture: ForwardCapture | None = None
        self._factory: Any = None

    def sync(self, armed: bool) -> None:
        """Hold the capture the engine in use declares (if any, and if allowed); set whether it is armed."""
        factory = self.selection.spec.capture if self._allowed else None
        if self.capture is not None and self._factory is not factory:
            self.capture.remove()
            self.capture = None
        if factory is not None and self.capture is None:
            self.capture, self._factory = factory(self.module, self._params), factory
        if self.capture is not None:
            self.capture.armed = armed

    def disallow_capture(self) -> None:
        """Remove the capture's hooks for good (the engine then runs its own forward of the batch)."""
        self._allowed = False
        self.sync(False)

    def restore(self, name: str) -> None:
        """Use the engine ``name`` (from a saved state)."""
        if name != self.selection.name:
            self.selection = self.selection.restored(name)

    def _reusable(self, problem: MetaProblem) -> MetaProblem:
        """``problem`` without the caller's logits when they come from a compiled forward (checked on the first
        logits handed over: a model is compiled from its first forward on)."""
        if problem.train_logits is not None and not self._graph_checked:
            self._graph_checked = True
            if from_compiled_graph(problem.train_logits):
                self._stop_reuse()
        if self.compiled:
            problem = problem._replace(train_logits=None)
        return problem._replace(capture=self.capture)

    def _stop_reuse(self) -> None:
        self.compiled = True
        self._compiled_in_place = compiled_in_place(self.module)
        self.disallow_capture()

    def meta_now(self, problem: MetaProblem) -> tuple[Tensor, Tensor]:
        """:meth:`MetaProblem.meta_now` with the modules compiled in place run eagerly, as the engine's forwards
        are (no recompilation)."""
        with eager_calls(self._compiled_in_place):
            return problem.meta_now()

    def __call__(self, problem: MetaProblem) -> MetaGradient:
        """The meta-gradient of ``problem`` (its ``capture`` set here), falling back once per engine."""
        problem = self._reusable(problem)
        try:
            with phase(f"engine.{self.selection.name}"):
                with eager_calls(self._compiled_in_place):
                    return self.selection.spec(problem)
        except NotImplementedError as err:
            fallback = self.selection.fallback(err)
            if fallback is None:
                raise
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            warnings.warn(
                f"engine {self.selection.name!r} is not supported by this model ({why}); "
                f"falling back to {fallback.name!r} for the rest of training",
                RuntimeWarning,
                stacklevel=5,
            )
            self.selection = fallback
            self.sync(False)
            return self(problem)
        except (RuntimeError, TypeError) as err:
            if problem.train_logits is not None and is_donated_buffer_error(err):
                self._stop_reuse()  # a compiled part deeper in the caller's graph; raised before it ran
                return self(problem)
            self._on_failure(problem, err)
            raise
