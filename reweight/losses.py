"""Per-sample losses: the one place where a batch of outputs becomes a vector of losses.

A per-sample loss is any callable ``loss_fn(logits, targets) -> Tensor`` of shape ``(batch,)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["PerSampleLoss", "cross_entropy", "check_class_targets"]

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


def check_class_targets(logits: Tensor, targets: Tensor) -> None:
    """Check that ``targets`` are class indices in ``[0, K)`` or soft targets of shape ``(batch, K)``.

    Raises:
        ValueError: if ``logits`` is not ``(batch, K)``, the shapes disagree, or a label is out of range.
    """
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (batch, num_classes), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if targets.ndim == 2:
        if not targets.is_floating_point() or targets.shape != logits.shape:
            raise ValueError(
                f"soft targets must be floating point with the logits' shape {tuple(logits.shape)}, "
                f"got {targets.dtype} of shape {tuple(targets.shape)}"
            )
        return
    if targets.ndim != 1 or targets.is_floating_point() or targets.is_complex():
        raise ValueError(
            "targets must be integer class indices of shape (batch,) or soft targets of shape "
            f"(batch, num_classes); got {targets.dtype} of shape {tuple(targets.shape)}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        lo, hi = int(targets.min()), int(targets.max())
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def cross_entropy(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Per-sample cross-entropy for class indices or soft targets (mixup, distillation).

    Args:
        logits: ``(batch, num_classes)`` unnormalised scores.
        targets: ``(batch,)`` class indices in ``[0, num_classes)`` or ``(batch, num_classes)`` probabilities.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy` (default: ``0.0``).

    Returns:
        Tensor of shape ``(batch,)``.

    Raises:
        ValueError: on a shape mismatch or a label outside ``[0, num_classes)``.

    Example:
        >>> cross_entropy(torch.zeros(2, 3), torch.tensor([0, 2])).shape
        torch.Size([2])
    """
    check_class_targets(logits, targets)
    if targets.ndim == 1:
        targets = targets.long()
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
