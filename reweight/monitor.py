"""Weight-collapse guard: warn once when the weighting net stops discriminating between samples.

Two symptoms are watched on the weights :meth:`MetaReweighter.step` returns:

- every weight of the batch is below ``threshold``: with ``normalization="none"`` the net switched the
  batch off and training stalls; with ``"sum"`` (mean weight 1) this means all raw weights were zero;
- the weights are (nearly) constant over a batch whose losses are not: the net ignores its inputs and
  reweighting has degenerated into plain (re-scaled) training.

Checking costs one host sync, so it runs every ``every`` steps only, and warns after ``patience``
consecutive positive checks (a single all-zero batch is normal for L2RW). It issues no collective: under
DDP each rank checks its own shard.

Remedies: lower the meta learning rate (``meta_optimizer``), keep ``normalization="sum"``, check the meta
set (clean labels, the training classes and distribution, not too small), or set ``lookahead_lr`` when the
training lr is in warm-up or Adam-sized. See docs/robustness.md.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = ["CollapseMonitor", "WeightCollapseWarning"]

_REMEDY = (
    "Remedies: lower the meta learning rate (meta_optimizer), use normalization='sum', check the meta set "
    "(clean labels, the training classes and distribution, enough samples), or set lookahead_lr during "
    "warm-up; see docs/robustness.md"
)


class WeightCollapseWarning(RuntimeWarning):
    """The weighting net's outputs collapsed (all below the threshold, or constant over a batch)."""


class CollapseMonitor:
    """Watches the weights every ``every`` steps and warns once, naming the step, when they collapse.

    Args:
        threshold: the weights have collapsed when all weights of a batch are below it (default: ``1e-3``).
        rtol: the outputs are constant when ``max - min <= rtol * max |w|`` over a batch whose losses vary by
            more than that relative amount (default: ``1e-4``).
        every: check on steps ``0, every, 2 * every, ...`` only; each check is one host sync (default: ``50``).
        patience: warn after this many consecutive positive checks (default: ``2``).

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Example:
        >>> monitor = CollapseMonitor(threshold=1e-3, every=1, patience=1)
        >>> monitor.observe(0, torch.tensor([0.2, 0.7]), torch.tensor([1.0, 2.0]))
        >>> monitor.fired_at is None
        True
    """

    def __init__(self, threshold: float = 1e-3, rtol: float = 1e-4, every: int = 50, patience: int = 2) -> None:
        for name, value in (("threshold", threshold), ("rtol", rtol)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, value in (("every", every), ("patience", patience)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.threshold = float(threshold)
        self.rtol = float(rtol)
        self.every = every
        self.patience = patience
        self.fired_at: int | None = None
        self._streak = 0

    def observe(self, step: int, weights: Tensor, losses: Tensor) -> None:
        """Check a batch's ``weights`` and per-sample ``losses`` (shape ``(batch,)``) on checking steps."""
        if self.fired_at is not None or step % self.every or weights.numel() == 0:
            return
        reason = self._reason(weights.detach(), losses.detach())
        self._streak = self._streak + 1 if reason else 0
        if reason and self._streak >= self.patience:
            self.fired_at = step
            warnings.warn(f"weight collapse at step {step}: {reason}. {_REMEDY}", WeightCollapseWarning, stacklevel=3)

    def _reason(self, w: Tensor, losses: Tensor) -> str | None:
        w = w.float()
        low, high = torch.aminmax(w)
        stats = torch.stack([low, high, w.abs().max(), *torch.aminmax(losses.float())]).tolist()  # one sync
        low, high, scale, loss_low, loss_high = stats
        if high < self.threshold:
            return f"all weights of the batch are below {self.threshold:g} (largest {high:.3g})"
        if w.numel() > 1 and high - low <= self.rtol * scale:
            if loss_high - loss_low > self.rtol * max(abs(loss_high), abs(loss_low)):
                return f"the weights are constant over a batch whose losses vary ({low:.6g} to {high:.6g})"
        return None

    def reset(self) -> None:
        """Re-arm the warning."""
        self.fired_at, self._streak = None, 0
