"""The reweighted training loss from per-sample losses, refusing a loss that was already reduced.

Reweighting acts through per-sample losses. A loss left at its default ``reduction="mean"`` is a scalar:
``weights * scalar`` then ``.mean()`` is the plain loss times the mean weight, which is 1 under the default
normalisation, so training silently ignores the weights. :func:`weighted_loss` refuses such a loss.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["weighted_loss"]


def weighted_loss(weights: Tensor, losses: Tensor) -> Tensor:
    """``(weights * losses).mean()``: the reweighted loss of a batch (Algorithm 1's training loss).

    Args:
        weights: ``(batch,)`` weights from :meth:`reweight.MetaReweighter.step`.
        losses: ``(batch,)`` per-sample losses, e.g. ``F.cross_entropy(logits, y, reduction="none")``.

    Returns:
        A scalar tensor; with all weights 1 it is the plain mean loss.

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: if ``losses`` is a scalar (an already reduced loss: reweighting would do nothing) or its
            shape is not ``weights``' ``(batch,)``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> logits, y = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])
        >>> weighted_loss(torch.ones(4), F.cross_entropy(logits, y, reduction="none"))
        tensor(1.0986)
    """
    for name, value in (("weights", weights), ("losses", losses)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if losses.ndim == 0:
        raise ValueError(
            "losses is a scalar: the loss was already reduced (reduction='mean' or 'sum'), so the weights would "
            "only rescale it and reweighting would do nothing; compute per-sample losses with reduction='none'"
        )
    if weights.ndim != 1 or losses.shape != weights.shape:
        raise ValueError(
            f"losses must be per-sample, of the weights' shape {tuple(weights.shape)}; got {tuple(losses.shape)}"
            + (" (reduce each sample's token losses first)" if losses.ndim > 1 else "")
        )
    return (weights.to(losses.dtype) * losses).mean()
