"""What ``normalization="class"`` cannot do, said once: rank the samples of a class that has one sample in the
batch, and rebalance classes whose training shares differ from the meta set's (a long tail)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["ClassNormalizationWarning", "ClassShareWarning", "ClassChecks", "class_counts"]


class ClassNormalizationWarning(UserWarning):
    """``normalization="class"`` on batches where many samples are alone in their class: such a sample always
    gets weight 1, so the net has little to rank (warned once, at the first batch)."""


class ClassShareWarning(UserWarning):
    """``normalization="class"`` where the training batches' class shares differ from the meta set's (a long
    tail): each class keeps its training share of the loss, so the weights cannot rebalance the classes (warned
    once, after the first ``50 * num_classes`` training and meta samples)."""


def class_counts(targets: Tensor, num_classes: int) -> Tensor | None:
    """Each class's count among class indices ``(batch,)``, or the summed soft targets ``(batch, num_classes)``;
    ``None`` for targets of another kind. No host sync (out-of-range labels are refused elsewhere)."""
    if targets.ndim == 1 and not targets.is_floating_point():
        index = targets.detach().long().clamp(0, num_classes - 1)
        ones = torch.ones_like(index, dtype=torch.float)
        return torch.zeros(num_classes, device=targets.device).scatter_add_(0, index, ones)
    if targets.ndim == 2 and targets.shape[1] == num_classes:
        return targets.detach().float().sum(0)
    return None


class ClassChecks:
    """The two once-only checks of ``normalization="class"``, fed each step's training targets and each meta
    batch's (:meth:`train`, :meth:`meta`):

    - the first training batch: :class:`ClassNormalizationWarning` when more than ``thin_share`` of its samples
      (class indices) are the only one of their class in it (one host sync);
    - the class counts of both sides, summed on their device until each has seen ``per_class`` samples per
      class; then their shares are compared once (one host sync) and :class:`ClassShareWarning` is raised when
      their total variation distance exceeds ``threshold``. Sampling alone moves the distance of two balanced
      samples of ``per_class * num_classes`` by about ``0.56 / sqrt(per_class)`` (0.08 at 50); a long tail with
      imbalance 10 over 10 classes is at 0.29."""

    def __init__(self, per_class: int = 50, threshold: float = 0.2, thin_share: float = 0.25) -> None:
        self.per_class, self.threshold, self.thin_share = per_class, threshold, thin_share
        self.train_counts: Tensor | None = None
        self.meta_counts: Tensor | None = None
        self.n_train = self.n_meta = 0
        self.done = False

    def meta(self, targets: Tensor, num_classes: int | None) -> None:
        """Count a meta batch's labels (nothing before the class count is known)."""
        if self.done or num_classes is None:
            return
        counts = class_counts(targets, num_classes)
        if counts is None:  # labels of another kind: nothing to compare
            self.done = True
            return
        self.meta_counts = counts if self.meta_counts is None else self.meta_counts + counts
        self.n_meta += targets.shape[0]

    def train(self, targets: Tensor, num_classes: int) -> None:
        """Count a training batch's labels (once per step); check the first batch, and compare the shares once
        both sides have enough samples."""
        if self.done:
            return
        counts = class_counts(targets, num_classes)
        if counts is None:
            self.done = True
            return
        if self.train_counts is None:
            self.train_counts = counts
            if targets.ndim == 1:
                self._warn_if_thin(counts, targets.numel())
        else:
            self.train_counts = self.train_counts + counts
        self.n_train += targets.shape[0]
        if self.meta_counts is not None and min(self.n_train, self.n_meta) >= self.per_class * num_classes:
            self.done = True
            self._compare()

    def _warn_if_thin(self, counts: Tensor, n: int) -> None:
        alone = int((counts == 1).sum())
        if alone > self.thin_share * n:
            warnings.warn(
                f"normalization='class': {alone} of the batch's {n} samples are the only one of their class in it, "
                f"and a sample alone in its class always gets weight 1, so the net can reweight few samples; with "
                f"{counts.numel()} classes, batches of at least {4 * counts.numel()} samples let it rank them, or "
                "pass normalization='sum'",
                ClassNormalizationWarning,
                stacklevel=6,  # the caller of MetaReweighter.step
            )

    def _compare(self) -> None:
        assert self.train_counts is not None and self.meta_counts is not None
        p = self.train_counts / self.train_counts.sum()
        q = self.meta_counts.to(p.device) / self.meta_counts.sum()
        distance = float(0.5 * (p - q).abs().sum())
        if distance > self.threshold:
            top = int(p.argmax())
            warnings.warn(
                f"normalization='class': the training batches' class shares differ from the meta set's (total "
                f"variation {distance:.2f} over {self.n_train} training and {self.n_meta} meta samples; class {top} "
                f"holds {float(p[top]):.0%} of the training samples and {float(q[top]):.0%} of the meta samples). "
                "Each class keeps its training share of the loss, so the weights cannot rebalance the classes; "
                "for a long tail pass normalization='sum', which lets the net weight the rare classes up, and with "
                "clean labels veto=math.inf as well (on clean long-tailed MNIST-1D 'sum' with the veto gained at "
                'most 3 points over plain training, without it 2 to 8: docs/results.md, "Long tails and a smaller '
                'meta set")',
                ClassShareWarning,
                stacklevel=6,  # the caller of MetaReweighter.step
            )
