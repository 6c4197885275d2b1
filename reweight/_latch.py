"""A moving average that latches once it reaches a threshold: what the veto's gates keep (the evidence of label
noise, the model's competence on the meta set)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["LatchedAverage"]


class LatchedAverage:
    """``level``: a moving average (decay ``decay``, starting at 0) of the values folded in; ``shown``: whether it
    has reached ``threshold`` at any fold so far. Both are 0-d tensors (``None`` before the first fold), never
    read on the host during training."""

    def __init__(self, threshold: float, decay: float) -> None:
        self.threshold, self.decay = threshold, decay
        self.level: Tensor | None = None
        self.shown: Tensor | None = None

    def fold(self, value: Tensor) -> None:
        """Fold one value (a 0-d tensor) into the average and the latch."""
        level = (1 - self.decay) * value if self.level is None else self.decay * self.level + (1 - self.decay) * value
        reached = level >= self.threshold
        self.level, self.shown = level, reached if self.shown is None else self.shown | reached

    def state_dict(self) -> dict[str, Any]:
        """``{"level": float | None, "shown": bool | None}`` (reads the host once)."""
        return {
            "level": None if self.level is None else float(self.level),
            "shown": None if self.shown is None else bool(self.shown),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        """Restore :meth:`state_dict` (checked by :func:`reweight.noise_evidence.check_evidence_state`) on
        ``device``."""
        level, shown = state["level"], state["shown"]
        self.level = None if level is None else torch.tensor(float(level), dtype=torch.float64, device=device)
        self.shown = None if shown is None else torch.tensor(bool(shown), device=device)
