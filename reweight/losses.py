"""Per-sample losses: the one place where a batch of outputs becomes a vector of losses.

A per-sample loss is any callable ``loss_fn(logits, targets) -> Tensor`` of shape ``(batch,)``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._compat import assert_async, tensor_version

__all__ = [
    "PerSampleLoss",
    "cross_entropy",
    "is_class_cross_entropy",
    "check_class_targets",
    "binary_cross_entropy",
    "sequence_cross_entropy",
    "shift_causal_labels",
    "causal_lm_loss",
]

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


_LAST_CHECKED: list[Any] = [None, None]  # a weak reference to the labels checked last, and their key


def _checked_before(targets: Tensor, num_classes: int) -> bool:
    """Whether ``targets`` (unchanged since: same version) were the last labels found in ``[0, num_classes)``;
    a passing check remembers them. A step checks its labels once for the per-sample losses, then again in the
    engine's passes and the weighting net: the range check is a reduction and a device assert each time."""
    ref, key = _LAST_CHECKED
    return ref is not None and ref() is targets and key[0] is not None and key == _key(targets, num_classes)


def _key(targets: Tensor, num_classes: int) -> tuple[Any, ...]:
    return (tensor_version(targets), num_classes, targets.data_ptr(), targets.shape)


def check_class_targets(logits: Tensor, targets: Tensor) -> None:
    """Check that ``targets`` are class indices in ``[0, K)`` or soft targets of shape ``(batch, K)``.

    The label range is checked without a host sync: on a GPU an out-of-range label stops the process with
    a device-side assert (the CUDA error names this check) instead of a ``ValueError``.

    Raises:
        ValueError: if ``logits`` is not ``(batch, K)``, the shapes disagree, or (on the CPU) a label is
            out of range.
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
    if targets.numel() and not _checked_before(targets, num_classes):
        in_range = ((targets >= 0) & (targets < num_classes)).all()
        try:  # a device-side assert: no host sync (a CPU tensor is checked at once, a GPU's at its next sync)
            assert_async(in_range, f"labels must lie in [0, {num_classes})")
        except RuntimeError:
            lo, hi = int(targets.min()), int(targets.max())
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]") from None
        _LAST_CHECKED[:] = [weakref.ref(targets), _key(targets, num_classes)]


def cross_entropy(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Per-sample cross-entropy for class indices or soft targets (mixup, distillation).

    It is also the per-sample form of timm's ``LabelSmoothingCrossEntropy`` (``label_smoothing``) and
    ``SoftTargetCrossEntropy`` (soft targets, whose rows need not be normalised).

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


def is_class_cross_entropy(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is :func:`cross_entropy` (also a ``functools.partial`` of it, e.g. label smoothing):
    a loss on class logits ``(batch, num_classes)``.

    Example:
        >>> is_class_cross_entropy(functools.partial(cross_entropy, label_smoothing=0.1))
        True
    """
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return loss_fn is cross_entropy


# ---------------------------------------------------------------------------------------------------------
# Per-sample versions of the losses that trainers use (Hugging Face, timm). Framework-free.

_SEQUENCE_REDUCTIONS = ("token_mean", "sum", "sequence_mean")


def _check_smoothing(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")


def binary_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    smoothing: float = 0.0,
    target_threshold: float | None = None,
    weight: Tensor | None = None,
    pos_weight: Tensor | float | None = None,
    sum_classes: bool = False,
    smooth_dense: bool = False,
) -> Tensor:
    """Per-sample binary cross-entropy with logits, timm's ``BinaryCrossEntropy(reduction="none")`` per sample.

    Class indices become one-hot targets with ``off = smoothing / K`` and ``on = 1 - smoothing + off``; dense
    targets are used as given (moved towards 0.5 by ``smoothing`` when ``smooth_dense``). The per-class losses
    are averaged (or summed, ``sum_classes``) per sample, so the batch mean equals timm's loss.

    Args:
        logits: ``(batch, num_classes)`` unnormalised scores.
        targets: ``(batch,)`` class indices or ``(batch, num_classes)`` dense targets in ``[0, 1]``.
        smoothing: label smoothing of class-index targets (default: ``0.0``).
        target_threshold: binarise targets above this value (default: ``None``).
        weight: per-class weight ``(num_classes,)`` (default: ``None``).
        pos_weight: weight of the positive term, a number or ``(num_classes,)`` (default: ``None``).
        sum_classes: sum instead of average over classes (default: ``False``).
        smooth_dense: also smooth dense targets, towards 0.5 (default: ``False``).

    Returns:
        Tensor of shape ``(batch,)``.

    Raises:
        ValueError: if ``smoothing`` is outside ``[0, 1)``, on a shape mismatch or a label out of range.

    Example:
        >>> binary_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 2]), smoothing=0.1).shape
        torch.Size([2])
    """
    _check_smoothing("smoothing", smoothing)
    check_class_targets(logits, targets)
    num_classes = logits.shape[1]
    if targets.ndim == 1:
        off = smoothing / num_classes
        dense = torch.full_like(logits, off).scatter_(1, targets.long().view(-1, 1), 1.0 - smoothing + off)
    else:
        dense = targets.to(logits.dtype)
        if smooth_dense and smoothing:
            dense = dense * (1.0 - smoothing) + 0.5 * smoothing
    if target_threshold is not None:
        dense = dense.gt(target_threshold).to(logits.dtype)
    if pos_weight is not None and not isinstance(pos_weight, Tensor):
        pos_weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, dense, weight, pos_weight=pos_weight, reduction="none")
    return loss.sum(-1) if sum_classes else loss.mean(-1)


def sequence_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    reduction: str = "token_mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Token cross-entropies reduced per sequence; positions labelled ``ignore_index`` do not count.

    Args:
        logits: ``(batch, length, vocab)`` scores, aligned with ``labels`` (no shift).
        labels: ``(batch, length)`` token ids or ``ignore_index``.
        reduction: ``"token_mean"``: sequence ``i``'s token-loss sum times ``batch / valid tokens of the batch``,
            so that the batch mean is the mean over all valid tokens (Hugging Face's loss); ``"sum"``: the
            token-loss sum; ``"sequence_mean"``: the mean over the sequence's own valid tokens (0 if none)
            (default: ``"token_mean"``).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy` (default: ``0.0``).
        ignore_index: label of positions that carry no loss (default: ``-100``).

    Returns:
        Tensor of shape ``(batch,)``.

    Raises:
        ValueError: on an unknown ``reduction`` or shapes that do not match.

    Example:
        >>> labels = torch.tensor([[1, 2, -100], [0, -100, -100]])
        >>> sequence_cross_entropy(torch.zeros(2, 3, 4), labels).mean()  # log(4) over the 3 valid tokens
        tensor(1.3863)
    """
    if reduction not in _SEQUENCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_SEQUENCE_REDUCTIONS}, got {reduction!r}")
    _check_smoothing("label_smoothing", label_smoothing)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (batch, length, vocab) and labels (batch, length); got shapes "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    tokens = F.cross_entropy(logits.transpose(1, 2), safe, reduction="none", label_smoothing=label_smoothing)
    sums = (tokens * valid.to(tokens.dtype)).sum(-1)
    if reduction == "sum":
        return sums
    if reduction == "sequence_mean":
        return sums / valid.sum(-1).clamp(min=1).to(sums.dtype)
    return sums * (labels.shape[0] / valid.sum().clamp(min=1).to(sums.dtype))


def shift_causal_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Labels aligned with a causal LM's logits: position ``t`` predicts ``labels[t + 1]``, the last none."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    reduction: str = "token_mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Per-sequence causal-LM loss on unshifted labels (as given to a Hugging Face ``*ForCausalLM``).

    With the default ``reduction="token_mean"`` and all weights 1, ``causal_lm_loss(logits, labels).mean()``
    equals the model's own loss: the mean over all valid (``!= ignore_index``) shifted tokens of the batch.

    Args:
        logits: ``(batch, length, vocab)`` next-token scores.
        labels: ``(batch, length)`` token ids, ``ignore_index`` where no loss is wanted (padding, prompt).
        reduction: as in :func:`sequence_cross_entropy` (default: ``"token_mean"``).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy` (default: ``0.0``).
        ignore_index: label of positions that carry no loss (default: ``-100``).

    Returns:
        Tensor of shape ``(batch,)``.

    Raises:
        ValueError: on an unknown ``reduction`` or shapes that do not match.

    Example:
        >>> labels = torch.tensor([[5, 1, 2], [5, 0, -100]])
        >>> causal_lm_loss(torch.zeros(2, 3, 8), labels).shape
        torch.Size([2])
    """
    return sequence_cross_entropy(
        logits,
        shift_causal_labels(labels, ignore_index),
        reduction=reduction,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )
