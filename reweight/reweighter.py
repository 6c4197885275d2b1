"""``MetaReweighter``: Algorithm 1 of the MetaInfoNet paper as a plug-in for any training loop.

Data flows one way: batch -> per-sample loss -> weighting net -> look-ahead (engine) -> meta loss ->
net update -> weights. The user's model, buffers, gradients, optimizer state and global RNG are never
modified; the look-ahead is a stateless ``torch.func.functional_call`` with cloned buffers.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._batch import Inputs, LogitsFn, as_logits, batch_size, logits_of, split_batch, to_device, unwrap_model
from ._profiling import phase
from ._rng import isolated_rng
from ._state import (
    STATE_VERSION,
    check_count,
    check_optimizer_state,
    check_rng_state,
    check_tensor_shapes,
    upgrade_state,
)
from .distributed import check_sync_batchnorm, data_parallel_group
from .engines import MetaGradient, MetaProblem, get_engine, list_engines
from .engines.ghost import ForwardCapture, ghost_exactness_problem
from .engines.higher import import_higher
from .lookahead import HeadCapture, LookaheadSpec, lookahead_parameter_names
from .losses import PerSampleLoss, cross_entropy
from .meta_stream import MetaBatchStream
from .monitor import CollapseMonitor, MetaSignalMonitor
from .nets import WeightingOutput, create_weighting_net, list_weighting_nets
from .presets import FROM_PRESET, resolve_preset
from .virtual_step import plan_virtual_step

__all__ = ["MetaReweighter", "NonFiniteLossError"]

_SINGLE_PROCESS_ENGINES = ("reverse", "higher")
_AUTO_ENGINES = {"full": ("ghost", "forward", "reverse"), "head": ("linear_head",)}
_NORMALIZATIONS = ("sum", "none")
_VIRTUAL_STEPS = ("sgd", "optimizer")
_ON_NONFINITE = ("raise", "skip")


def _naming_batch(loss_fn: PerSampleLoss, batch: str) -> PerSampleLoss:
    """``loss_fn`` whose ``ValueError`` (labels out of range, mismatched shapes) names the batch it came from."""

    def named(logits: Tensor, targets: Tensor) -> Tensor:
        try:
            return loss_fn(logits, targets)
        except ValueError as err:
            raise ValueError(f"{batch}: {err}") from err

    return named


class NonFiniteLossError(FloatingPointError):
    """A per-sample loss, the meta loss or the meta-gradient was NaN or infinite."""


def _default_meta_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4)


def _choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


class MetaReweighter:
    """Learns per-sample loss weights from a clean meta set (Algorithm 1 of MetaInfoNet).

    Each :meth:`step` takes the batch the user just forwarded, updates the weighting net on one meta
    batch at the looked-ahead parameters (every ``interval`` calls), and returns detached weights of
    shape ``(batch,)`` such that ``(weights * per_sample_loss).mean()`` is the reweighted training loss.

    Args:
        model: the classifier; any ``nn.Module`` (DDP / ``torch.compile`` wrappers are unwrapped).
        optimizer: the classifier's optimizer; its param groups' current ``lr`` drive the look-ahead.
        meta_loader: re-iterable of clean ``(inputs, targets)`` batches (or dicts with ``"labels"``),
            cycled forever and moved to the model's device.
        net: ``"lossnet"``, ``"logitnet"``, ``"metainfonet"``, ``"l2rw"`` (non-parametric) or an
            ``nn.Module`` following the interface in :mod:`reweight.nets` (default: ``"lossnet"``).
        net_kwargs: keyword arguments of the named net, e.g. ``{"kl_weight": 0.1}`` (default: ``None``).
        preset: a named bundle of the options ``interval``, ``engine``, ``lookahead``, ``normalization``,
            ``virtual_step``, ``lookahead_lr`` and ``meta_optimizer`` (:data:`reweight.presets.PRESETS`); each
            of them given explicitly overrides the preset. ``"exact"`` is Algorithm 1 as written (the values
            documented below); ``"fast"`` meta-updates every 6th step with a 6x meta learning rate
            (``interval=6``, ``meta_optimizer`` Adam lr 6e-3, weight decay 5e-4) (default: ``"exact"``).
        interval: update the weighting net on calls ``1, k+1, 2k+1, ...``; weights are returned on every
            call. Calls, not optimizer steps: under gradient accumulation each micro-batch calls :meth:`step`,
            so ``interval`` and :attr:`step_count` count micro-batches (default: ``1``).
        engine: meta-gradient engine, ``"auto"`` or a name from :func:`reweight.list_engines`. ``"auto"``
            uses ``"ghost"`` (per-layer inner products; no forward-mode or double backward) when it is
            exact for the model: no BatchNorm in train mode and no parameterised layer without a rule
            (``reweight.engines.ghost.ghost_exactness_problem``); otherwise ``"forward"``. It falls
            back once, with a warning, from ``"ghost"`` to ``"forward"`` (an operation the capture cannot
            handle exactly) and from ``"forward"`` to ``"reverse"`` (an operator without forward-mode
            support); with ``lookahead="head"`` it uses the closed form ``"linear_head"``. With
            ``"ghost"`` the caller's forward is captured by hooks on the model (:meth:`remove_hooks`)
            (default: ``"auto"``).
        lookahead: parameters moved by the look-ahead, the others held fixed: ``"full"``, ``"head"``
            (the final ``nn.Linear``; its input is captured by a forward hook, removed by
            :meth:`remove_hooks`), a list of ``fnmatch`` name patterns, or a submodule (default: ``"full"``).
        normalization: ``"sum"`` divides the raw weights by their sum, with the delta guard of Algorithm 1
            line 6 computed without a host sync, then multiplies by the batch size so that uniform weights
            give the plain mean loss; ``"none"`` returns raw weights (default: ``"sum"``).
        virtual_step: ``"sgd"``, a plain SGD look-ahead as the reference code; or ``"optimizer"``, which
            mirrors ``torch.optim.SGD``'s momentum, dampening, Nesterov and weight decay (default: ``"sgd"``;
            the reference's choice, and users report equal accuracy either way).
        lookahead_lr: learning rate of the look-ahead instead of each group's current ``lr``; useful
            under warmup (lr 0 gives a zero meta-gradient) or with Adam-sized lrs (default: ``None``).
        meta_optimizer: factory ``params -> torch.optim.Optimizer`` for the weighting net
            (default: Adam, lr 1e-3, weight decay 5e-4, as the paper).
        loss_fn: per-sample training loss ``(logits, targets) -> (batch,)`` (default: cross-entropy,
            class indices or soft targets).
        meta_loss_fn: per-sample loss of the meta batch (default: ``loss_fn``).
        logits_fn: where the logits are in the model's outputs, e.g. ``lambda out: out["scores"]``; applied to
            the ``outputs`` given to :meth:`step` and to every forward of the look-ahead (default: a tensor,
            an object's ``.logits`` or a mapping's ``"logits"``).
        num_classes: number of classes; inferred from the first outputs when ``None`` (default: ``None``).
        on_nonfinite: ``"raise"`` a :class:`NonFiniteLossError` when a loss or meta-gradient is not
            finite, or ``"skip"`` that meta update (weights then come from the current net and samples
            with a non-finite loss get weight 0) (default: ``"raise"``).
        collapse_threshold: warn once (:class:`~reweight.monitor.WeightCollapseWarning`, naming the step) when
            every returned weight of a batch falls below it (with ``"sum"``: all zero) or the weights become
            constant over a batch; checked every 50 steps, tunable through ``collapse_monitor``; ``None``
            disables it (default: ``1e-3``). A second monitor, ``signal_monitor``
            (:class:`~reweight.monitor.MetaSignalMonitor`), warns once (``WeakMetaGradientWarning``, naming
            ``lookahead_lr``) when the meta-gradient stays too small for the net to learn; set it to ``None`` to
            silence it.
        process_group: the data-parallel process group, for a model whose DDP wrapper the reweighter does
            not see (e.g. Lightning's strategies hand over the bare module); by default that of a
            ``DistributedDataParallel`` model, else a single process (default: ``None``).
        seed: seed of the reweighter's own randomness (meta-batch order, look-ahead dropout,
            MetaInfoNet's sampling); drawn from torch's global RNG when ``None`` (default: ``None``).

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument has a wrong value (the message names it and the allowed values), including
            ``net_kwargs`` that the named net refuses, ``net_kwargs`` with ``net="l2rw"``, and the
            single-process engines ``"reverse"`` and ``"higher"`` under data parallelism.
        ImportError: if ``engine="higher"`` and the ``higher`` package is not installed.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> meta = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> reweighter = MetaReweighter(model, opt, meta, net="lossnet", seed=0)
        >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
        >>> logits = model(x)
        >>> reweighter.step(x, y, logits).shape
        torch.Size([5])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta_loader: Iterable[Any],
        *,
        net: str | nn.Module = "lossnet",
        net_kwargs: dict[str, Any] | None = None,
        preset: str = "exact",
        interval: int = FROM_PRESET,
        engine: str = FROM_PRESET,
        lookahead: LookaheadSpec = FROM_PRESET,
        normalization: Literal["sum", "none"] = FROM_PRESET,
        virtual_step: Literal["sgd", "optimizer"] = FROM_PRESET,
        lookahead_lr: float | None = FROM_PRESET,
        meta_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = FROM_PRESET,
        loss_fn: PerSampleLoss = cross_entropy,
        meta_loss_fn: PerSampleLoss | None = None,
        logits_fn: LogitsFn | None = None,
        num_classes: int | None = None,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        collapse_threshold: float | None = 1e-3,
        process_group: Any | None = None,
        seed: int | None = None,
    ) -> None:
        given = {
            "interval": interval,
            "engine": engine,
            "lookahead": lookahead,
            "normalization": normalization,
            "virtual_step": virtual_step,
            "lookahead_lr": lookahead_lr,
            "meta_optimizer": meta_optimizer,
        }
        options = resolve_preset(preset, given)
        interval, engine, lookahead = options["interval"], options["engine"], options["lookahead"]
        normalization, virtual_step = options["normalization"], options["virtual_step"]
        lookahead_lr, meta_optimizer = options["lookahead_lr"], options["meta_optimizer"]
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(net, str):
            _choice("net", net, [*list_weighting_nets(), "l2rw"])
        elif not isinstance(net, nn.Module):
            raise TypeError(f"net must be a registered name or an nn.Module, got {type(net).__name__}")
        if net_kwargs is not None and not isinstance(net, str):
            raise ValueError("net_kwargs applies to a named net only; configure your own module directly")
        if net_kwargs is not None and net == "l2rw":
            raise ValueError("net='l2rw' has no weighting net: net_kwargs does not apply")
        if net_kwargs is not None and not isinstance(net_kwargs, dict):
            raise TypeError(f"net_kwargs must be a dict or None, got {type(net_kwargs).__name__}")
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise TypeError(f"interval must be an int, got {type(interval).__name__}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if net == "l2rw" and interval != 1:
            source = f" (set by preset={preset!r}; pass interval=1)" if given["interval"] is FROM_PRESET else ""
            raise ValueError(
                f"interval must be 1 for net='l2rw': its weights come from each batch's meta-gradient{source}"
            )
        _choice("engine", engine, ["auto", *list_engines()])
        _choice("normalization", normalization, _NORMALIZATIONS)
        _choice("virtual_step", virtual_step, _VIRTUAL_STEPS)
        _choice("on_nonfinite", on_nonfinite, _ON_NONFINITE)
        if lookahead_lr is not None:
            if isinstance(lookahead_lr, bool) or not isinstance(lookahead_lr, numbers.Real):
                raise TypeError(f"lookahead_lr must be a number or None, got {type(lookahead_lr).__name__}")
            if not (math.isfinite(float(lookahead_lr)) and float(lookahead_lr) > 0):
                raise ValueError(f"lookahead_lr must be positive and finite, got {lookahead_lr!r}")
        if virtual_step == "optimizer" and not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(f"virtual_step='optimizer' mirrors torch.optim.SGD only, got {type(optimizer).__name__}")
        for name, fn in (("loss_fn", loss_fn), ("meta_loss_fn", meta_loss_fn), ("meta_optimizer", meta_optimizer)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
            raise TypeError(f"num_classes must be an int or None, got {type(num_classes).__name__}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        monitor = None if collapse_threshold is None else CollapseMonitor(threshold=collapse_threshold)

        self.model = model
        self.module = unwrap_model(model)
        self.optimizer = optimizer
        self._optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in self._optimized for p in self.module.parameters()):
            raise ValueError("optimizer holds none of the model's parameters")
        self._lookahead_names = lookahead_parameter_names(self.module, lookahead)
        if not self._lookahead_params():
            raise ValueError("lookahead selects no parameter that the optimizer trains (requires_grad and in a group)")
        head_mode = isinstance(lookahead, str) and lookahead == "head"
        if engine == "linear_head" and not head_mode:
            raise ValueError("engine='linear_head' needs lookahead='head'")
        self._auto_engines = _AUTO_ENGINES["head" if head_mode else "full"]
        if self._auto_engines[0] == "ghost" and ghost_exactness_problem(self.module, self._lookahead_params()):
            self._auto_engines = self._auto_engines[1:]  # samples may interact, or a layer has no rule
        self._forward_capture: ForwardCapture | None = None
        self._capture_forwards = True  # until remove_hooks()
        self._pending_finite: Tensor | None = None  # the training losses' finite flag, checked later
        self._head: HeadCapture | None = None
        self.preset = preset
        self.interval = interval
        self.normalization = normalization
        self.virtual_step = virtual_step
        self.lookahead_lr = None if lookahead_lr is None else float(lookahead_lr)
        self.loss_fn = loss_fn
        self.meta_loss_fn = meta_loss_fn if meta_loss_fn is not None else loss_fn
        self.logits_fn: LogitsFn = logits_fn if logits_fn is not None else as_logits
        self.on_nonfinite = on_nonfinite
        self.collapse_monitor = monitor
        self.signal_monitor: MetaSignalMonitor | None = MetaSignalMonitor()  # None silences it
        self.engine = engine
        self._engine_name = self._auto_engines[0] if engine == "auto" else engine
        self._group = data_parallel_group(model, process_group)
        self._check_engine(engine)
        if self._group.active:  # engine="auto" never falls back to an engine that cannot split over ranks
            self._auto_engines = tuple(e for e in self._auto_engines if e not in _SINGLE_PROCESS_ENGINES)
        check_sync_batchnorm(self.module, self._group)
        self._reuse_outputs = not self._group.active  # DDP's reducer owns the wrapper's graph
        self._meta_optimizer_factory = meta_optimizer or _default_meta_optimizer
        self._net_spec = net
        self._net_kwargs = dict(net_kwargs or {})
        self.net: nn.Module | None = None
        self.meta_optimizer: torch.optim.Optimizer | None = None
        self.num_classes = num_classes

        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._generator = torch.Generator().manual_seed(seed)
        self._init_seed = self._draw_seed()  # the named net's initialisation, whenever it is built
        self._step_count = 0
        self._meta_stream = MetaBatchStream(meta_loader, self._draw_rank_seed)
        if isinstance(net, str) and net not in ("lossnet", "l2rw") and num_classes is None:
            self._net_template(2)  # built at the first step: refuse bad net_kwargs now
        self.last_meta_loss: Tensor | None = None
        self.last_update_skipped = False
        if isinstance(net, nn.Module) or net == "lossnet" or num_classes is not None:
            self._build_net(num_classes)
        if head_mode:  # last: a constructor that raises leaves no hook on the user's model
            self._head = HeadCapture(self.module)
        self._sync_forward_capture()

    # ------------------------------------------------------------------ setup

    @property
    def device(self) -> torch.device:
        """The model's device (where meta batches and the weighting net live)."""
        for t in self.module.parameters():
            return t.device
        return torch.device("cpu")

    @property
    def step_count(self) -> int:
        """Number of completed :meth:`step` calls."""
        return self._step_count

    @property
    def engine_name(self) -> str:
        """The engine in use (after any automatic fallback)."""
        return self._engine_name

    def _net_dtype(self) -> torch.dtype:
        dtypes = [p.dtype for p in self.module.parameters() if p.is_floating_point()]
        return torch.float64 if torch.float64 in dtypes else torch.float32

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=self._generator))

    def _draw_rank_seed(self) -> int:
        """A seed that differs across data-parallel ranks (each rank draws its own meta batches)."""
        return (self._draw_seed() + 1_000_003 * self._group.rank) % 2**62

    @property
    def is_l2rw(self) -> bool:
        """Whether the weights are L2RW's: non-parametric, no weighting net and no meta optimizer.

        Otherwise :attr:`net` is ``None`` only until the first step infers the number of classes.
        """
        return isinstance(self._net_spec, str) and self._net_spec == "l2rw"

    def _check_engine(self, engine: str) -> None:
        """Refuse an engine that cannot run with this reweighter's process group (or lacks its package)."""
        if self._group.active and engine in _SINGLE_PROCESS_ENGINES:
            raise ValueError(
                f"engine {engine!r} does not support data-parallel training (world size {self._group.world_size}); "
                "use engine='forward' or 'finite_difference'"
            )
        if engine == "higher":
            import_higher()

    def _create_named_net(self, num_classes: int, device: torch.device | None = None) -> nn.Module:
        """The named net, initialised from the reweighter's seed (the global RNG is left as it was)."""
        assert isinstance(self._net_spec, str)
        with isolated_rng(self._init_seed, torch.device("cpu")), device if device is not None else nullcontext():
            return create_weighting_net(self._net_spec, num_classes, **self._net_kwargs)

    def _net_template(self, num_classes: int) -> nn.Module:
        """The named net for ``num_classes`` built on the ``meta`` device (no memory), to check arguments
        and state shapes; on the CPU for a registered factory that cannot build on ``meta``."""
        try:
            return self._create_named_net(num_classes, torch.device("meta"))
        except (NotImplementedError, RuntimeError):
            return self._create_named_net(num_classes)

    def _build_net(self, num_classes: int | None) -> None:
        if self.is_l2rw:
            return
        if isinstance(self._net_spec, nn.Module):
            net = self._net_spec
        else:
            net = self._create_named_net(num_classes or 1)
        self.net = net.to(device=self.device, dtype=self._net_dtype())
        self._group.broadcast_([*self.net.parameters(), *self.net.buffers()])
        self.meta_optimizer = self._meta_optimizer_factory(self.net.parameters())
        if not isinstance(self.meta_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"meta_optimizer must return a torch.optim.Optimizer, got {type(self.meta_optimizer).__name__}"
            )

    def _requires_logits(self) -> bool:
        if self.is_l2rw:
            return False
        if isinstance(self._net_spec, nn.Module):
            return bool(getattr(self._net_spec, "requires_logits", False))
        return self._net_spec != "lossnet"

    # ------------------------------------------------------------------ validation

    def _check_batch(self, inputs: Inputs, targets: Tensor, logits: Tensor) -> int:
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
        if logits.ndim == 0:
            raise ValueError(
                "the outputs are a scalar: pass step() the model's per-sample outputs (logits of shape "
                "(batch, ...)), not a loss"
            )
        if targets.ndim == 0:
            raise ValueError("targets must have a leading batch dimension, got a scalar")
        n = logits.shape[0]
        if n == 0:
            raise ValueError("the batch is empty")
        n_inputs = batch_size(inputs)
        if not n_inputs == targets.shape[0] == n:
            raise ValueError(f"batch sizes disagree: inputs {n_inputs}, targets {targets.shape[0]}, outputs {n}")
        if self._requires_logits() and (logits.ndim != 2 or not logits.is_floating_point() or logits.shape[1] < 2):
            net = self._net_spec if isinstance(self._net_spec, str) else type(self._net_spec).__name__
            hint = (
                "; token-level outputs (causal LM, token classification) suit only the loss-based nets: "
                "use net='lossnet' or net='l2rw'"
                if logits.ndim == 3
                else "; use net='lossnet' or net='l2rw', which need only the per-sample loss"
            )
            raise ValueError(
                f"net {net!r} needs class logits of shape (batch, num_classes >= 2); got outputs of shape "
                f"{tuple(logits.shape)}{hint}"
            )
        if self.num_classes is not None and self._requires_logits() and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the weighting net was built for {self.num_classes} classes, outputs have {logits.shape[1]}"
            )
        return n

    def _check_losses(self, losses: Tensor, n: int, what: str) -> None:
        if not isinstance(losses, Tensor) or losses.shape != (n,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"{what} must return per-sample losses of shape ({n},), got {shape}")

    def _next_meta_batch(self) -> tuple[Inputs, Tensor]:
        inputs, targets = split_batch(self._meta_stream.next())
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        if not isinstance(targets, Tensor) or targets.ndim == 0:
            raise ValueError("meta batch targets must be a tensor with a batch dimension")
        m = batch_size(inputs)
        if m != targets.shape[0] or m == 0:
            raise ValueError(f"meta batch is empty or inconsistent: inputs {m}, targets {targets.shape[0]}")
        return inputs, targets

    # ------------------------------------------------------------------ the step

    def _normalize(self, raw: Tensor) -> Tensor:
        if self.normalization == "none":
            return raw
        total = self._group.sum_differentiable(raw.sum())
        return raw * (raw.shape[0] * self._group.world_size / (total + (total == 0).to(raw.dtype)))

    def _raw_weights(self, losses: Tensor, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self.net is not None
        with torch.autocast(self.device.type, enabled=False):  # the net and its update stay in its dtype
            out = self.net(losses, logits, targets)
        raw, penalty = (out.weights, out.penalty) if isinstance(out, WeightingOutput) else (out, None)
        if raw.ndim == 2 and raw.shape[1] == 1:
            raw = raw.squeeze(1)
        if raw.shape != losses.shape:
            raise ValueError(f"the weighting net returned shape {tuple(raw.shape)}, expected {tuple(losses.shape)}")
        return raw, penalty

    def _lookahead_params(self) -> dict[str, Tensor]:
        return {
            name: p
            for name, p in self.module.named_parameters()
            if name in self._lookahead_names and p.requires_grad and id(p) in self._optimized
        }

    def _meta_gradient(self, problem: MetaProblem) -> MetaGradient:
        # The engines scope the math SDPA backend to their forward-mode / double-backward passes; the
        # first-order passes keep the attention kernel the caller chose.
        try:
            with phase(f"engine.{self._engine_name}"):
                return get_engine(self._engine_name)(problem)
        except NotImplementedError as err:
            if self.engine != "auto" or self._engine_name == self._auto_engines[-1]:
                raise
            fallback = self._auto_engines[self._auto_engines.index(self._engine_name) + 1]
            warnings.warn(
                f"engine {self._engine_name!r} is not supported by this model ({str(err).splitlines()[0]}); "
                f"falling back to {fallback!r} for the rest of training",
                RuntimeWarning,
                stacklevel=4,
            )
            self._engine_name = fallback
            self._sync_forward_capture()
            return self._meta_gradient(problem)

    def _sync_forward_capture(self) -> None:
        """Capture the caller's forward (for the ghost engines to reuse) only while one is the engine."""
        wanted = self._engine_name in ("ghost", "ghost_lean") and self._reuse_outputs and self._capture_forwards
        if wanted and self._forward_capture is None:
            self._forward_capture = ForwardCapture(self.module, self._lookahead_params)
        elif not wanted and self._forward_capture is not None:
            self._forward_capture.remove()
            self._forward_capture = None
        if self._forward_capture is not None:  # armed before a step that updates, never inside one
            self._forward_capture.armed = self._step_count % self.interval == 0

    def _problem(
        self, inputs: Inputs, targets: Tensor, logits: Tensor, weights: Tensor, meta: tuple[Inputs, Tensor] | None
    ) -> MetaProblem:
        head_features = self._head.features_for(logits) if self._head is not None else None
        self._optimized = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        params = self._lookahead_params()
        meta_inputs, meta_targets = meta if meta is not None else self._next_meta_batch()
        reuse = self._reuse_outputs and logits.requires_grad
        return MetaProblem(
            model=self.module,
            params=params,
            step=plan_virtual_step(params, self.optimizer, self.virtual_step, self.lookahead_lr),
            inputs=inputs,
            targets=targets,
            weights=weights.detach().to(logits.dtype),
            meta_inputs=meta_inputs,
            meta_targets=meta_targets,
            loss_fn=self.loss_fn,
            meta_loss_fn=_naming_batch(self.meta_loss_fn, "meta batch"),
            train_logits=logits if reuse else None,
            group=self._group,
            head=self._head,
            head_features=head_features,
            logits_fn=self.logits_fn,
            capture=self._forward_capture,
        )

    def _joint_check(self, flag: Tensor, what: str) -> bool:
        """``flag`` (all finite) and the training losses' deferred flag, in one host sync."""
        pending, self._pending_finite = self._pending_finite, None
        if pending is None:
            return self._finite_or_skip(self._group.all_(flag), what)
        if self._group.all_(flag & pending):
            return True
        return self._finite_or_skip(False, what if bool(pending) else "a per-sample training loss")

    def _finite_or_skip(self, ok: bool, what: str) -> bool:
        if ok:
            return True
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"{what} is not finite (NaN or inf); pass on_nonfinite='skip' to skip such meta updates"
            )
        return False

    def _meta_update(
        self,
        inputs: Inputs,
        targets: Tensor,
        logits: Tensor,
        net_inputs: tuple[Tensor, Tensor, Tensor],
        meta: tuple[Inputs, Tensor] | None = None,
    ) -> tuple[bool, Tensor | None]:
        """One meta update, mutating only the weighting net and its optimizer.

        Returns whether it was applied (``False`` when skipped on a non-finite value), and L2RW's weights.
        """
        if self.is_l2rw:  # the meta-gradient at zero weights, clamped and normalised
            zeros = torch.zeros_like(net_inputs[0], dtype=logits.dtype)
            grad = self._meta_gradient(self._problem(inputs, targets, logits, zeros, meta))
            if not self._joint_check(torch.isfinite(grad.coefficients).all(), "the meta-gradient"):
                return False, None
            self.last_meta_loss = grad.meta_loss
            return True, self._normalize(torch.clamp(-grad.coefficients, min=0).to(self._net_dtype()))
        assert self.net is not None and self.meta_optimizer is not None
        self.net.train()
        with torch.enable_grad():
            raw, penalty = self._raw_weights(*net_inputs)
            weights = self._normalize(raw)
            grad = self._meta_gradient(self._problem(inputs, targets, logits, weights, meta))
            finite = torch.isfinite(grad.coefficients).all() & torch.isfinite(grad.meta_loss)
            if not self._joint_check(finite, "the meta loss or meta-gradient"):
                return False, None
            surrogate = meta_part = (grad.coefficients.detach().to(weights.dtype) * weights).sum()
            meta_grads = None
            if penalty is not None:  # each rank holds 1/world of the global batch's penalty
                surrogate = surrogate + penalty / self._group.world_size
                monitor = self.signal_monitor
                if monitor is not None and not self._group.active and monitor.checks_next():
                    # the weak-signal check reads the meta-gradient alone, not the penalty's pull
                    meta_grads = torch.autograd.grad(
                        meta_part, list(self.net.parameters()), retain_graph=True, allow_unused=True
                    )
            self.meta_optimizer.zero_grad(set_to_none=True)
            surrogate.backward()
        self._group.sum_grads_(self.net.parameters())
        if self.signal_monitor is not None:
            self.signal_monitor.observe(
                self._step_count,
                self.net,
                self.meta_optimizer,
                self.optimizer,
                self.lookahead_lr,
                weights,
                meta_grads,
            )
        self.meta_optimizer.step()
        self.last_meta_loss = grad.meta_loss
        return True, None

    def step(self, inputs: Inputs, targets: Tensor, outputs: Any) -> Tensor:
        """Meta-update the weighting net (every ``interval`` calls) and return this batch's weights.

        Args:
            inputs: the batch given to the model: a tensor, a tuple of tensors or a dict of tensors.
            targets: class indices ``(batch,)``, soft targets ``(batch, K)``, or whatever ``loss_fn`` takes.
            outputs: the model's outputs on ``inputs``, unchanged (a tensor, an object/dict with ``logits``,
                or whatever ``logits_fn`` maps to the logits); reused, never recomputed, for the real update.

        Returns:
            Detached weights of shape ``(batch,)``: use ``(weights * per_sample_loss).mean()``.

        Raises:
            ValueError: on inconsistent batch sizes, labels out of range, an empty batch or meta loader,
                or outputs that are not logits when the net needs them.
            NonFiniteLossError: on a non-finite loss or meta-gradient with ``on_nonfinite="raise"``.
            DistributedStepError: under data parallelism, on every rank, when these checks failed on any
                rank; it is also an instance of the first failing rank's error type (docs/distributed.md).

        A step that raises leaves everything as it was: the model, the weighting net and its optimizer,
        the step count, the reweighter's RNG and the meta stream's position.
        """
        rng, stream = self._generator.get_state(), self._meta_stream.state_dict()
        net_before = (self.net, self.meta_optimizer, self.num_classes)
        self._pending_finite = None
        if self._forward_capture is not None:
            self._forward_capture.armed = False  # the look-ahead's own forwards are not the caller's
        try:
            return self._step(inputs, targets, outputs)
        except BaseException:
            self.net, self.meta_optimizer, self.num_classes = net_before  # a net built lazily by this step
            self._generator.set_state(rng)
            if self._meta_stream.state_dict() != stream:
                self._meta_stream.load_state_dict(stream)  # the next call replays the pass up to here
            raise
        finally:
            self._sync_forward_capture()

    def _step(self, inputs: Inputs, targets: Tensor, outputs: Any) -> Tensor:
        update = self._step_count % self.interval == 0
        rank_seed, meta = self._draw_rank_seed(), None
        try:  # local checks: under DDP, an error must reach every rank before the step's first collective
            logits = logits_of(outputs, self.logits_fn)
            n = self._check_batch(inputs, targets, logits)
            with torch.no_grad():
                losses = _naming_batch(self.loss_fn, "training batch")(logits.detach(), targets)
            self._check_losses(losses, n, "loss_fn")
            if update and self._group.active:  # what the meta update would meet past its first collective
                if self._head is not None:
                    self._head.features_for(logits)
                with isolated_rng(rank_seed, self.device):
                    meta = self._next_meta_batch()
                if logits.ndim == 2:  # the meta loss's own checks (labels in range) on stand-in logits
                    with torch.no_grad():
                        stand_in = logits.new_zeros(meta[1].shape[0], logits.shape[1])
                        _naming_batch(self.meta_loss_fn, "meta batch")(stand_in, meta[1])
        except Exception as err:
            if not self._group.active:
                raise
            self._group.all_(None, err, device=self.device)  # rides on the flag all-reduce below; raises
            raise
        finite = torch.isfinite(losses)
        if self.on_nonfinite == "raise" and not self._group.active:
            # checked together with the meta-gradient, before anything changes: one host sync per step
            self._pending_finite, all_finite = finite.all(), True
        else:
            all_finite = self._finite_or_skip(self._group.all_(finite.all()), "a per-sample training loss")
        if self.net is None and not self.is_l2rw:
            self.num_classes = logits.shape[1] if logits.ndim == 2 else 1
            self._build_net(self.num_classes)
        losses = torch.where(finite, losses, torch.zeros_like(losses))
        net_inputs = (losses, logits.detach(), targets)
        applied, weights = False, None
        with isolated_rng(rank_seed, self.device):
            if update and all_finite:
                with phase("meta_update"):
                    applied, weights = self._meta_update(inputs, targets, logits, net_inputs, meta)
            if weights is None:
                weights = self._current_weights(net_inputs, finite)
        if self._pending_finite is not None:  # a step without a meta update
            self._joint_check(torch.ones((), dtype=torch.bool, device=finite.device), "a per-sample training loss")
        self.last_update_skipped = update and not applied
        if self.collapse_monitor is not None:
            self.collapse_monitor.observe(self._step_count, weights, losses)
        self._step_count += 1
        return weights.detach()

    @torch.no_grad()
    def _current_weights(self, net_inputs: tuple[Tensor, ...], finite: Tensor) -> Tensor:
        if self.is_l2rw:  # a skipped update: uniform over finite samples
            return self._normalize(finite.to(torch.get_default_dtype()))
        assert self.net is not None
        self.net.eval()
        raw, _ = self._raw_weights(*net_inputs)
        keep = finite & torch.isfinite(raw)  # a NaN / inf logit can make the net's output NaN for a finite loss
        return self._normalize(torch.where(keep, raw, torch.zeros_like(raw)))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: net, meta optimizer, step count, RNG and meta-stream position."""
        return {
            "version": STATE_VERSION,
            "step": self._step_count,
            "num_classes": self.num_classes,
            "engine": self._engine_name,
            "net": {} if self.net is None else self.net.state_dict(),
            "meta_optimizer": {} if self.meta_optimizer is None else self.meta_optimizer.state_dict(),
            "rng": self._generator.get_state(),
            "meta_stream": self._meta_stream.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, upgrading a state of an older version first.

        Every field is checked before anything changes (a named net not built yet is checked against a
        template on the ``meta`` device), so a refused state leaves the reweighter exactly as it was.

        Raises:
            TypeError: if ``state`` is not a mapping.
            ValueError: on a missing key, a newer or unknown version, a bad step count or class count, an
                unknown or unusable engine, a net or meta-optimizer state that does not match this
                reweighter's, or a malformed RNG or meta-stream entry.
            ImportError: if the state's engine is ``"higher"`` and the package is not installed.
        """
        state = upgrade_state(state)
        check_count("step", state["step"])
        check_count("num_classes", state["num_classes"], minimum=1, optional=True)
        num_classes = self.num_classes if self.num_classes is not None else state["num_classes"]
        if state["num_classes"] not in (None, num_classes):
            raise ValueError(f"the state is for {state['num_classes']} classes, this reweighter for {num_classes}")
        engine = state["engine"]
        if not isinstance(engine, str) or engine not in list_engines():
            raise ValueError(f"unknown engine {engine!r} in the saved state; registered: {list_engines()}")
        self._check_engine(engine)
        if engine == "linear_head" and self._head is None:
            raise ValueError("the state's engine 'linear_head' needs lookahead='head'")
        build = self.net is None and not self.is_l2rw and num_classes is not None
        if self.net is not None:
            assert self.meta_optimizer is not None
            net_layout = self.net.state_dict()
            groups: list[int] | None = [len(g["params"]) for g in self.meta_optimizer.param_groups]
            num_params = len(list(self.net.parameters()))
        elif build:
            template = self._net_template(num_classes)
            net_layout = template.state_dict()
            groups, num_params = None, len(list(template.parameters()))
        else:  # L2RW, or a net whose class count is still unknown: nothing to load
            net_layout, groups, num_params = {}, None, 0
        check_tensor_shapes("weighting net", state["net"], net_layout)
        check_optimizer_state(state["meta_optimizer"], groups, num_params)
        check_rng_state(state["rng"], self._generator.get_state())
        MetaBatchStream.check_state(state["meta_stream"])

        if build:
            self._build_net(num_classes)
        self.num_classes = num_classes
        if self.net is not None:
            assert self.meta_optimizer is not None
            self.net.load_state_dict(state["net"])
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self._engine_name = engine
        self._sync_forward_capture()
        self._generator.set_state(state["rng"])
        self._meta_stream.load_state_dict(state["meta_stream"])
        self._step_count = state["step"]

    def remove_hooks(self) -> None:
        """Remove the forward hooks of ``lookahead="head"`` (on the final Linear layer) and of ``engine="ghost"``
        (on the model; the engine then runs its own forward of the training batch)."""
        if self._head is not None:
            self._head.remove()
        self._capture_forwards = False
        self._sync_forward_capture()

    def __repr__(self) -> str:
        net = self._net_spec if isinstance(self._net_spec, str) else type(self._net_spec).__name__
        return (
            f"{type(self).__name__}(net={net!r}, preset={self.preset!r}, engine={self._engine_name!r}, "
            f"interval={self.interval}, "
            f"normalization={self.normalization!r}, virtual_step={self.virtual_step!r}, step={self._step_count})"
        )
