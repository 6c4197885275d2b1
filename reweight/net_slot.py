"""The weighting net and its meta optimizer as the reweighter holds them: built once the class count is known,
initialised from the reweighter's seed on the model's device, and checked against a template before a saved
state is loaded."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ._rng import isolated_rng
from ._state import check_optimizer_state, check_tensor_shapes
from .class_checks import ClassChecks
from .distributed import DataParallelGroup
from .loss_history import LossHistory, check_history_state, warn_lossnet_history
from .losses import is_class_cross_entropy
from .meta_competence import MetaCompetence
from .monitor import MetaSignalMonitor
from .nets import WeightingOutput, create_weighting_net
from .noise_evidence import NoiseEvidence, check_evidence_state
from .options import AUTO_NET, AUTO_NET_OTHER, VETO_COMPETENCE, VETO_EVIDENCE, ReweighterOptions
from .settling import is_class_labels, settled

__all__ = ["NetSlot", "class_indices", "class_members", "class_normalize"]


def class_members(targets: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``(batch, num_classes)`` class membership: the one-hot rows of class indices, or soft targets as given."""
    if targets.ndim == 1:
        return torch.nn.functional.one_hot(targets.long(), num_classes).to(dtype)
    return targets.detach().to(dtype)


def class_indices(targets: Tensor) -> Tensor:
    """``(batch,)`` class indices: class indices as given (as int64), soft targets at their largest class (the
    reading of :func:`class_members`' rows)."""
    return targets.long() if targets.ndim == 1 else targets.argmax(-1)


def class_normalize(raw: Tensor, members: Tensor, group: DataParallelGroup) -> Tensor:
    """Raw weights rescaled within each class so that a class's weights sum to its count in the global batch:
    the net ranks the samples of a class among themselves and leaves each class its share of the loss.

    A class whose raw weights are all zero keeps zeros (Algorithm 1's delta guard, per class). With soft
    ``members`` a sample's scale is the membership-weighted mean of its classes' scales; the weights still sum
    to the batch size.

    Each class's raw weights are first divided by a constant of that class (the sum over ranks of its largest
    raw weight on each, without a gradient). The normalisation is free of any such constant, so neither the
    weights nor their gradient change; but a class whose raw weights sink into a sigmoid's tail (1e-20 and
    below) keeps sums near 1, whose reciprocal and its derivative stay finite."""
    with torch.no_grad():
        peaks = (raw.detach()[:, None] * (members > 0)).amax(0) if raw.numel() else members.sum(0)
        counts, peaks = group.sum_differentiable(torch.stack([members.sum(0), peaks.to(members.dtype)]))
        peaks = peaks + (peaks == 0).to(peaks.dtype)
    scaled = members * (raw[:, None] / peaks)
    totals = group.sum_differentiable(scaled.sum(0))
    scale = counts / (totals + (totals == 0).to(raw.dtype))
    return (scaled * scale).sum(1)  # not a matmul: autocast would run it in half precision


def sum_normalize(raw: Tensor, group: DataParallelGroup) -> Tensor:
    """``raw`` over its global sum times the global batch size (a zero sum gives zeros: Algorithm 1's delta guard)."""
    total = group.sum_differentiable(raw.sum())
    return raw * (raw.shape[0] * group.world_size / (total + (total == 0).to(raw.dtype)))


def refill_classes(kept: Tensor, before: Tensor, members: Tensor, cap: float, group: DataParallelGroup) -> Tensor:
    """``kept`` (the class-normalised weights ``before`` the veto, the vetoed samples at zero) with each class's kept
    samples scaled up by at most ``cap`` to take their class's vetoed share, then :func:`sum_normalize`'d: ``cap=inf``
    leaves each class its share, ``cap=1`` gives the batch every vetoed share. No host sync."""
    with torch.no_grad():
        sums = group.sum_differentiable(torch.stack([(members * w[:, None]).sum(0) for w in (before, kept)]))
        fill = torch.where(sums[1] > 0, (sums[0] / torch.where(sums[1] > 0, sums[1], 1.0)).clamp(max=cap), 0.0)
    return sum_normalize(kept * (members * fill).sum(1), group)


class NetSlot:
    """Holds :attr:`net` and :attr:`optimizer` (``None`` for L2RW, and for a net reading logits until :meth:`build`).

    Args:
        options: the reweighter's options (``net``, ``net_kwargs``, ``meta_optimizer``).
        init_seed: seed of a named net's initialisation (the global RNG is left as it was).
        group: data-parallel ranks; a built net is broadcast from rank 0.
    """

    def __init__(self, options: ReweighterOptions, init_seed: int, group: DataParallelGroup) -> None:
        self.options, self.init_seed, self.group = options, init_seed, group
        self.net: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.num_classes = options.num_classes
        self.class_checks = ClassChecks() if options.normalization == "class" else None
        self.history = LossHistory() if options.loss_history else None
        # veto_evidence=None: the first batch settles it (class labels or not); until then the evidence is kept, so
        # that a state loaded before that batch keeps its own
        gated = options.vetoes and (options.veto_evidence is None or options.veto_evidence > 0)
        self.evidence = NoiseEvidence(options.veto_evidence or VETO_EVIDENCE, group) if gated else None
        threshold = VETO_COMPETENCE if options.veto_competence is None else options.veto_competence  # None: pending
        self.competence = MetaCompetence(threshold, group) if gated and threshold > 0 else None
        self._history_unchecked = options.loss_history and options.net == "lossnet" and not is_class_cross_entropy(
            options.loss_fn
        )  # the library's cross-entropy was warned about at construction

    def settle(self, options: ReweighterOptions) -> None:
        """Adopt ``options`` in which the first batch (or a loaded state) settled ``net="auto"``,
        ``normalization="auto"``, ``veto_evidence=None`` or ``veto_competence=None`` (a no-op afterwards)."""
        fields = ("net", "normalization", "min_ess", "veto_evidence", "veto_competence")
        if any(getattr(options, f) != getattr(self.options, f) for f in fields):
            self.options = options
            self.class_checks = ClassChecks() if options.normalization == "class" else None
            if options.veto_evidence == 0:  # settled on targets other than class labels: nothing to wait for
                self.evidence = None
            if not options.veto_competence:
                self.competence = None

    def settled_by_state(self, net_state: Any, num_classes: int | None) -> ReweighterOptions:
        """This slot's options with a pending ``net="auto"`` settled by a saved net's layout (the gated net's or
        LossNet's); unchanged when nothing is pending or no net was saved."""
        if self.options.net != "auto" or not net_state or not isinstance(net_state, Mapping):
            return self.options
        for name, classes in ((AUTO_NET, num_classes), (AUTO_NET_OTHER, 1)):
            if classes is None:
                continue
            candidate = settled(self.options, name)
            if set(NetSlot(candidate, self.init_seed, self.group).template(classes).state_dict()) == set(net_state):
                return candidate
        return self.options  # no match: check_state refuses it against this slot

    def recall(self, sample_ids: Tensor | None, losses: Tensor) -> Tensor | None:
        """The batch's loss history for a net that reads it (``None`` otherwise)."""
        return None if self.history is None or sample_ids is None else self.history.lookup(sample_ids, losses)

    def state_entries(self) -> dict[str, Any]:
        """The reweighter state's ``"loss_history"`` (``None`` when it is off), ``"noise_evidence"`` and
        ``"meta_competence"`` (``None`` when the veto does not wait for them)."""
        return {
            "loss_history": None if self.history is None else self.history.state_dict(),
            "noise_evidence": None if self.evidence is None else self.evidence.state_dict(),
            "meta_competence": None if self.competence is None else self.competence.state_dict(),
        }

    def observe_noise(
        self, net_inputs: tuple[Any, ...], ahead: Tensor, now: Callable[[], tuple[Tensor, Tensor]], meta_targets: Tensor
    ) -> None:
        """Fold a meta update's training losses (net inputs ``(losses, logits, targets, ...)``) and the meta batch's
        losses into the veto's evidence of label noise, if it waits: for a net that reads the logits the meta losses
        at the current parameters, as the training losses are (``now()``, one no-grad forward, called only then);
        for LossNet those at the look-ahead (``ahead``), whose reading, lower early in a run, starts its veto sooner:
        at the current parameters LossNet, which cannot tell pair flips apart without the veto, lost the evidence
        under Flip-1 on three seeds of ten (docs/results.md). Each loss is read against its own class's meta losses
        on class labels (integer class indices of ``(batch, K)`` logits, whatever the normalisation; soft targets
        under ``normalization="class"``, read at their largest class), else against the whole meta batch's. The
        model's competence (``veto_competence``) reads the meta logits of the same forward (made for it alone
        for LossNet)."""
        if self.evidence is None:
            return
        losses, logits, targets = net_inputs[:3]
        meta_now = now() if self.options.requires_logits or self.competence is not None else None
        meta_losses = meta_now[0] if meta_now is not None and self.options.requires_logits else ahead
        if self.competence is not None:
            assert meta_now is not None
            self.competence.observe(meta_now[1], class_indices(meta_targets))
        if self.options.normalization == "class" or is_class_labels(logits, targets):
            self.evidence.observe(losses, meta_losses, class_indices(targets), class_indices(meta_targets))
        else:
            self.evidence.observe(losses, meta_losses)

    def remember(self, sample_ids: Tensor | None, losses: Tensor, finite: Tensor) -> None:
        """Fold the step's finite losses into the loss history (nothing when it is off). Under data parallelism
        every rank folds in the global batch's, so that each holds the whole history whichever rank a sample
        was dealt to."""
        if self.history is None or sample_ids is None:
            return
        if self.group.active:  # ids (exact in float64 below 2**53), losses and finite flags in one gather
            rows = torch.stack([sample_ids.to(losses.device, torch.float64), losses.double(), finite.double()], 1)
            rows = self.group.cat(rows)
            sample_ids, losses, finite = rows[:, 0].long(), rows[:, 1].to(losses.dtype), rows[:, 2] > 0
        self.history.record(sample_ids, losses, finite)

    def _create(self, num_classes: int, device: torch.device | None = None) -> nn.Module:
        assert isinstance(self.options.net, str)
        with isolated_rng(self.init_seed, torch.device("cpu")), device if device is not None else nullcontext():
            return create_weighting_net(self.options.net, num_classes, **self.options.net_kwargs)

    def template(self, num_classes: int) -> nn.Module:
        """The named net for ``num_classes`` built on the ``meta`` device (no memory), to check arguments
        and state shapes; on the CPU for a registered factory that cannot build on ``meta``."""
        try:
            return self._create(num_classes, torch.device("meta"))
        except (NotImplementedError, RuntimeError):
            return self._create(num_classes)

    def build(self, num_classes: int | None, device: torch.device, dtype: torch.dtype) -> None:
        """Build the net (a named one for ``num_classes``) and its optimizer; nothing for L2RW."""
        self.num_classes = num_classes
        if self.options.is_l2rw or self.options.net == "auto":  # net="auto": built once the first batch settles it
            return
        spec = self.options.net
        net = spec if isinstance(spec, nn.Module) else self._create(num_classes or 1)
        self.net = net.to(device=device, dtype=dtype)
        self.group.broadcast_([*self.net.parameters(), *self.net.buffers()])
        self.optimizer = self.options.meta_optimizer(self.net.parameters())
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"meta_optimizer must return a torch.optim.Optimizer, got {type(self.optimizer).__name__}")

    def class_labels(self, net_inputs: tuple[Any, ...]) -> tuple[Tensor | None, int | None]:
        """The batch's targets and class count under ``normalization="class"`` (for the collapse monitor), else
        ``(None, None)``; also for L2RW, whose weights for a class are all zero when none of its samples pulls
        the way the meta batch does (its rule, not a collapse)."""
        if self.options.normalization != "class" or self.options.is_l2rw:
            return None, None
        return net_inputs[2].detach(), net_inputs[1].shape[-1]

    def count_meta(self, meta: tuple[Any, Tensor]) -> tuple[Any, Tensor]:
        """Count a meta batch's labels for the class checks of ``normalization="class"``; return the batch."""
        if self.class_checks is not None:
            self.class_checks.meta(meta[1], self.num_classes)
        return meta

    def count_batch(self, net_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """Count a step's training labels (net inputs ``(losses, logits, targets, ...)``) for the class checks of
        ``normalization="class"``, once per step; return the net inputs."""
        if self.class_checks is not None:
            self.class_checks.train(net_inputs[2], net_inputs[1].shape[-1])
        if self._history_unchecked:  # LossNet with the history under a loss of the user's: are these class labels?
            self._history_unchecked = False
            if is_class_labels(net_inputs[1], net_inputs[2]):
                warn_lossnet_history(stacklevel=5)
        return net_inputs

    def group_weights(self) -> Tensor | None:
        """The net's current weight per group (:meth:`reweight.nets.GroupNet.group_weights`), detached; ``None``
        for a net without groups."""
        fn = getattr(self.net, "group_weights", None)
        if not callable(fn):
            return None
        with torch.no_grad():
            return fn().detach()

    def snapshot(self) -> tuple[Any, ...]:
        return self.net, self.optimizer, self.num_classes

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        self.net, self.optimizer, self.num_classes = snapshot

    def check_state(self, state: Mapping[str, Any], num_classes: int | None, options: ReweighterOptions) -> bool:
        """Check the ``"net"``, ``"meta_optimizer"`` and ``"loss_history"`` entries of a reweighter ``state`` against
        this slot with ``options`` (a template of the named net for ``num_classes`` if not built yet; ``options``
        settle a pending ``net="auto"``, :meth:`settled_by_state`); return whether loading builds the net first."""
        net_state, optimizer_state = state["net"], state["meta_optimizer"]
        check_history_state(state["loss_history"], self.history)
        check_evidence_state(state["noise_evidence"])
        check_evidence_state(state["meta_competence"], "meta_competence")
        classes = num_classes if options.requires_logits else num_classes or 1  # LossNet's size is the class-free 1
        build = self.net is None and not options.is_l2rw and options.net != "auto" and classes is not None
        if self.net is not None:
            assert self.optimizer is not None
            layout, groups = self.net.state_dict(), [len(g["params"]) for g in self.optimizer.param_groups]
            num_params = len(list(self.net.parameters()))
        elif build:
            assert classes is not None
            template = NetSlot(options, self.init_seed, self.group).template(classes)
            layout, groups, num_params = template.state_dict(), None, len(list(template.parameters()))
        else:  # L2RW, or a net whose class count is still unknown: nothing to load
            layout, groups, num_params = {}, None, 0
        check_tensor_shapes("weighting net", net_state, layout)
        check_optimizer_state(optimizer_state, groups, num_params)
        return build

    def load(
        self, state: Any, num_classes: int | None, build: bool, device: Any, dtype: Any, options: ReweighterOptions
    ) -> None:
        """Load the ``"net"``, ``"meta_optimizer"`` and ``"loss_history"`` entries of a reweighter ``state`` that
        :meth:`check_state` accepted with ``options`` (building the net first when it said so)."""
        self.settle(options)
        net_state, optimizer_state = state["net"], state["meta_optimizer"]
        if self.history is not None:
            self.history.load_state_dict(state["loss_history"])
        if self.evidence is not None:  # a state saved without it: none seen yet
            self.evidence.load_state_dict(state["noise_evidence"] or {"level": None, "shown": None}, device)
        if self.competence is not None:
            self.competence.load_state_dict(state["meta_competence"] or {"level": None, "shown": None}, device)
        if build:
            self.build(num_classes, device, dtype)
        self.num_classes = num_classes
        if self.net is not None:
            assert self.optimizer is not None
            self.net.load_state_dict(net_state)
            self.optimizer.load_state_dict(optimizer_state)

    def raw_weights(
        self,
        losses: Tensor,
        logits: Tensor,
        targets: Tensor,
        groups: Tensor | None = None,
        history: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The net's raw weights ``(batch,)`` and its penalty, computed in the net's own dtype; a net that reads
        groups (``requires_groups``) gets them as ``groups=``, one that reads the loss history as ``history=``,
        the others the interface ``(loss, logits, targets)``."""
        assert self.net is not None
        kwargs = {"groups": groups} if groups is not None else {}
        if history is not None:
            kwargs["history"] = history
        with torch.autocast(losses.device.type, enabled=False):  # the net and its update stay in its dtype
            out = self.net(losses, logits, targets, **kwargs)
        raw, penalty = (out.weights, out.penalty) if isinstance(out, WeightingOutput) else (out, None)
        if raw.ndim == 2 and raw.shape[1] == 1:
            raw = raw.squeeze(1)
        if raw.shape != losses.shape:
            raise ValueError(f"the weighting net returned shape {tuple(raw.shape)}, expected {tuple(losses.shape)}")
        return raw, penalty

    def normalize(self, raw: Tensor, net_inputs: tuple[Any, ...], keep: Tensor | None = None) -> Tensor:
        """Normalise the raw weights of the batch whose net inputs are ``(losses, logits, targets, ...)``, then
        apply the ``min_ess`` floor (:meth:`floor_ess`) over the samples in ``keep`` (all when ``None``).

        ``"sum"``: :func:`sum_normalize`; ``"class"``: the same within each class of the targets
        (:func:`class_normalize`); ``"none"``: ``raw``. No host sync."""
        mode = self.options.normalization
        if mode == "sum":
            raw = sum_normalize(raw, self.group)
        elif mode == "class":
            raw = class_normalize(raw, class_members(net_inputs[2], net_inputs[1].shape[-1], raw.dtype), self.group)
        return self.floor_ess(raw, keep)

    def floor_ess(self, weights: Tensor, keep: Tensor | None = None) -> Tensor:
        """Blend ``weights`` toward their mean just enough that the effective sample size
        ``(sum w)^2 / sum w^2`` of the global batch (the samples in ``keep``) is at least ``min_ess`` of it; while
        the veto waits for evidence of label noise, at least ``min_ess_until_evidence`` (if higher) at an evidence
        level of 0 or below, falling linearly to ``min_ess`` as the level reaches the evidence's threshold.

        The blend keeps the sum and the order of the weights; its share is computed without a gradient and
        without a host sync, so the net's meta-gradient is the weights' own scaled by ``1 - share``."""
        floor = self.options.min_ess
        assert floor is not None, "min_ess is settled with normalization='auto' by the first batch, before any weight"
        until = self.options.min_ess_until_evidence
        assert until is not None, "min_ess_until_evidence is settled by the first batch, before any weight"
        quiet = max(floor, until) if self.evidence is not None else floor
        if quiet == 0:
            return weights
        mask = torch.ones_like(weights) if keep is None else keep.to(weights.dtype)
        with torch.no_grad():
            w = weights * mask
            count, s1, s2 = (self.group.sum_differentiable(t) for t in (mask.sum(), w.sum(), (w * w).sum()))
            count = count.clamp(min=1)
            mean = s1 / count
            var = (s2 / count - mean * mean).clamp(min=0)
            after = math.inf if floor == 0 else 1 / floor - 1  # variance allowed per mean^2 once the evidence shows
            factor: float | Tensor = 1 / quiet - 1 if quiet > floor else after
            evidence = self.evidence
            if quiet > floor and evidence is not None and evidence.level is not None and evidence.shown is not None:
                # the floor gives way as the evidence builds: weights the evidence needs are not held back from it
                rise = (evidence.level.to(mean.device, mean.dtype) / evidence.threshold).clamp(0, 1)
                factor = torch.where(evidence.shown.to(mean.device), after, 1 / (quiet - (quiet - floor) * rise) - 1)
            allowed = mean * mean * factor  # the largest variance with ESS >= the floor
            scale = torch.where(var > allowed, torch.sqrt(allowed / torch.where(var > 0, var, 1)), 1)
        return torch.where(mask > 0, scale * weights + (1 - scale) * mean, weights)

    @torch.no_grad()
    def current_weights(self, net_inputs: tuple[Any, ...], finite: Tensor) -> Tensor:
        """The net's normalised weights in eval mode, 0 where the loss or the net's output is not finite;
        uniform over the finite samples for L2RW (whose weights come from a meta update only)."""
        if self.options.is_l2rw:
            return self.normalize(finite.to(torch.get_default_dtype()), net_inputs, finite)
        assert self.net is not None
        self.net.eval()
        raw, _ = self.raw_weights(*net_inputs)
        keep = finite & torch.isfinite(raw)  # a NaN / inf logit can make the net's output NaN for a finite loss
        return self.normalize(torch.where(keep, raw, torch.zeros_like(raw)), net_inputs, keep)

    def vetoed(self, weights: Tensor, unit: Tensor, net_inputs: tuple[Any, ...], step: int) -> Tensor:
        """``weights`` with the samples whose coefficient ``c_i = dL_meta/dw_i``, times the warm-up factor of
        ``step`` (:meth:`ReweighterOptions.veto_factor`), is above ``veto`` times the global batch's mean ``|c|``
        set to zero (weighting them up raises the meta loss), normalised again (:meth:`normalize`, or under
        ``"class"`` with a finite ``veto_refill`` :func:`refill_classes`; then the floor); ``unit``: the coefficients
        over their global sum of magnitudes, as :meth:`update` returns them.
        The coefficients are first :meth:`centered` within the batch's :meth:`veto_group`, if any. Under
        ``veto_evidence`` nothing is vetoed until the evidence of label noise is shown (and under
        ``veto_competence`` the model's competence on the meta set). No host sync."""
        group = self.veto_group(net_inputs)
        if group is not None:
            unit = self.centered(unit, weights, net_inputs, group)
        scale = unit.numel() * self.group.world_size * self.options.veto_factor(step)
        kept = weights * (unit * scale <= self.options.veto).to(weights.dtype)
        if self.options.normalization == "class" and math.isfinite(self.options.veto_refill):
            members = class_members(net_inputs[2], net_inputs[1].shape[-1], kept.dtype)
            vetoed = self.floor_ess(refill_classes(kept, weights, members, self.options.veto_refill, self.group))
        else:
            vetoed = self.normalize(kept, net_inputs)
        if self.evidence is None:
            return vetoed
        shown = self.evidence.shown  # observed at this meta update, before the veto reads it
        if shown is not None and self.competence is not None:
            competent = self.competence.shown
            shown = shown & competent.to(shown.device) if competent is not None else torch.zeros_like(shown)
        return weights if shown is None else torch.where(shown.to(weights.device), vetoed, weights)

    def veto_group(self, net_inputs: tuple[Any, ...]) -> str | None:
        """Within what the veto reads the coefficients of this batch (``veto_center``): ``"class"`` under
        ``normalization="class"`` (by default and with ``True``), and with ``True`` under ``"sum"`` on class labels
        (integer class indices of ``(batch, K)`` logits); ``"batch"`` with ``True`` under ``"sum"`` on other
        targets; ``None`` (as they are) otherwise."""
        center, mode = self.options.veto_center, self.options.normalization
        if not self.options.vetoes or center is False:
            return None
        if mode == "class":
            return "class"
        if center and mode == "sum":
            return "class" if is_class_labels(net_inputs[1], net_inputs[2]) else "batch"
        return None

    def centered(self, unit: Tensor, weights: Tensor, net_inputs: tuple[Any, ...], group: str) -> Tensor:
        """``unit`` less the ``weights``-weighted mean of its ``group`` over the global batch (``"class"``: its class,
        a soft target's classes by membership; ``"batch"``: the batch), over the global sum of its magnitudes.
        The class part of ``c_i`` says how the meta batch would shift the classes' shares, not whether the sample
        is clean: read as it is, the veto could remove most of a class from a batch. Within a class, vetoing a
        sample and normalising the class again changes the meta loss by its weight times ``c_i`` less the mean,
        to first order. The weighted differences of a group sum to zero, so at ``veto >= 0`` a group with
        positive weights keeps a sample."""
        with torch.no_grad():
            uw = unit * weights
            if group == "class":
                members = class_members(net_inputs[2], net_inputs[1].shape[-1], unit.dtype)
                sums, mass = self.group.sum_differentiable(torch.stack([members.T @ uw, members.T @ weights]))
                reference = members @ (sums / torch.where(mass > 0, mass, torch.ones_like(mass)))
            else:
                sums, mass = self.group.sum_differentiable(torch.stack([uw.sum(), weights.sum()]))
                reference = sums / torch.where(mass > 0, mass, torch.ones_like(mass))
            centered = unit - reference
            magnitude = self.group.sum_differentiable(centered.abs().sum())
            return centered / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))

    def update(
        self,
        coefficients: Tensor,
        weights: Tensor,
        penalty: Tensor | None,
        monitor: MetaSignalMonitor | None,
        step: int,
        optimizer: torch.optim.Optimizer,
        lookahead_lr: float | None,
    ) -> Tensor:
        """One step of the net on the meta-gradient: backpropagate ``(sum_i c_i * w_i(phi) + penalty) / sum_i |c_i|``
        (exact in direction because ``c`` does not depend on ``phi``), sum the net's gradients over ranks, let
        the weak-signal ``monitor`` read them, warm the meta lr up, and step the meta optimizer. Returns the
        coefficients over ``sum_i |c_i|`` of the global batch (detached; what :meth:`vetoed` reads).

        Dividing by ``sum |c|`` makes the update's size independent of the training lr's scale (``c`` is
        proportional to it): SGD at 0.1 and AdamW at 5e-5 move the net alike, and neither Adam's ``eps`` nor
        a weight decay can outweigh a small meta-gradient. The penalty (MetaInfoNet's KL term) is divided by the
        same scale, so its balance with the meta-gradient is the one ``kl_weight`` was chosen with."""
        assert self.net is not None and self.optimizer is not None
        c = coefficients.detach().to(weights.dtype)
        total = self.group.sum_differentiable(c.abs().sum())  # over every rank: the global batch's
        scale = torch.where(total > 0, total, torch.ones_like(total))  # no lr scale, no host sync
        surrogate = meta_part = (c * weights).sum() / scale
        meta_grads = None
        if penalty is not None:  # each rank holds 1/world of the global batch's penalty, scaled alike
            surrogate = surrogate + penalty / (self.group.world_size * scale)
            if monitor is not None and not self.group.active and monitor.checks_next():
                # the weak-signal check reads the meta-gradient alone, not the penalty's pull
                meta_grads = torch.autograd.grad(
                    meta_part, list(self.net.parameters()), retain_graph=True, allow_unused=True
                )
        self.optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        self.group.sum_grads_(self.net.parameters())
        if monitor is not None:
            monitor.observe(step, self.net, self.optimizer, optimizer, lookahead_lr, weights, meta_grads)
        self._schedule(step, optimizer)
        self.optimizer.step()
        return c / scale

    def _schedule(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Each group's lr at ``min(1, (step + 1) / meta_warmup)`` of its own, times (``meta_follows_lr``) the
        training lr over the largest training lr seen at a meta update. The group's own lr and that largest lr
        are kept in the group (``"reweight_lr"``, ``"reweight_peak_lr"``), so they travel with the optimizer's
        state and a resume is exact. The training lrs are read as floats: a tensor lr on an accelerator costs
        a host sync per meta update, with ``meta_follows_lr`` only."""
        assert self.optimizer is not None
        warmup, follows = self.options.meta_warmup, self.options.meta_follows_lr
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if follows:
            lrs = [float(g["lr"]) for g in optimizer.param_groups]
            current = sum(lrs) / len(lrs)
        for group in self.optimizer.param_groups:
            if warmup == 0 and not follows and "reweight_lr" not in group:
                continue
            base = group.setdefault("reweight_lr", group["lr"])
            ratio = 1.0
            if follows:
                peak = group["reweight_peak_lr"] = max(group.get("reweight_peak_lr", 0.0), current)
                ratio = current / peak if peak > 0 else 1.0
            group["lr"] = base * factor * ratio
