"""Whether the model has learned enough of the meta set for the veto to act (``veto_competence``).

The veto removes the samples whose meta-gradient coefficient pulls against the meta batch. While the model
predicts the meta set little better than chance those coefficients say little about a sample, and removing
samples then can derail a fragile run: a ViT trained from scratch with AdamW lost 40 points on two seeds of ten
(docs/robustness.md). Here, at each meta update, the meta batch's accuracy at the current parameters is read from
the no-grad forward the evidence of label noise makes (one more forward for LossNet, whose evidence reads the
look-ahead), corrected for chance, ``(acc - 1/K) / (1 - 1/K)`` for ``K`` classes, and folded into a moving average
(decay 0.9, starting at 0). Once the average reaches the threshold the model is *competent*, and stays so for the
rest of the run: the veto acts from then on (and only once the evidence of label noise is shown too).

Example:
    >>> import torch
    >>> competence = MetaCompetence(threshold=0.45)
    >>> targets = torch.arange(10).repeat(10)
    >>> chance = torch.nn.functional.one_hot((targets + 1) % 10, 10).float()  # every prediction wrong
    >>> right = torch.nn.functional.one_hot(targets, 10).float()
    >>> competence.observe(chance, targets)
    >>> bool(competence.shown)
    False
    >>> for _ in range(6):
    ...     competence.observe(right, targets)
    >>> bool(competence.shown), round(competence.level.item(), 3)
    (True, 0.463)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._latch import LatchedAverage
from .distributed import DataParallelGroup

__all__ = ["MetaCompetence", "DECAY"]

#: Decay of the moving average over meta updates (about ten updates' memory).
DECAY = 0.9


class MetaCompetence(LatchedAverage):
    """The running chance-corrected accuracy of the model on the meta batches (see the module's docstring).

    Args:
        threshold: the moving average at which the model is competent, in ``(0, 1)``.
        group: data-parallel ranks: the accuracy is the global meta batch's (one all-reduce of two counts).

    Attributes:
        level: the moving average, a 0-d float64 tensor on the logits' device (``None`` before the first update).
        shown: whether the level has reached ``threshold`` at any update so far, a 0-d bool tensor (``None``
            before the first update). Neither is read on the host during training.
    """

    def __init__(self, threshold: float, group: DataParallelGroup | None = None) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1) (chance-corrected accuracy), got {threshold!r}")
        super().__init__(threshold, DECAY)
        self.group = group if group is not None else DataParallelGroup()

    @torch.no_grad()
    def observe(self, meta_logits: Tensor, meta_classes: Tensor) -> None:
        """Fold one meta update in: the meta batch's logits ``(meta_batch, K)`` at the current parameters and its
        class indices ``(meta_batch,)``. No host synchronisation in a single process.

        Raises:
            ValueError: if the logits are not ``(meta_batch, K)`` with ``K >= 2`` for ``meta_batch`` classes.
        """
        if meta_logits.ndim != 2 or meta_logits.shape[1] < 2 or meta_classes.shape != meta_logits.shape[:1]:
            raise ValueError(
                "the meta set's accuracy reads (meta_batch, K >= 2) logits and (meta_batch,) class indices, got "
                f"shapes {tuple(meta_logits.shape)} and {tuple(meta_classes.shape)}"
            )
        right = (meta_logits.argmax(1) == meta_classes.to(meta_logits.device)).double()
        counts = self.group.sum_differentiable(torch.stack([right.sum(), right.new_tensor(float(right.numel()))]))
        chance = 1.0 / meta_logits.shape[1]
        self.fold((counts[0] / counts[1].clamp_min(1) - chance) / (1 - chance))
