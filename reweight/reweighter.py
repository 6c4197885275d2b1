"""``MetaReweighter``: Algorithm 1 of the MetaInfoNet paper as a plug-in for any training loop.

Data flows one way: batch -> per-sample loss -> weighting net -> look-ahead (engine) -> meta loss ->
net update -> weights. The user's model, buffers, gradients, optimizer state and global RNG are never
modified; the look-ahead is a stateless ``torch.func.functional_call`` with cloned buffers. The engine is
known only through what it declared when registered (:mod:`reweight.engines.select`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._batch import Inputs, LogitsFn, logits_of, net_dtype, unwrap_model
from ._checks import check_groups, check_meta_forward, check_meta_labels, naming_batch, prepare_meta_batch, step_losses
from ._compat import is_compiled
from ._finite import NonFiniteLossError, finite_or_skip, joint_check
from ._profiling import phase
from ._rng import isolated_rng
from ._state import STATE_VERSION, check_count, check_rng_state, upgrade_state
from .distributed import check_parameter_kinds, check_sync_batchnorm, data_parallel_group
from .engines import MetaProblem, list_engines
from .engines.runner import EngineRunner
from .engines.select import check_engine, select_engine
from .lookahead import HeadCapture, LookaheadParams, LookaheadSpec, lookahead_parameter_names, untrained_lookahead
from .loss_history import check_sample_ids
from .losses import PerSampleLoss, cross_entropy
from .meta_stream import MetaBatchStream
from .monitor import CollapseMonitor, MetaSignalMonitor
from .net_slot import NetSlot
from .options import ReweighterOptions, resolve_options
from .presets import FROM_PRESET
from .sharded import reshard_all
from .virtual_step import check_virtual_step, plan_virtual_step

__all__ = ["MetaReweighter", "NonFiniteLossError"]


class MetaReweighter:
    """Learns per-sample loss weights from a clean meta set (Algorithm 1 of MetaInfoNet).

    Each :meth:`step` takes the batch the user just forwarded, updates the weighting net on one meta batch at the
    looked-ahead parameters (every ``interval`` calls), and returns detached weights of shape ``(batch,)``
    such that ``(weights * per_sample_loss).mean()`` is the reweighted training loss.

    Args:
        model: the classifier; any ``nn.Module`` (DDP / ``torch.compile`` wrappers are unwrapped).
        optimizer: the classifier's optimizer; its param groups' current ``lr`` drive the look-ahead.
        meta_loader: re-iterable of clean ``(inputs, targets)`` (or ``"labels"`` dict) batches, cycled, moved to device.
        net: ``"auto"``, ``"lossnet"``, ``"logitnet"``, ``"metainfonet"``, ``"gated"``, ``"l2rw"`` (non-parametric)
            or an ``nn.Module`` following the interface in :mod:`reweight.nets`. ``"auto"``: ``"gated"`` on class
            labels, else ``"lossnet"`` (under your own ``loss_fn`` the first batch decides) (default: ``"auto"``).
        net_kwargs: keyword arguments of the named net, e.g. ``{"kl_weight": 0.1}`` (default: ``None``).
        preset: a named bundle of the options ``interval``, ``engine``, ``lookahead``, ``normalization``,
            ``virtual_step``, ``lookahead_lr`` and ``meta_optimizer`` (:data:`reweight.presets.PRESETS`); each
            of them given explicitly overrides the preset. ``"exact"`` is Algorithm 1 as written (the values
            documented below); ``"fast"`` meta-updates every 6th step with a 6x meta learning rate
            (``interval=6``, the net's default ``meta_optimizer`` at lr 6e-3) (default: ``"exact"``).
        interval: update the weighting net on calls ``1, k+1, 2k+1, ...``; weights are returned on every
            call. Calls, not optimizer steps: under gradient accumulation each micro-batch calls :meth:`step`,
            so ``interval`` and :attr:`step_count` count micro-batches (default: ``1``).
        engine: meta-gradient engine, ``"auto"`` or a name from :func:`reweight.list_engines`. ``"auto"``: ``"ghost"``
            (per-layer inner products; it hooks the caller's forward, :meth:`remove_hooks`) where it is exact (no
            BatchNorm in train mode, a rule for every layer the look-ahead moves), else ``"forward"``; the closed form
            ``"linear_head"`` under ``lookahead="head"``. :attr:`engine_reason` says why (INFO on the ``"reweight"``
            logger). An engine meeting an operation it cannot handle falls back once, warning (default: ``"auto"``).
        lookahead: parameters moved by the look-ahead, the others held fixed: ``"full"``, ``"head"``
            (the final ``nn.Linear``; its input is captured by a forward hook, removed by
            :meth:`remove_hooks`), a list of ``fnmatch`` name patterns, or a submodule (default: ``"full"``).
        normalization: ``"sum"``: raw weights over their sum (delta guard, no host sync) times the batch size;
            ``"class"``: the same within each class (each keeps its share; ``"sum"`` lets rare classes weigh more);
            ``"none"``: raw (default: ``None``: ``"class"`` on class labels for nets reading logits and L2RW, else sum).
        virtual_step: ``"sgd"``, a plain SGD look-ahead (the reference's), or ``"optimizer"``, which mirrors SGD
            (momentum, decay) or Adam / AdamW (each coordinate over its second moment, see docs/design.md)
            (default: ``"sgd"``).
        lookahead_lr: the look-ahead's lr instead of each group's current ``lr``; under an lr warm-up from 0 the
            look-ahead, and so the meta-gradient, starts at zero (default: ``None``).
        meta_optimizer: factory ``params -> torch.optim.Optimizer`` for the weighting net (default: AdamW, lr
            1e-3, weight decay 5e-4: the paper's values, the decay decoupled so that it cannot outweigh a small
            meta-gradient; SGD, lr 1e-3, for the group net alone, see :func:`~reweight.options.group_meta_optimizer`).
        meta_warmup: the meta optimizer's lr rises linearly over this many calls of :meth:`step` (``0``: none),
            so the net does not commit while the model is still underfit, when the meta-gradient can favour
            the samples with the largest losses (default: ``None``: ``300``; ``0`` for the group net alone).
        meta_follows_lr: scale the meta lr by the training lr over the largest one seen at a meta update, so the
            net slows as the training lr decays (an expert's option, docs/results.md) (default: ``None``: ``False``).
        min_ess: the least share of the batch that carries its loss: weights whose effective sample size
            ``(sum w)^2 / sum w^2`` falls below it are blended toward their mean until it holds, order and sum kept
            (``0``: no floor) (default: ``None``: ``0.2``; ``0.4`` for L2RW under ``"class"``; ``0``: group net).
        min_ess_until_evidence: the floor while the veto waits for evidence of label noise (``veto_evidence``),
            giving way to ``min_ess`` as the evidence builds, so weights with nothing to find stay near uniform
            (default: ``None``: ``0.8`` where the veto waits under ``"class"``, else ``0``; ``0``: off).
        veto: at each meta update a sample whose ``c_i = dL_meta/dw_i`` is above ``veto`` times the batch's mean ``|c|``
            gets weight 0 (weighting it up raises the meta loss), the rest normalised again; ``math.inf``: none; not
            for L2RW, whose rule it is at 0 (default: ``None``: ``0.5``; none for the group net alone).
        veto_warmup: the veto reads the coefficients times ``min(1, (t + 1) / veto_warmup)`` at step ``t``, so it
            waits for the net (default: ``None``: ``meta_warmup`` while the veto acts; ``0``: from the first step).
        veto_center: the veto reads ``c_i`` less its class's weighted mean (with ``True`` under ``"sum"``: on class
            labels, else the batch's), not how the meta batch would shift the classes (default: ``None``: ``"class"``).
        veto_refill: under ``"class"``, at most how far a class's kept samples are scaled up to take its vetoed share
            of the loss, the whole batch taking the rest (``1``: all of it) (default: ``None``: ``math.inf``).
        veto_evidence: the veto acts once the meta set shows label noise: a moving share of the training losses above
            their class's meta 0.9-quantile, beyond chance, reaches it (default: 0.05 on class labels, else 0).
        veto_competence: and once the model's chance-corrected accuracy on the meta batches (a moving average)
            reaches it, on class labels (:mod:`reweight.meta_competence`) (default: ``None``: 0, off; 0.45 measured).
        loss_history: the nets that read the loss also read each sample's moving average of its past losses, which
            tells a memorised noisy sample from a clean one; :meth:`step` then needs ``sample_ids``; measured safe
            with the gated net, not with LossNet alone (:mod:`reweight.loss_history`) (default: ``False``).
        loss_fn: per-sample training loss ``(logits, targets) -> (batch,)`` (default: cross-entropy, class or soft).
        meta_loss_fn: per-sample loss of the meta batch (default: ``loss_fn``).
        logits_fn: where the logits are in the model's outputs, e.g. ``lambda out: out["scores"]``; applied to the
            ``outputs`` of :meth:`step` and every look-ahead forward (default: a tensor, ``.logits`` or ``["logits"]``).
        num_classes: number of classes; inferred from the first outputs when ``None`` (default: ``None``).
        on_nonfinite: ``"raise"`` a :class:`NonFiniteLossError` when a loss or meta-gradient is not finite, or
            ``"skip"`` that meta update (the current net's weights, 0 for a non-finite loss) (default: ``"raise"``).
        collapse_threshold: warn once (:class:`~reweight.monitor.WeightCollapseWarning`, naming the step) when
            every weight of a batch falls below it (with ``"sum"``: all zero), the net's weights become constant, a
            tenth of the batch carries its loss (effective sample size) or (``"class"``) a class's weights from the
            net are all zero; checked every 50 steps, tunable through ``collapse_monitor``; ``None`` disables it
            (default: ``1e-3``). ``signal_monitor`` (:class:`~reweight.monitor.MetaSignalMonitor`) warns
            once (``WeakMetaGradientWarning``) when the meta-gradient stays too small to learn; ``None`` silences it.
        process_group: the data-parallel group of a model whose DDP wrapper the reweighter does not see (Lightning's
            strategies hand over the bare module) (default: ``None``: a ``DistributedDataParallel`` model's, else none).
        seed: seed of the reweighter's own randomness (meta-batch order, look-ahead dropout, MetaInfoNet's sampling);
            drawn from torch's global RNG when ``None`` (default: ``None``).

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument has a wrong value (the message names it and the allowed values), including
            ``net_kwargs`` the named net refuses or given with ``net="l2rw"``, ``"reverse"`` and ``"higher"`` under
            data parallelism, and parameters the look-ahead cannot use (FSDP shards, ``DTensor``, tensor subclasses).
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
        net: str | nn.Module = "auto",
        net_kwargs: dict[str, Any] | None = None,
        preset: str = "exact",
        interval: int = FROM_PRESET,
        engine: str = FROM_PRESET,
        lookahead: LookaheadSpec = FROM_PRESET,
        normalization: Literal["sum", "class", "none"] | None = FROM_PRESET,
        virtual_step: Literal["sgd", "optimizer"] = FROM_PRESET,
        lookahead_lr: float | None = FROM_PRESET,
        meta_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = FROM_PRESET,
        meta_warmup: int | None = None,
        meta_follows_lr: bool | None = None,
        min_ess: float | None = None,
        min_ess_until_evidence: float | None = None,
        veto: float | None = None,
        veto_warmup: int | None = None,
        veto_center: bool | None = None,
        veto_refill: float | None = None,
        veto_evidence: float | None = None,
        veto_competence: float | None = None,
        loss_history: bool = False,
        loss_fn: PerSampleLoss = cross_entropy,
        meta_loss_fn: PerSampleLoss | None = None,
        logits_fn: LogitsFn | None = None,
        num_classes: int | None = None,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        collapse_threshold: float | None = 1e-3,
        process_group: Any | None = None,
        seed: int | None = None,
    ) -> None:
        options = resolve_options(
            model, optimizer, net=net, net_kwargs=net_kwargs, preset=preset, interval=interval, engine=engine,
            lookahead=lookahead, normalization=normalization, virtual_step=virtual_step, lookahead_lr=lookahead_lr,
            meta_optimizer=meta_optimizer, meta_warmup=meta_warmup, meta_follows_lr=meta_follows_lr, min_ess=min_ess,
            min_ess_until_evidence=min_ess_until_evidence, veto=veto, veto_warmup=veto_warmup, veto_center=veto_center,
            veto_refill=veto_refill, veto_evidence=veto_evidence, veto_competence=veto_competence,
            loss_history=loss_history, loss_fn=loss_fn, meta_loss_fn=meta_loss_fn, logits_fn=logits_fn,
            num_classes=num_classes, on_nonfinite=on_nonfinite, seed=seed, collapse_threshold=collapse_threshold,
        )  # fmt: skip
        module, optimized = unwrap_model(model), {id(p) for g in optimizer.param_groups for p in g["params"]}
        names = lookahead_parameter_names(module, options.lookahead)
        params = {k: p for k, p in module.named_parameters() if k in names and p.requires_grad and id(p) in optimized}
        if not params:
            raise untrained_lookahead(module, {k for k, p in module.named_parameters() if id(p) in optimized})
        sharded = check_parameter_kinds(model, module, params.items())  # FSDP2 shards: engines that declare it
        group = data_parallel_group(model, process_group)
        selection = select_engine(
            options.engine, module, params, world_size=group.world_size, head_mode=options.head_mode, sharded=sharded
        )
        check_sync_batchnorm(module, group)
        check_virtual_step(options.virtual_step, optimizer, selection.spec.coordinate_scales and not sharded)

        self.options: ReweighterOptions = options
        self.model, self.module, self.optimizer = model, module, optimizer
        self._lookahead_params = LookaheadParams(module, names, optimizer)
        self._group, self._sharded = group, sharded
        self._engine = EngineRunner(selection, module, self._params_now, not (group.active or sharded),
                                    self._explain_engine_failure, compiled=is_compiled(model))  # fmt: skip
        self._reuse_outputs = not group.active  # DDP's reducer owns the wrapper's graph
        self._head: HeadCapture | None = None
        threshold, warmup = options.collapse_threshold, options.meta_warmup
        self.collapse_monitor = None if threshold is None else CollapseMonitor(threshold, constant_after=warmup)
        self.signal_monitor: MetaSignalMonitor | None = MetaSignalMonitor()  # None silences it
        seed = options.seed if options.seed is not None else int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._generator = torch.Generator().manual_seed(seed)
        self._slot = NetSlot(options, self._draw_seed(), group)  # the net's initialisation, whenever built
        self._step_count = 0
        self._meta_stream = MetaBatchStream(meta_loader, self._draw_rank_seed)
        self.last_meta_loss: Tensor | None = None
        self.last_update_skipped = False
        if isinstance(options.net, nn.Module) or not options.requires_logits or options.num_classes is not None:
            self._slot.build(options.num_classes, self.device, net_dtype(self.module))
        else:
            self._slot.template(2)  # built at the first step: refuse bad net_kwargs now
        if options.head_mode:  # last: a constructor that raises leaves no hook on the user's model
            self._head = HeadCapture(module)
        self._engine.sync(armed=True)

    preset = property(lambda self: self.options.preset, doc="The preset the options were resolved from.")
    engine = property(lambda self: self.options.engine, doc="The ``engine`` argument (``'auto'`` or a name).")
    interval = property(lambda self: self.options.interval, doc="Calls between meta updates.")
    normalization = property(lambda self: self.options.normalization, doc="``'sum'``, ``'class'``, ``'none'``, or "
                             "``'auto'`` until the first batch settles it (integer class labels: ``'class'``).")
    virtual_step = property(lambda self: check_virtual_step(self.options.virtual_step, self.optimizer, self._engine
                            .selection.spec.coordinate_scales and not self._sharded), doc="``'sgd'`` or "
                            "``'optimizer'`` (refused where the engine in use cannot mirror the optimizer).")
    lookahead_lr = property(lambda self: self.options.lookahead_lr, doc="The look-ahead's fixed lr, if any.")
    loss_fn = property(lambda self: self.options.loss_fn, doc="Per-sample training loss.")
    meta_loss_fn = property(lambda self: self.options.meta_loss_fn, doc="Per-sample meta loss.")
    logits_fn = property(lambda self: self.options.logits_fn, doc="Outputs to logits.")

    @property
    def on_nonfinite(self) -> str:
        """``"raise"`` or ``"skip"``; may be changed between steps."""
        return self.options.on_nonfinite

    @on_nonfinite.setter
    def on_nonfinite(self, value: str) -> None:
        self.options = self.options.replace(on_nonfinite=value)

    @property
    def device(self) -> torch.device:
        """The model's device (where meta batches and the weighting net live): its look-ahead parameters'."""
        params = itertools.chain(self._lookahead_params().values(), self.module.parameters())
        return next((t.device for t in params), torch.device("cpu"))

    step_count = property(lambda self: self._step_count, doc="Number of completed :meth:`step` calls.")

    engine_name = property(lambda self: self._engine.selection.name, doc="The engine in use (after any fallback).")

    @property
    def engine_reason(self) -> str:
        """Why :attr:`engine_name` runs: given by the caller, or ``auto``'s choice and which module kept a
        faster engine out (e.g. ``"auto chose 'forward' ('ghost' is not exact for this model: bn
        (BatchNorm1d) normalises over the batch in train mode)"``), or the fallback that led to it."""
        return self._engine.selection.reason

    net = property(lambda self: self._slot.net, doc="The weighting net (``None`` for L2RW, or until built).")
    meta_optimizer = property(lambda self: self._slot.optimizer, doc="The weighting net's optimizer.")
    num_classes = property(lambda self: self._slot.num_classes, doc="Classes the net was built for, if known.")
    group_weights = property(lambda self: self._slot.group_weights(), doc="Weight per group (``net='groups'``).")
    is_l2rw = property(lambda self: self.options.is_l2rw, doc="Whether the weights are L2RW's (no weighting net).")
    noise_evidence = property(lambda self: self._slot.evidence, doc="What the veto waits for (``veto_evidence``).")
    meta_competence = property(lambda self: self._slot.competence, doc="And this (``veto_competence``).")

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=self._generator))

    def _draw_rank_seed(self) -> int:  # a seed that differs across data-parallel ranks (each draws its meta batches)
        return (self._draw_seed() + 1_000_003 * self._group.rank) % 2**62

    def _params_now(self) -> dict[str, Tensor]:
        if self._sharded:  # FSDP2's root unit keeps its gathered parameters after the caller's forward
            reshard_all(self.module)
        return self._lookahead_params()

    def _next_meta_batch(self) -> tuple[Inputs, Tensor]:
        return self._slot.count_meta(prepare_meta_batch(self._meta_stream.next(), self.module, self.device))

    def _explain_engine_failure(self, problem: MetaProblem, err: Exception) -> None:
        check_meta_forward(self.module, problem.meta_inputs, problem.inputs, self.logits_fn, err)

    def _problem(
        self, inputs: Inputs, targets: Tensor, logits: Tensor, weights: Tensor, meta: tuple[Inputs, Tensor] | None
    ) -> MetaProblem:
        head_features = self._head.features_for(logits, inputs) if self._head is not None else None
        params = self._params_now()
        meta_inputs, meta_targets = meta if meta is not None else self._next_meta_batch()
        groups = self._lookahead_params.groups
        step = plan_virtual_step(params, self.optimizer, self.virtual_step, self.lookahead_lr, groups)
        return MetaProblem(
            model=self.module, params=params, step=step, inputs=inputs, targets=targets,
            weights=weights.detach().to(logits.dtype), meta_inputs=meta_inputs, meta_targets=meta_targets,
            loss_fn=self.loss_fn, meta_loss_fn=naming_batch(self.meta_loss_fn, "meta batch", "meta_loss_fn"),
            train_logits=logits if self._reuse_outputs and logits.requires_grad else None, group=self._group,
            head=self._head, head_features=head_features, logits_fn=self.logits_fn,
        )  # fmt: skip

    def _meta_update(
        self, inputs: Inputs, targets: Tensor, logits: Tensor, net_inputs: tuple[Any, ...],
        meta: tuple[Inputs, Tensor] | None, pending: Tensor | None,
    ) -> tuple[bool, Tensor | None, Tensor | None]:
        """One meta update, mutating only the weighting net and its optimizer; checks ``pending`` (the training
        losses' deferred finite flag) with its own.

        Returns whether it was applied (``False`` when skipped on a non-finite value), L2RW's weights, and the
        coefficients over their global sum of magnitudes for the net's ``veto`` (``None`` without one).
        """
        if self.is_l2rw:  # the meta-gradient at zero weights, clamped and normalised
            zeros = torch.zeros_like(net_inputs[0], dtype=logits.dtype)
            grad = self._engine(self._problem(inputs, targets, logits, zeros, meta))
            ok = torch.isfinite(grad.coefficients).all()
            if not joint_check(ok, "the meta-gradient", pending, self._group, self.on_nonfinite):
                return False, None, None
            self.last_meta_loss, clamped = grad.meta_loss, torch.clamp(-grad.coefficients, min=0)
            return True, self._slot.normalize(clamped.to(net_dtype(self.module)), net_inputs), None
        assert self.net is not None
        self.net.train()
        with torch.enable_grad():
            raw, penalty = self._slot.raw_weights(*net_inputs)
            weights = self._slot.normalize(raw, net_inputs)
            grad = self._engine(problem := self._problem(inputs, targets, logits, weights, meta))
            finite = torch.isfinite(grad.coefficients).all() & torch.isfinite(grad.meta_losses).all()
            if not joint_check(finite, "the meta loss or meta-gradient", pending, self._group, self.on_nonfinite):
                return False, None, None
            now = lambda: self._engine.meta_now(problem)  # noqa: E731 (called only when the slot reads it)
            self._slot.observe_noise(net_inputs, grad.meta_losses, now, problem.meta_targets)
            unit = self._slot.update(
                grad.coefficients, weights, penalty, self.signal_monitor, self._step_count, self.optimizer,
                self.lookahead_lr,
            )
        self.last_meta_loss = grad.meta_loss
        return True, None, unit if self.options.vetoes else None

    def step(
        self, inputs: Inputs, targets: Tensor, outputs: Any, groups: Tensor | None = None, *,
        sample_ids: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Meta-update the weighting net (every ``interval`` calls) and return this batch's weights.

        Args:
            inputs: the batch given to the model: a tensor, a tuple of tensors or a dict of tensors.
            targets: class indices ``(batch,)``, soft targets ``(batch, K)``, or whatever ``loss_fn`` takes.
            outputs: the model's outputs on ``inputs``, unchanged (a tensor, an object/dict with ``logits``,
                or whatever ``logits_fn`` maps to the logits); reused, never recomputed, for the real update.
            groups: ``(batch,)`` integer source ids, for a net that reads them (``net="groups"``); only for such a net.
            sample_ids: ``(batch,)`` integer ids of the samples (their indices in the dataset), with ``loss_history``.

        Returns:
            Detached weights of shape ``(batch,)``: use ``(weights * per_sample_loss).mean()``.

        Raises:
            ValueError: on inconsistent batch sizes, labels out of range, an empty batch or meta loader,
                a meta batch the model cannot take, a loss function that does not return one loss per
                sample, outputs that are not logits when the net needs them, ``groups`` missing, out of range or
                given to a net that does not read them, or ``sample_ids`` missing, malformed or not wanted.
            NonFiniteLossError: on a non-finite loss or meta-gradient with ``on_nonfinite="raise"``.
            DistributedStepError: under data parallelism, on every rank, when these checks failed on any
                rank; it is also an instance of the first failing rank's error type (docs/distributed.md).

        A step that raises leaves everything as it was: the model, the weighting net and its optimizer,
        the step count, the reweighter's RNG and the meta stream's position.
        """
        rng, stream, net_before = self._generator.get_state(), self._meta_stream.state_dict(), self._slot.snapshot()
        self._engine.sync(armed=False)  # the look-ahead's own forwards are not the caller's
        try:
            return self._step(inputs, targets, outputs, groups, sample_ids)
        except BaseException:
            self._slot.restore(net_before)  # a net built lazily by this step
            self._generator.set_state(rng)
            if self._meta_stream.state_dict() != stream:
                self._meta_stream.load_state_dict(stream)  # the next call replays the pass up to here
            raise
        finally:
            self._engine.sync(armed=self._step_count % self.interval == 0)

    def _step(self, inputs: Inputs, targets: Tensor, outputs: Any, groups: Tensor | None, ids: Tensor | None) -> Tensor:
        update = self._step_count % self.interval == 0
        rank_seed, meta = self._draw_rank_seed(), None
        try:  # local checks: under DDP, an error must reach every rank before the step's first collective
            logits = logits_of(outputs, self.logits_fn)
            losses, self.options = step_losses(inputs, targets, logits, self.options, self.num_classes)
            self._slot.settle(self.options)
            groups = check_groups(groups, losses.shape[0], self.options, self.device)
            ids = check_sample_ids(ids, losses.shape[0], self.options.loss_history)
            if update and self._group.active:  # what the meta update would meet past its first collective
                if self._head is not None:
                    self._head.features_for(logits, inputs)
                with isolated_rng(rank_seed, self.device):
                    meta = self._next_meta_batch()
                check_meta_labels(meta[1], logits, self.meta_loss_fn)
        except Exception as err:
            if not self._group.active:
                raise
            self._group.all_(None, err, device=self.device)  # rides on the flag all-reduce below; raises
            raise
        finite = torch.isfinite(losses)
        pending: Tensor | None = None
        if self.on_nonfinite == "raise" and not self._group.active:
            # checked together with the meta-gradient, before anything changes: one host sync per step
            pending, all_finite = finite.all(), True
        else:
            all_finite = finite_or_skip(self._group.all_(finite.all()), "a per-sample training loss", self.on_nonfinite)
        if self.net is None and not self.is_l2rw:
            self._slot.build(logits.shape[1] if logits.ndim == 2 else 1, self.device, net_dtype(self.module))
        losses = torch.where(finite, losses, torch.zeros_like(losses))
        net_inputs = self._slot.count_batch((losses, logits.detach(), targets, groups, self._slot.recall(ids, losses)))
        applied, weights, veto = False, None, None
        with isolated_rng(rank_seed, self.device):
            if update and all_finite:
                with phase("meta_update"):
                    applied, weights, veto = self._meta_update(inputs, targets, logits, net_inputs, meta, pending)
                pending = None  # checked by the update
            if weights is None:
                weights = self._slot.current_weights(net_inputs, finite)
        if pending is not None:  # a step without a meta update
            joint_check(finite.new_ones(()), "a per-sample training loss", pending, self._group, self.on_nonfinite)
        self.last_update_skipped = update and not applied
        own = weights
        weights = weights if veto is None else self._slot.vetoed(weights, veto, net_inputs, self._step_count)
        if self.collapse_monitor is not None:  # a class's weights all zero: the net's own, not the veto's
            self.collapse_monitor.observe(self._step_count, weights, losses, *self._slot.class_labels(net_inputs), own)
        self._slot.remember(ids, losses, finite)
        self._step_count += 1
        return weights.detach()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: net, meta optimizer, step count, RNG and meta-stream position."""
        return {
            "version": STATE_VERSION,
            "step": self._step_count,
            "num_classes": self.num_classes,
            "engine": self.engine_name,
            "net": {} if self.net is None else self.net.state_dict(),
            "meta_optimizer": {} if self.meta_optimizer is None else self.meta_optimizer.state_dict(),
            "rng": self._generator.get_state(),
            "meta_stream": self._meta_stream.state_dict(),
            **self._slot.state_entries(),  # "loss_history", "noise_evidence", "meta_competence"
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, upgrading a state of an older version first.

        Every field is checked before anything changes (a named net not built yet is checked against a
        template on the ``meta`` device; a saved net settles a pending ``net="auto"``), so a refused state leaves
        the reweighter exactly as it was.

        Raises:
            TypeError: if ``state`` is not a mapping.
            ValueError: on a missing key, a newer or unknown version, a bad step or class count, an unknown or
                unusable engine, a net or meta-optimizer state unlike this reweighter's, a malformed RNG or meta stream.
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
        check_engine(engine, world_size=self._group.world_size, head_mode=self._head is not None, sharded=self._sharded)
        options = self._slot.settled_by_state(state["net"], num_classes)  # a pending net="auto": the saved net's
        build = self._slot.check_state(state, num_classes, options)
        check_rng_state(state["rng"], self._generator.get_state())
        MetaBatchStream.check_state(state["meta_stream"])
        self.options = options  # every check passed: load
        self._slot.load(state, num_classes, build, self.device, net_dtype(self.module), options)
        self._engine.restore(engine)
        self._generator.set_state(state["rng"])
        self._meta_stream.load_state_dict(state["meta_stream"])
        self._step_count = state["step"]
        self._engine.sync(armed=self._step_count % self.interval == 0)

    def remove_hooks(self) -> None:
        """Remove the forward hooks of ``lookahead="head"`` (on the final Linear layer) and of an engine that
        captures the caller's forward (on the model; the engine then runs its own forward of the batch)."""
        if self._head is not None:
            self._head.remove()
        self._engine.disallow_capture()

    def __repr__(self) -> str:
        net = self.options.net if isinstance(self.options.net, str) else type(self.options.net).__name__
        return (f"{type(self).__name__}(net={net!r}, preset={self.preset!r}, engine={self.engine_name!r}, interval="
                f"{self.interval}, normalization={self.normalization!r}, virtual_step={self.virtual_step!r}, "
                f"step={self._step_count})")  # fmt: skip
