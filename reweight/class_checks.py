"""What ``normalization="class"`` cannot do, said once: rank the samples of a class that has one sample in the
batch, and rebalance classes whose training shares differ from the meta set's (a long tail)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["ClassNormalizationWarning", "ClassShareWarning", "ClassShares", "warn_if_classes_are_thin"]


class ClassNormalizationWarning(UserWarning):
    """``normalization="class"`` on batches where many samples are alone in their class: such a sample always
    gets weight 1, so the net has little to rank (warned once, at the first batch)."""


class ClassShareWarning(UserWarning):
    """``normalization="class"`` where the training batches' class shares differ from the meta set's (a long
    tail): each class keeps its training share of the loss, so the weights cannot rebalance the classes (warned
    once, after the first ``50 * num_classes`` training and meta samples)."""


def warn_if_classes_are_thin(targets: Tensor, num_classes: int, share: float = 0.25) -> None:
    """Warn when more than ``share`` of the batch's samples (class indices) are the only one of their class in
    it. One host sync; called once per reweighter."""
    if targets.ndim != 1 or targets.numel() == 0:
        return
    counts = torch.bincount(targets.detach().long(), minlength=num_classes)
    alone, n = int((counts == 1).sum()), targets.numel()
    if alone > share * n:
        warnings.warn(
            f"normalization='class': {alone} of the batch's {n} samples are the only one of their class in it, and "
            f"a sample alone in its class always gets weight 1, so the net can reweight few samples; with "
            f"{num_classes} classes, batches of at least {4 * num_classes} samples let it rank them, or pass "
            "normalization='sum'",
            ClassNormalizationWarning,
            stacklevel=6,  # the caller of MetaReweighter.step
        )


class ClassShares:
    """The class counts of the training and meta batches, summed on their device (no host sync) until each
    side has seen ``per_class`` samples per class; then their shares are compared once (one host sync) and
    :class:`ClassShareWarning` is raised when their total variation distance exceeds ``threshold``.

    Sampling alone moves the distance of two balanced samples of ``per_class * num_classes`` by about
    ``0.56 / sqrt(per_class)`` (0.08 at 50); a long tail with imbalance 10 over 10 classes is at 0.29."""

    def __init__(self, per_class: int = 50, threshold: float = 0.2) -> None:
        self.per_class, self.threshold = per_class, threshold
        self.train: Tensor | None = None
        self.meta: Tensor | None = None
        self.n_train = self.n_meta = 0
        self.done = False

    def add_meta(self, targets: Tensor, num_classes: int | None) -> None:
        """Count a meta batch's labels (class indices or soft targets over ``num_classes``)."""
        if self.done or num_classes is None:
            return
        if targets.ndim == 1 and not targets.is_floating_point():
            index = targets.detach().long().clamp(0, num_classes - 1)  # out-of-range labels are refused elsewhere
            ones = torch.ones_like(index, dtype=torch.float)
            counts = torch.zeros(num_classes, device=targets.device).scatter_add_(0, index, ones)
        elif targets.ndim == 2 and targets.shape[1] == num_classes:
            counts = targets.detach().float().sum(0)
        else:  # labels of another kind: nothing to compare
            self.done = True
            return
        self.meta = counts if self.meta is None else self.meta + counts
        self.n_meta += targets.shape[0]

    def add_train(self, members: Tensor) -> None:
        """Count a training batch's class memberships ``(batch, num_classes)``; compare once both sides have
        enough samples."""
        if self.done:
            return
        counts = members.detach().float().sum(0)
        self.train = counts if self.train is None else self.train + counts
        self.n_train += members.shape[0]
        k = counts.shape[0]
        if self.meta is None or min(self.n_train, self.n_meta) < self.per_class * k:
            return
        self.done = True
        p, q = self.train / self.train.sum(), self.meta.to(self.train.device) / self.meta.sum()
        distance = float(0.5 * (p - q).abs().sum())
        if distance > self.threshold:
            top = int(p.argmax())
            warnings.warn(
                f"normalization='class': the training batches' class shares differ from the meta set's (total "
                f"variation {distance:.2f} over {self.n_train} training and {self.n_meta} meta samples; class {top} "
                f"holds {float(p[top]):.0%} of the training samples and {float(q[top]):.0%} of the meta samples). "
                "Each class keeps its training share of the loss, so the weights cannot rebalance the classes; "
                "for a long tail pass normalization='sum', which lets the net weight the rare classes up",
                ClassShareWarning,
                stacklevel=7,  # the caller of MetaReweighter.step
            )
