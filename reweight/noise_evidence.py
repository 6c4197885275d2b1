"""Whether the meta set has shown label noise: what the meta-gradient's veto waits for (``veto_evidence``).

At each meta update the training batch's per-sample losses are read against the meta batch's: for a net that reads
the logits at the current parameters, where the training losses are (one no-grad forward of the meta batch); for
LossNet at the look-ahead, one virtual step further on, which reads lower early in a run and starts its veto sooner
(on clean labels too). The share of training samples whose loss is above the meta losses' 0.9-quantile, less
the share that samples drawn like the meta set would put there, is folded into a moving average (decay 0.95,
starting at 0). Once the average reaches the threshold the evidence is *shown*, and stays shown for the rest of
the run. With class labels (integer class indices, whatever the normalisation; soft targets under
``normalization="class"``) each loss is read against its own class's meta losses (:func:`excess_above`).

Clean training labels keep the share at or below zero: the model fits the samples it trains on at least as well
as the clean ones it never sees. A corrupted label keeps its sample's loss above its class's meta losses until
the model memorises it, so label noise lifts the share by about two thirds of its rate on MNIST-1D. Reading each
class against itself keeps a long tail from hiding the noise: against the whole of a balanced meta set a
long-tailed batch reads below zero even under 40% noise (the meta batch holds more of the classes the model knows
least). Latching keeps the veto on once it has acted, so that the samples it holds back, which the model then does
not memorise, cannot switch it off again.

Example:
    >>> import torch
    >>> evidence = NoiseEvidence(threshold=0.05)
    >>> meta = torch.linspace(0.1, 1.0, 100)
    >>> clean, noisy = torch.linspace(0.0, 0.9, 50), torch.cat([torch.full((20,), 3.0), torch.full((30,), 0.2)])
    >>> for _ in range(10):
    ...     evidence.observe(clean, meta)
    >>> bool(evidence.shown)
    False
    >>> for _ in range(30):
    ...     evidence.observe(noisy, meta)
    >>> bool(evidence.shown), round(evidence.level.item(), 3)
    (True, 0.228)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._latch import LatchedAverage
from .distributed import DataParallelGroup

__all__ = ["NoiseEvidence", "QUANTILE", "DECAY", "check_evidence_state", "excess_above"]

#: The meta losses' quantile a training sample's loss is read against.
QUANTILE = 0.9
#: Decay of the moving average over meta updates (about twenty updates' memory): fine-tuning runs of a few hundred
#: updates show the evidence for a few dozen of them before the model memorises the noise.
DECAY = 0.95


class NoiseEvidence(LatchedAverage):
    """The running evidence of label noise in the training batches (see the module's docstring).

    Args:
        threshold: the moving average at which the evidence is shown, in ``(0, QUANTILE)``.
        group: data-parallel ranks: the quantile is the global meta batch's (its losses gathered from every rank, one
            host sync for their sizes) and the counts are the global training batch's.

    Attributes:
        level: the moving average, a 0-d tensor on the losses' device (``None`` before the first update).
        shown: whether the level has reached ``threshold`` at any update so far, a 0-d bool tensor (``None``
            before the first update). Neither is read on the host during training.
    """

    def __init__(self, threshold: float, group: DataParallelGroup | None = None) -> None:
        if not 0 < threshold < QUANTILE:  # the share above the quantile, less 1 - QUANTILE, is below QUANTILE
            raise ValueError(f"threshold must be in (0, {QUANTILE:g}), got {threshold!r}")
        super().__init__(threshold, DECAY)
        self.group = group if group is not None else DataParallelGroup()

    @torch.no_grad()
    def observe(
        self, losses: Tensor, meta_losses: Tensor, classes: Tensor | None = None, meta_classes: Tensor | None = None
    ) -> None:
        """Fold one meta update in: the training batch's per-sample ``losses`` and the meta batch's per-sample
        ``meta_losses``; with their class labels ``classes`` and ``meta_classes`` each training loss is read
        against its own class's meta losses (:func:`excess_above`). No host synchronisation in a single process.

        Raises:
            ValueError: if ``meta_losses`` is not one loss per meta sample, before anything changes.
        """
        if meta_losses.ndim != 1:
            raise ValueError(
                "the evidence of label noise reads the meta batch's per-sample losses, shape (meta_batch,), got "
                f"shape {tuple(meta_losses.shape)}: meta_loss_fn returns one loss per sample, and an engine "
                "returns MetaGradient(coefficients, meta_losses) with meta_losses of shape (meta_batch,)"
            )
        meta_losses = meta_losses.detach().double().flatten()
        if classes is None or meta_classes is None:
            classes = torch.zeros_like(losses, dtype=torch.long)  # one class: the whole meta batch
            meta_classes = torch.zeros_like(meta_losses, dtype=torch.long)
        if self.group.active:  # the global meta batch: losses and classes (exact in float64) in one gather
            rows = self.group.cat(torch.stack([meta_losses, meta_classes.to(meta_losses.device, torch.float64)], 1))
            meta_losses, meta_classes = rows[:, 0], rows[:, 1].long()
        counts = self.group.sum_differentiable(excess_above(losses, classes, meta_losses, meta_classes))
        self.fold(counts[0] / counts[1].clamp_min(1))


def excess_above(
    losses: Tensor, classes: Tensor, meta_losses: Tensor, meta_classes: Tensor, quantile: float = QUANTILE
) -> Tensor:
    """``[excess, n]`` (float64): of the ``n`` training samples whose class has meta samples, how many more have a
    loss above their class's meta ``quantile`` than samples drawn like the meta set would.

    A class's cut is the k-th smallest of its m meta losses, k = min(m, ceil(quantile (m + 1))): a sample drawn
    like them lies above it with probability (m + 1 - k) / (m + 1), whatever their distribution, so the excess is
    unbiased at zero for however few meta samples a class has. Sorting only: no host synchronisation.
    """
    order = torch.argsort(meta_losses)
    order = order[torch.argsort(meta_classes[order], stable=True)]  # by class, by loss within a class
    sorted_classes, sorted_losses = meta_classes[order].contiguous(), meta_losses[order]
    classes = classes.to(sorted_classes.device)
    start = torch.searchsorted(sorted_classes, classes)
    m = torch.searchsorted(sorted_classes, classes, right=True) - start
    k = torch.minimum(m, torch.ceil(quantile * (m + 1) - 1e-9).long())  # 1e-9: 0.9 * 100 is 90.00000000000001
    cut = sorted_losses[(start + k - 1).clamp(0, sorted_losses.shape[0] - 1)]
    has = m > 0
    above = (losses.detach().to(cut.device, torch.float64) > cut) & has
    chance = torch.where(has, (m + 1 - k).double() / (m + 1).double(), 0.0)
    return torch.stack([above.double().sum() - chance.sum(), has.double().sum()])


def check_evidence_state(state: Any, name: str = "noise_evidence") -> None:
    """Refuse a malformed ``name`` entry of a reweighter state (``"noise_evidence"``, or ``"meta_competence"``,
    of the same layout); ``None`` is always accepted.

    Raises:
        ValueError: if it is neither ``None`` nor a mapping of ``level`` (a finite float or ``None``) and
            ``shown`` (a bool or ``None``).
    """
    if state is None:
        return
    if not isinstance(state, Mapping) or set(state) != {"level", "shown"}:
        raise ValueError(f"the state's {name} must be None or a dict of 'level' and 'shown', got {state!r}")
    level, shown = state["level"], state["shown"]
    number = isinstance(level, int | float) and not isinstance(level, bool)
    if level is not None and not (number and math.isfinite(level)):
        raise ValueError(f"the state's {name} level must be a finite float or None, got {level!r}")
    if shown is not None and not isinstance(shown, bool):
        raise ValueError(f"the state's {name} 'shown' must be a bool or None, got {shown!r}")
