"""Weight-collapse guard: warn once when the weighting net stops discriminating between samples.

Two symptoms are watched on the weights :meth:`MetaReweighter.step` returns:

- every weight of the batch is below ``threshold``: with ``normalization="none"`` the net switched the
  batch off and training stalls; with ``"sum"`` or ``"class"`` (mean weight 1) this means all raw weights were zero;
- the weights are (nearly) constant over a batch whose losses are not: the net ignores its inputs and
  reweighting has degenerated into plain (re-scaled) training.

Checking costs one host sync, so it runs every ``every`` steps only, and warns after ``patience``
consecutive positive checks (a single all-zero batch is normal for L2RW). It issues no collective: under
DDP each rank checks its own shard.

Remedies: lower the meta learning rate (``meta_optimizer``), keep a normalisation (not ``"none"``), check the meta
set (clean labels, the training classes and distribution, not too small), or set ``lookahead_lr`` while the
training lr warms up from 0. See docs/robustness.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CollapseMonitor",
    "ShortRunWarning",
    "WeightCollapseWarning",
    "MetaSignalMonitor",
    "WeakMetaGradientWarning",
    "weight_statistics",
    "effective_sample_size",
]


def effective_sample_size(weights: Tensor) -> Tensor:
    """``(sum w)^2 / (n * sum w^2)``: the share of the batch that carries its loss (1 for uniform weights,
    ``k / n`` when ``k`` equal weights carry it all, 0 for an all-zero batch); a 0-d tensor, no host sync.

    Example:
        >>> float(effective_sample_size(torch.tensor([1.0, 1.0, 0.0, 0.0])))
        0.5
    """
    w = weights.detach().float()
    squares = w.square().sum()
    return torch.where(squares > 0, w.sum().square() / (w.numel() * squares.clamp(min=1e-30)), squares)


def weight_statistics(weights: Tensor) -> dict[str, Tensor]:
    """The logged statistics of one batch's weights as 0-d tensors on their device (no host sync):
    ``weight_std``, ``weight_min``, ``weight_max`` and ``weight_ess`` (:func:`effective_sample_size`).

    Example:
        >>> {k: round(float(v), 3) for k, v in weight_statistics(torch.tensor([0.5, 1.5])).items()}
        {'weight_std': 0.5, 'weight_min': 0.5, 'weight_max': 1.5, 'weight_ess': 0.8}
    """
    w = weights.detach().float()
    low, high = torch.aminmax(w)
    return {
        "weight_std": w.std(unbiased=False),
        "weight_min": low,
        "weight_max": high,
        "weight_ess": effective_sample_size(w),
    }


_REMEDY = (
    "Remedies: lower the meta learning rate (meta_optimizer), use normalization='class' or 'sum', check the meta set "
    "(clean labels, the training classes and distribution, enough samples), set lookahead_lr during warm-up, or, "
    "when the meta batch vetoes whole batches, raise veto (math.inf: none); see docs/robustness.md"
)


def _in_zero_classes(weights: Tensor, classes: Tensor | None, num_classes: int | None) -> Tensor:
    """How many samples belong to a class whose weights in the batch are all zero; 0 without ``classes`` (class
    indices, or soft targets whose non-zero entries name a sample's classes). No host sync."""
    if classes is None or num_classes is None or classes.shape[0] != weights.shape[0]:
        return weights.new_zeros(())
    if classes.ndim == 1:
        members = torch.nn.functional.one_hot(classes.long(), num_classes).bool()
    else:
        members = classes > 0
    present = members.any(0)
    class_max = torch.where(members, weights[:, None], torch.zeros_like(weights)[:, None]).amax(0)
    dead = present & (class_max == 0)
    return (members & dead[None, :]).any(1).sum().to(weights.dtype)


class ShortRunWarning(UserWarning):
    """The run ends before the weighting net's meta lr has warmed up while the meta-gradient's veto already acts:
    the weights are then the veto's alone, read off a model that has learned little."""


class WeightCollapseWarning(RuntimeWarning):
    """The weighting net's outputs collapsed (all below the threshold, constant over a batch, or carried by a
    few samples)."""


class CollapseMonitor:
    """Watches the weights every ``every`` steps and warns once, naming the step, when they collapse.

    Args:
        threshold: the weights have collapsed when all weights of a batch are below it (default: ``1e-3``).
        rtol: the outputs are constant when ``max - min <= rtol * max |w|`` over a batch whose losses vary by
            more than that relative amount (default: ``1e-4``).
        min_ess: the weights have collapsed onto a few samples when the batch's effective sample size
            (:func:`effective_sample_size`) is below this share of the batch (default: ``0.1``: a tenth of the
            batch carries its loss; healthy runs on 40-60% label noise stay above 0.3).
        every: check on steps ``0, every, 2 * every, ...`` only; each check is one host sync (default: ``50``).
        patience: warn after this many consecutive positive checks (default: ``2``).
        constant_after: constant weights are flagged from this step on (default: ``0``). The named nets start
            from uniform weights by design, so :class:`~reweight.MetaReweighter` sets it to its ``meta_warmup``:
            a net still close to its start under the warm-up or a long ``interval`` is not a collapse.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Example:
        >>> monitor = CollapseMonitor(threshold=1e-3, every=1, patience=1)
        >>> monitor.observe(0, torch.tensor([0.2, 0.7]), torch.tensor([1.0, 2.0]))
        >>> monitor.fired_at is None
        True
    """

    def __init__(
        self,
        threshold: float = 1e-3,
        rtol: float = 1e-4,
        every: int = 50,
        patience: int = 2,
        min_ess: float = 0.1,
        constant_after: int = 0,
    ) -> None:
        for name, value in (("threshold", threshold), ("rtol", rtol), ("min_ess", min_ess)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        counts = (("every", every, 1), ("patience", patience, 1), ("constant_after", constant_after, 0))
        for name, value, least in counts:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self.threshold = float(threshold)
        self.rtol = float(rtol)
        self.min_ess = float(min_ess)
        self.every = every
        self.patience = patience
        self.constant_after = constant_after
        self.fired_at: int | None = None
        self._streak = 0

    def observe(
        self,
        step: int,
        weights: Tensor,
        losses: Tensor,
        classes: Tensor | None = None,
        num_classes: int | None = None,
        net_weights: Tensor | None = None,
    ) -> None:
        """Check a batch's ``weights`` and per-sample ``losses`` (shape ``(batch,)``) on checking steps; given the
        samples' ``classes`` among ``num_classes`` (under ``normalization="class"``), also that no class present
        in the batch has all its weights at zero. ``net_weights``: the net's own, before the veto (which may
        rightly zero a class, or samples of a constant net, on a step): the constant and zero-class checks read
        them (default: ``weights``)."""
        if self.fired_at is not None or step % self.every or weights.numel() == 0:
            return
        own = (weights if net_weights is None else net_weights).detach()
        dead = _in_zero_classes(own.float(), classes, num_classes)
        reason = self._reason(weights.detach(), losses.detach(), step >= self.constant_after, dead, own)
        self._streak = self._streak + 1 if reason else 0
        if reason and self._streak >= self.patience:
            self.fired_at = step
            warnings.warn(f"weight collapse at step {step}: {reason}. {_REMEDY}", WeightCollapseWarning, stacklevel=3)

    def _reason(
        self, w: Tensor, losses: Tensor, constant: bool = True, dead: Tensor | None = None, own: Tensor | None = None
    ) -> str | None:
        w = w.float()
        own = w if own is None else own.float()
        ess = effective_sample_size(w)
        dead = w.new_zeros(()) if dead is None else dead
        parts = [w.max(), *torch.aminmax(own), own.abs().max(), ess, *torch.aminmax(losses.float()), dead]
        high, low, own_high, scale, ess, loss_low, loss_high, dead = torch.stack(parts).tolist()  # one sync
        if high < self.threshold:
            return f"all weights of the batch are below {self.threshold:g} (largest {high:.3g})"
        if dead:
            return (
                f"{dead:.0f} of the batch's {w.numel()} samples belong to classes whose weights are all zero, so "
                "normalization='class' cannot give those classes their share of the loss (the net's outputs for "
                "them are zero or have underflowed)"
            )
        if w.numel() > 1 and ess < self.min_ess:
            return (
                f"a few samples carry each batch's loss (effective sample size {ess:.0%} of the batch, below "
                f"{self.min_ess:.0%}); keep the floor min_ess at its default 0.2 or raise it (the weights are blended "
                "toward their mean until that share of the batch carries its loss), or try a lower meta learning rate"
            )
        if constant and w.numel() > 1 and own_high - low <= self.rtol * scale:
            if loss_high - loss_low > self.rtol * max(abs(loss_high), abs(loss_low)):
                return (
                    f"the weights are constant ({low:.6g} to {own_high:.6g}) over a batch whose losses vary "
                    f"({loss_low:.4g} to {loss_high:.4g})"
                )
        return None

    def reset(self) -> None:
        """Re-arm the warning."""
        self.fired_at, self._streak = None, 0


_SUGGESTED_LOOKAHEAD_LR = 0.1


class WeakMetaGradientWarning(RuntimeWarning):
    """The meta-gradient reaching the weighting net is too small for the net to learn from it."""


def _coupled_decay(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """The group's weight decay if the optimizer adds it to the gradient (Adam, SGD, ...), else 0 (AdamW)."""
    if isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False):
        return 0.0
    return float(group.get("weight_decay", 0.0) or 0.0)


class MetaSignalMonitor:
    """Warns once when the weighting net's meta-gradient stays below its optimizer's weight-decay pull.

    After a meta update's backward the net's gradient is the (normalised) meta-gradient alone; a meta optimizer
    of your own with coupled weight decay (``Adam(weight_decay=...)``, SGD) then adds ``weight_decay * phi``.
    While the meta-gradient's norm is the smaller, the net follows its decay rather than the meta set and the
    weights stay near uniform. With the default meta optimizer (AdamW, decoupled decay) this happens only when
    the meta-gradient is zero: during a training-lr warm-up from 0, where ``lookahead_lr`` is the fix.

    A check is weak when the gradient is below the pull (a zero gradient counts as below, even without
    weight decay) *and* the batch's weights are still near uniform (standard deviation below ``spread`` times
    their mean magnitude): a net that has learned, whose meta-gradient then shrinks with a decaying lr at the
    end of training, is left alone. The first meta update (an untrained net) is not judged. On every
    ``every``-th meta update after it the three numbers are computed on the device and copied to the host
    without waiting; they are read at the next check, so the monitor adds no host synchronisation. It warns
    after ``patience`` consecutive weak checks.

    Args:
        every: check every ``every`` meta updates (default: ``50``).
        patience: warn after this many consecutive weak checks (default: ``3``).
        spread: weights whose std is below ``spread`` times their mean magnitude count as near uniform
            (default: ``0.1``).

    Raises:
        TypeError: if an argument is not an int.
        ValueError: if an argument is below 1.
    """

    def __init__(self, every: int = 50, patience: int = 3, spread: float = 0.1) -> None:
        for name, value in (("every", every), ("patience", patience)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if isinstance(spread, bool) or not isinstance(spread, int | float) or not spread >= 0:
            raise ValueError(f"spread must be a number >= 0, got {spread!r}")
        self.every = every
        self.patience = patience
        self.spread = float(spread)
        self.fired_at: int | None = None
        self._updates = 0
        self._streak = 0
        self._pending: tuple[int, Tensor, Any, str] | None = None

    def observe(
        self,
        step: int,
        net: torch.nn.Module,
        meta_optimizer: torch.optim.Optimizer,
        optimizer: torch.optim.Optimizer,
        lookahead_lr: float | None,
        weights: Tensor,
        meta_grads: Sequence[Tensor | None] | None = None,
    ) -> None:
        """Record the net's gradient (just after the meta update's backward) and the batch's ``weights`` on
        checking updates; ``meta_grads``, when given, replace the net's ``.grad`` (the meta-gradient without
        the gradient of a penalty such as MetaInfoNet's KL term)."""
        self._updates += 1
        if self.fired_at is not None:
            return
        self._judge_pending()
        if self.fired_at is not None or (self._updates - 1) % self.every or self._updates == 1:
            return
        grads, pull = [], []
        for group in meta_optimizer.param_groups:
            decay = _coupled_decay(meta_optimizer, group)
            for p in group["params"]:
                if meta_grads is None and p.grad is not None:
                    grads.append(p.grad.detach().float().pow(2).sum())
                if decay:
                    pull.append((decay * p.detach().float()).pow(2).sum())
        if meta_grads is not None:
            grads = [g.detach().float().pow(2).sum() for g in meta_grads if g is not None]
        if not grads:
            return
        w = weights.detach().float()
        spread = w.std(unbiased=False) / w.abs().mean().clamp_min(1e-12) if w.numel() > 1 else w.new_zeros(())
        total = torch.stack([torch.stack(grads).sum(), torch.stack(pull).sum() if pull else grads[0] * 0]).sqrt()
        norms = torch.cat([total, spread.to(total.dtype).reshape(1)])
        decay_fix = "give the net a decoupled decay (meta_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))"
        if lookahead_lr is not None:
            lr, largest = f"lookahead_lr={lookahead_lr:g}", lookahead_lr
        else:
            lrs = sorted({float(g["lr"]) for g in optimizer.param_groups})
            lr, largest = f"the optimizer's current lr ({', '.join(f'{v:g}' for v in lrs)})", lrs[-1]
        if largest < _SUGGESTED_LOOKAHEAD_LR:
            fix = f"pass lookahead_lr={_SUGGESTED_LOOKAHEAD_LR:g} (or larger) to the reweighter, or {decay_fix}"
        else:  # the look-ahead lr is not small: the decay, the meta set or the model is the thing to change
            fix = f"{decay_fix}, or check the meta set (clean labels, the training classes)"
        lr = f"{lr}: {fix}"
        event = None
        if norms.is_cuda:
            host = torch.empty(3, dtype=norms.dtype, pin_memory=True)
            host.copy_(norms, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            norms = host
        self._pending = (step, norms, event, lr)
        if event is None:
            self._judge_pending()

    def checks_next(self) -> bool:
        """Whether the next :meth:`observe` may record a check (the caller then passes ``meta_grads``)."""
        n = self._updates + 1
        return self.fired_at is None and n != 1 and (n - 1) % self.every == 0

    def _judge_pending(self) -> None:
        if self._pending is None:
            return
        step, norms, event, lr = self._pending
        if event is not None and not event.query():
            return  # not copied yet: judged at a later update
        self._pending = None
        grad, pull, spread = norms.tolist()
        weak = (grad == 0 or grad < pull) and spread < self.spread
        self._streak = self._streak + 1 if weak else 0
        if weak and self._streak >= self.patience:
            self.fired_at = step
            warnings.warn(
                f"step {step}: the weighting net's meta-gradient (norm {grad:.2g}) has stayed below its "
                f"optimizer's weight-decay pull ({pull:.2g}) for {self._streak} checks: the net follows its weight "
                f"decay, not the meta set, and the weights stay near uniform (std/mean {spread:.2g}). "
                "The meta-gradient scales with the "
                f"look-ahead learning rate, here {lr}. See docs/robustness.md, 'Weights that never move'",
                WeakMetaGradientWarning,
                stacklevel=6,  # the caller of MetaReweighter.step
            )

    def reset(self) -> None:
        """Re-arm the warning."""
        self.fired_at, self._streak, self._pending = None, 0, None
