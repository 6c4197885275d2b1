"""``PlainTwinGuard``: plain training beside the reweighted run, and a fall-back to it when the weights do worse.

The meta set tells the weighting net what to learn, so it cannot also tell whether the weights generalise: on clean
labels they can fit a small meta set and end below plain training. The guard keeps a *twin*, a copy of the model
taken when the guard is made, trained with uniform weights on the same batches by an optimizer of the same class
and hyperparameters (mirrored at every step, so learning-rate schedules reach it). Every ``check_every`` steps from
``start`` on, it compares the two models' mean meta loss on ``holdout``, clean batches held back from the meta set
(never shown to the weighting net). When the reweighted model's is the higher at ``patience`` checks in a row, the
user's model and optimizer take the twin's state right after the user's next optimizer step, a
:class:`GuardFallbackWarning` says so, and training goes on as plain training: uniform weights, the reweighter no
longer called. The twin costs a second model, its optimizer state and one plain step per step until then.

Under label noise the weights help and the guard only costs: once the reweighter's evidence of label noise shows
(``reweighter.noise_evidence.shown``, read at the checks), the guard stands down: the twin is dropped and the
held-back batches join the meta stream from its next pass on (``stand_down=False`` keeps guarding).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._batch import Inputs, logits_of
from ._checks import prepare_meta_batch
from ._rng import isolated_rng
from .reweighter import MetaReweighter

__all__ = ["GuardFallbackWarning", "PlainTwinGuard"]


class GuardFallbackWarning(RuntimeWarning):
    """The reweighted model did worse than its plain twin on the held-back clean batches; training fell back to
    the twin (plain training from the twin's state)."""


def _call(module: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, Mapping):
        return module(**inputs)
    return module(inputs) if isinstance(inputs, Tensor) else module(*inputs)


def _hookless_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its hooks (the reweighter's, a profiler's): each hook table copies empty."""
    memo: dict[int, Any] = {}
    for m in module.modules():
        for name, value in vars(m).items():
            if "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(module, memo)


def _twin_optimizer(optimizer: torch.optim.Optimizer, module: nn.Module, twin: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class over ``twin``'s parameters, group by group."""
    names = {id(p): n for n, p in module.named_parameters()}
    twin_params = dict(twin.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        outside = [p for p in group["params"] if id(p) not in names]
        if outside:
            raise ValueError(
                f"the optimizer steps {len(outside)} parameter(s) outside the model; the guard's twin copies the model "
                "only: give the model's optimizer its own parameters, or train without the guard"
            )
        groups.append({**group, "params": [twin_params[names[id(p)]] for p in group["params"]]})
    try:
        return type(optimizer)(groups, **optimizer.defaults)
    except TypeError as err:
        raise TypeError(
            f"the guard cannot build a twin of {type(optimizer).__name__} from its defaults ({err}); "
            "it needs an optimizer that takes its param groups and its defaults as keyword arguments"
        ) from err


class PlainTwinGuard:
    """Guards a :class:`~reweight.MetaReweighter` with a plainly trained twin of its model.

    Call :meth:`step` where you called the reweighter's ``step`` (same arguments, same weights while the guard
    holds); the user's optimizer steps drive the twin's (a step post-hook). Under gradient accumulation the twin
    averages its micro-batches' gradients, as a loop that divides its loss by their number.

    Args:
        reweighter: the reweighter whose weights are guarded; its model, optimizer, ``loss_fn`` (the twin's
            training loss), ``meta_loss_fn`` (the comparison) and ``logits_fn`` are the guard's.
        holdout: re-iterable of clean ``(inputs, targets)`` batches held back from the meta loader (e.g. 30% of
            the clean set, split by :func:`reweight.data.meta_split`); read whole at each check.
        check_every: steps between checks (default: ``100``).
        patience: checks in a row with the reweighted model's held-back loss above the twin's before falling
            back (default: ``2``).
        start: the first step checked (default: ``None``: the reweighter's ``meta_warmup``).
        stand_down: stand down once the reweighter's evidence of label noise shows: drop the twin and give the
            held-back batches to the meta stream (default: ``True``).
        seed: seed of the twin's own randomness (its dropout masks), kept apart from the user's global RNG; drawn
            from torch's global RNG when ``None`` (default: ``None``).

    Raises:
        TypeError: if ``reweighter`` is not a MetaReweighter, ``holdout`` is not re-iterable or the optimizer cannot
            be rebuilt for the twin.
        ValueError: on an empty ``holdout``, a bad count, parameters the twin cannot copy (sharded, tensor
            subclasses, outside the model) or a run under data parallelism (each rank would train its own twin).
    """

    def __init__(
        self, reweighter: MetaReweighter, holdout: Iterable[Any], *, check_every: int = 100, patience: int = 2,
        start: int | None = None, stand_down: bool = True, seed: int | None = None,
    ) -> None:  # fmt: skip
        if not isinstance(reweighter, MetaReweighter):
            raise TypeError(f"reweighter must be a MetaReweighter, got {type(reweighter).__name__}")
        counts = (("check_every", check_every, 1), ("patience", patience, 1), ("start", start, 0), ("seed", seed, 0))
        for name, value, least in counts:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ValueError(
                    "PlainTwinGuard runs in one process: under data parallelism each rank would train its own "
                    "twin on its own batches; train without the guard"
                )
        module = reweighter.module
        odd = [n for n, p in module.named_parameters() if type(p.data) is not torch.Tensor]
        if odd:
            raise ValueError(f"parameter {odd[0]!r} is sharded or a tensor subclass; the twin copies plain tensors")
        if not isinstance(holdout, Iterable) or isinstance(holdout, Iterator):
            raise TypeError(f"holdout must be re-iterable (a DataLoader, a list), got {type(holdout).__name__}")
        if not isinstance(stand_down, bool):
            raise TypeError(f"stand_down must be a bool, got {type(stand_down).__name__}")
        if next(iter(holdout), None) is None:
            raise ValueError("holdout is empty: give it clean batches held back from the meta loader")
        self.reweighter, self.holdout = reweighter, holdout
        self.check_every, self.patience = check_every, patience
        self.start = reweighter.options.meta_warmup if start is None else start
        self.gaps: list[float] = []  # reweighted minus twin held-back meta loss, one per check
        self.fell_back_at: int | None = None  # the step after whose optimizer step the model took the twin's state
        self.stood_down_at: int | None = None  # the step at which the evidence of label noise stood the guard down
        self.stand_down = stand_down
        self._twin: nn.Module | None = _hookless_copy(module)
        self._twin_optimizer: torch.optim.Optimizer | None = _twin_optimizer(reweighter.optimizer, module, self._twin)
        self._steps = self._micro = 0
        self._pending = False
        self._seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else seed
        self._hook = reweighter.optimizer.register_step_post_hook(self._after_user_step)

    step_count = property(lambda self: self._steps, doc="Number of completed :meth:`step` calls.")
    twin = property(lambda self: self._twin, doc="The plainly trained twin (``None`` once fallen back or stood down).")

    def step(
        self, inputs: Inputs, targets: Tensor, outputs: Any, groups: Tensor | None = None, *,
        sample_ids: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """The reweighter's weights for this batch (uniform once fallen back), and the twin's plain step's gradient.

        Arguments and return as :meth:`MetaReweighter.step`.
        """
        if self.fell_back_at is not None:  # plain training from here
            logits = logits_of(outputs, self.reweighter.logits_fn)
            self._steps += 1
            return torch.ones(logits.shape[0], device=logits.device, dtype=logits.dtype)
        weights = self.reweighter.step(inputs, targets, outputs, groups, sample_ids=sample_ids)
        if self._twin is None:  # stood down: the reweighter's weights, unguarded
            self._steps += 1
            return weights
        self._twin.train(self.reweighter.module.training)
        with isolated_rng((self._seed + self._steps) % 2**62, self.reweighter.device):
            logits = logits_of(_call(self._twin, inputs), self.reweighter.logits_fn)
            self.reweighter.loss_fn(logits, targets).mean().backward()
        self._micro += 1
        self._steps += 1
        if self._steps >= self.start and self._steps % self.check_every == 0:
            evidence = self.reweighter.noise_evidence
            if self.stand_down and evidence is not None and evidence.shown is not None and bool(evidence.shown):
                self._stand_down(restart=True)
                return weights
            self.gaps.append(self._held_back_loss(self._model_state()) - self._held_back_loss(None))
            recent = self.gaps[-self.patience :]
            self._pending = len(recent) == self.patience and all(g > 0 for g in recent)
        return weights

    def _model_state(self) -> dict[str, Tensor]:
        module = self.reweighter.module
        return {**dict(module.named_parameters()), **dict(module.named_buffers())}

    @torch.no_grad()
    def _held_back_loss(self, state: dict[str, Tensor] | None) -> float:
        """Mean meta loss on ``holdout`` in eval mode: of the twin, or of ``state`` (the user's model's tensors)
        run through the twin's hook-free module, so no hook of the user's model sees these forwards."""
        twin = self._twin
        assert twin is not None
        modes = {m: m.training for m in twin.modules()}
        twin.eval()
        total, count = 0.0, 0
        try:
            for batch in self.holdout:
                inputs, targets = prepare_meta_batch(batch, twin, self.reweighter.device)
                if state is None:
                    outputs = _call(twin, inputs)
                elif isinstance(inputs, Mapping):
                    outputs = functional_call(twin, state, args=(), kwargs=dict(inputs))
                else:
                    outputs = functional_call(twin, state, args=(inputs,) if isinstance(inputs, Tensor) else inputs)
                losses = self.reweighter.meta_loss_fn(logits_of(outputs, self.reweighter.logits_fn), targets)
                total, count = total + float(losses.double().sum()), count + losses.shape[0]
        finally:
            for m, training in modes.items():
                m.train(training)
        return total / count

    def _after_user_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        twin, opt = self._twin, self._twin_optimizer
        if twin is None or opt is None or self._micro == 0:
            return
        for group, own in zip(optimizer.param_groups, opt.param_groups, strict=True):
            own.update({k: v for k, v in group.items() if k != "params"})  # the user's schedule
        if self._micro > 1:
            for p in twin.parameters():
                if p.grad is not None:
                    p.grad.div_(self._micro)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._micro = 0
        if self._pending:
            self._fall_back()

    def _stand_down(self, restart: bool) -> None:
        self.reweighter.meta_stream.extend(self.holdout, restart=restart)
        self._hook.remove()
        self._twin = self._twin_optimizer = None
        self.stood_down_at, self._pending, self._micro = self._steps, False, 0

    def _fall_back(self) -> None:
        assert self._twin is not None and self._twin_optimizer is not None
        self.reweighter.module.load_state_dict(self._twin.state_dict())
        self.reweighter.optimizer.load_state_dict(self._twin_optimizer.state_dict())
        self.reweighter.remove_hooks()
        self._hook.remove()
        self._twin = self._twin_optimizer = None
        self.fell_back_at, self._pending = self._steps, False
        gaps = ", ".join(f"{g:+.4f}" for g in self.gaps[-self.patience :])
        warnings.warn(
            f"step {self._steps}: the reweighted model's held-back meta loss was above its plain twin's at "
            f"{self.patience} checks in a row ({gaps}); the model and optimizer took the twin's state and train "
            "plainly from here (uniform weights). The weights were not helping on clean data they did not see.",
            GuardFallbackWarning,
            stacklevel=2,
        )

    def remove_hooks(self) -> None:
        """Remove the step post-hook on the user's optimizer (the twin then no longer steps)."""
        self._hook.remove()

    def state_dict(self) -> dict[str, Any]:
        """The twin, its optimizer, the checks so far and the step count, for an exact resume; taken after an
        optimizer step (the twin's accumulated gradients are not saved).

        Raises:
            RuntimeError: between micro-batches of an accumulated step.
        """
        if self._micro:
            raise RuntimeError("the guard's state is taken after an optimizer step, not between micro-batches")
        return {
            "steps": self._steps,
            "gaps": list(self.gaps),
            "pending": self._pending,
            "fell_back_at": self.fell_back_at,
            "stood_down_at": self.stood_down_at,
            "twin": None if self._twin is None else self._twin.state_dict(),
            "twin_optimizer": None if self._twin_optimizer is None else self._twin_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a guard that fell back stays fallen back).

        Raises:
            ValueError: on a missing key or a state whose twin does not fit this model.
        """
        missing = {"steps", "gaps", "pending", "fell_back_at", "stood_down_at", "twin", "twin_optimizer"} - set(state)
        if missing:
            raise ValueError(f"guard state is missing {sorted(missing)}")
        if self._twin is None and state["twin"] is not None:
            raise ValueError("this guard fell back already; it cannot take a state with a twin")
        if state["twin"] is not None:
            assert self._twin is not None and self._twin_optimizer is not None
            self._twin.load_state_dict(state["twin"])
            self._twin_optimizer.load_state_dict(state["twin_optimizer"])
        elif state["stood_down_at"] is not None:
            if self._twin is not None:  # the meta stream replays its recorded pass over the held-back batches too
                self._stand_down(restart=False)
        elif self._twin is not None:
            self._twin = self._twin_optimizer = None
            self._hook.remove()
            self.reweighter.remove_hooks()
        self._steps, self.gaps, self._pending = int(state["steps"]), list(state["gaps"]), bool(state["pending"])
        self.fell_back_at, self.stood_down_at, self._micro = state["fell_back_at"], state["stood_down_at"], 0
