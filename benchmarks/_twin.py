"""A plain twin beside a reweighted run (the accuracy benchmark's ``guard_holdback`` variants).

The twin is a copy of the model at initialisation with its own optimizer and schedule, stepped with uniform weights
on the same batches. A share of the clean meta set is held back from the reweighter; at each epoch's end after the
meta warm-up, the reweighted model's loss on it is compared with the twin's. When the reweighted model's is higher
at ``patience`` checks in a row, the run falls back: the model, its optimizer and schedule take the twin's state and
train plainly from there (the twin's own run), and the reweighter is dropped.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def hold_back(xm: torch.Tensor, ym: torch.Tensor, per_class: int) -> tuple[torch.Tensor, ...]:
    """The meta set split into ``(x_meta, y_meta, x_held, y_held)``: the first ``per_class`` samples of each
    class held back."""
    y = ym.numpy()
    rank = np.array([np.sum(y[:i] == c) for i, c in enumerate(y)])
    held = torch.from_numpy(rank < per_class)
    return xm[~held], ym[~held], xm[held], ym[held]


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    loss = float(F.cross_entropy(model(x), y))
    model.train(was)
    return loss


class PlainTwin:
    """The plain run beside a reweighted one, and the check that falls back to it."""

    def __init__(
        self, model: nn.Module, make_optimizer, make_scheduler, x_held, y_held, *, after: int, patience: int = 2
    ) -> None:
        self.model = copy.deepcopy(model)
        self.optimizer = make_optimizer(self.model.parameters())
        self.scheduler = make_scheduler(self.optimizer)
        self.x, self.y, self.after, self.patience = x_held, y_held, after, patience
        self.gaps: list[float] = []  # reweighted minus twin held-back loss, one per check
        self.fired_epoch: int | None = None
        self.accuracy: dict[str, list[float]] = {}  # the twin's own per-epoch accuracies, until it is handed over

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One plain step on the batch the reweighted model just took."""
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()

    def check(self, epoch: int, steps: int, model: nn.Module) -> bool:
        """At an epoch's end: whether the reweighted model should fall back to the twin."""
        self.scheduler.step()
        if steps < self.after:
            return False
        self.gaps.append(_loss(model, self.x, self.y) - _loss(self.model, self.x, self.y))
        recent = self.gaps[-self.patience :]
        if len(recent) == self.patience and all(g > 0 for g in recent):
            self.fired_epoch = epoch
            return True
        return False

    def hand_over(self, model: nn.Module, optimizer, scheduler) -> None:
        """The model, optimizer and schedule take the twin's state."""
        model.load_state_dict(self.model.state_dict())
        optimizer.load_state_dict(self.optimizer.state_dict())
        scheduler.load_state_dict(self.scheduler.state_dict())

    def evaluate(self, accuracy, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record the twin's accuracy on each named ``(x, y)`` (the plain run's curves)."""
        for name, (x, y) in data.items():
            self.accuracy.setdefault(name, []).append(accuracy(self.model, x, y))

    def summary(self) -> dict:
        return {"fired_epoch": self.fired_epoch, "gaps": [round(g, 5) for g in self.gaps], "twin_acc": self.accuracy}
