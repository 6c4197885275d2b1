"""PyTorch Lightning: a ``Callback`` that owns the reweighter, for a ``LightningModule`` with automatic optimisation.

The weighting net and its optimizer live in the callback, not in the ``LightningModule``: they stay out of
``configure_optimizers``, the module's ``state_dict`` and DDP's parameters, and are saved in Lightning
checkpoints through the callback's ``state_dict`` (key ``"MetaReweightCallback"``). In ``training_step``::

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        weights = reweight_step(self, x, y, logits)                              # added line
        return weighted_loss(weights, F.cross_entropy(logits, y, reduction="none"))  # per-sample losses

    trainer = L.Trainer(callbacks=[MetaReweightCallback(meta_loader, net="lossnet")])

The look-ahead calls the module's ``forward`` (or ``getattr(module, model_attr)``) statelessly on the meta
batches. ``accumulate_grad_batches`` works as usual: Lightning divides the returned loss; the reweighter's
``interval`` and step count then count micro-batches (``training_step`` calls), not optimizer steps.
The weights' statistics are logged as ``reweight/weight_std``, ``reweight/weight_min``, ``reweight/weight_max``,
``reweight/weight_ess`` (effective sample size) and ``reweight/meta_loss`` (per training batch) with
Lightning's ``log``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._batch import Inputs, as_logits
from .._docstrings import fill_doc, reweighter_kwargs
from ..monitor import weight_statistics
from ..reweighter import MetaReweighter
from . import require
from ._common import LateReweighter, group_stats, warn_if_short

_lightning = require("lightning", "lightning")
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

__all__ = ["MetaReweightCallback", "reweight_step"]


_SUPPLIED = ("model", "optimizer", "meta_loader")  # not in reweight_kwargs


@fill_doc(reweight_kwargs=reweighter_kwargs(_SUPPLIED, "the callback"))
class MetaReweightCallback(Callback):
    """Builds a :class:`~reweight.MetaReweighter` on the model and optimizer when training starts.

    Args:
        meta_loader: re-iterable of clean ``(inputs, targets)`` batches (or dicts with ``labels``).
        model_attr: attribute of the ``LightningModule`` holding the network to look ahead with; ``None`` uses
            the module's own ``forward`` (default: ``None``).
        optimizer_index: which of ``trainer.optimizers`` trains that network (default: ``0``).
        **reweight_kwargs: {reweight_kwargs}.

    Raises:
        TypeError: if ``reweight_kwargs`` sets ``model``, ``optimizer`` or ``meta_loader``.

    Example:
        >>> import lightning as L
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(8, 3)
        ...
        ...     def forward(self, x):
        ...         return self.net(x)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         logits = self(x)
        ...         weights = reweight_step(self, x, y, logits)  # added line
        ...         return (weights * F.cross_entropy(logits, y, reduction="none")).mean()
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> _ = torch.manual_seed(0)
        >>> train = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))), batch_size=8)
        >>> meta = DataLoader(TensorDataset(torch.randn(12, 8), torch.randint(0, 3, (12,))), batch_size=6)
        >>> callback = MetaReweightCallback(meta, net="lossnet", seed=0)
        >>> trainer = L.Trainer(max_steps=4, callbacks=[callback], accelerator="cpu", logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(), train)
        >>> callback.reweighter.step_count  # one meta step per training batch
        4
    """

    def __init__(
        self,
        meta_loader: Iterable[Any],
        *,
        model_attr: str | None = None,
        optimizer_index: int = 0,
        **reweight_kwargs: Any,
    ) -> None:
        taken = set(_SUPPLIED) & set(reweight_kwargs)
        if taken:
            raise TypeError(f"reweight_kwargs must not set {sorted(taken)}: the callback supplies them")
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be a non-negative int, got {optimizer_index!r}")
        self.meta_loader = meta_loader
        self.model_attr = model_attr
        self.optimizer_index = optimizer_index
        self.reweight_kwargs = reweight_kwargs
        self.last_weights: Tensor | None = None
        self._late = LateReweighter(meta_loader, **reweight_kwargs)
        self._logits_fn: Callable[[Any], Tensor] = reweight_kwargs.get("logits_fn") or as_logits
        self._unlogged: Tensor | None = None

    @property
    def reweighter(self) -> MetaReweighter | None:
        """The :class:`~reweight.MetaReweighter`, built when training starts (``None`` before)."""
        return self._late.reweighter

    def _network(self, pl_module: LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        network = getattr(pl_module, self.model_attr, None)
        if not isinstance(network, nn.Module):
            raise ValueError(f"model_attr={self.model_attr!r} is not an nn.Module attribute of the LightningModule")
        return network

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the reweighter on the network and the real optimizer (restoring checkpointed state)."""
        if len(trainer.optimizers) <= self.optimizer_index:
            raise ValueError(f"optimizer_index {self.optimizer_index} but the trainer has {len(trainer.optimizers)}")
        if trainer.world_size > 1 and "process_group" not in self._late.reweight_kwargs:
            # Lightning's DDP wraps the LightningModule, not the network the reweighter sees: name the group
            import torch.distributed as dist

            self._late.reweight_kwargs["process_group"] = dist.group.WORLD
        reweighter = self._late.build(self._network(pl_module), trainer.optimizers[self.optimizer_index])
        warn_if_short(reweighter, float(trainer.estimated_stepping_batches) * trainer.accumulate_grad_batches)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log this batch's weight std, min and max (the latest meta loss, and each ``group_weight/<name>`` with
        ``net="groups"``) as ``reweight/*`` with Lightning's ``log``; the values stay on the device until Lightning
        writes its logs."""
        weights, self._unlogged = self._unlogged, None
        if weights is None or self.reweighter is None:
            return
        w = weights.float()
        stats = weight_statistics(w)
        if self.reweighter.last_meta_loss is not None:
            stats["meta_loss"] = self.reweighter.last_meta_loss.float()
        stats.update(group_stats(self.reweighter))  # net="groups": each source's weight
        for key, value in stats.items():
            pl_module.log(f"reweight/{key}", value, on_step=True, on_epoch=False, batch_size=w.shape[0])

    def step(
        self, inputs: Inputs, targets: Tensor, outputs: Any, groups: Tensor | None = None, *,
        sample_ids: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Weights for this batch (see :meth:`reweight.MetaReweighter.step`; ``groups``: the source ids, for
        ``net="groups"``; ``sample_ids``: the samples' indices, with ``loss_history=True``); ones, with no meta
        step, outside training.

        Raises:
            RuntimeError: if called in training before the trainer started (no optimizer yet).
        """
        reweighter = self.reweighter
        if reweighter is None or not (reweighter.module.training and torch.is_grad_enabled()):
            if reweighter is None and torch.is_grad_enabled():
                raise RuntimeError("MetaReweightCallback.step called before training started")
            logits = self._logits_fn(outputs)
            return torch.ones(logits.shape[0], device=logits.device, dtype=logits.dtype)
        weights = reweighter.step(inputs, targets, outputs, groups=groups, sample_ids=sample_ids)
        self.last_weights = weights
        self._unlogged = weights
        return weights

    def state_dict(self) -> dict[str, Any]:
        """The reweighter's state (empty before training started)."""
        return dict(self._late.state_dict() or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the reweighter now, or when training starts."""
        if state_dict:
            self._late.load_state_dict(state_dict)


def reweight_step(
    pl_module: LightningModule, inputs: Inputs, targets: Tensor, outputs: Any, groups: Tensor | None = None, *,
    sample_ids: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Weights for this batch from the trainer's :class:`MetaReweightCallback`; call it in ``training_step``.

    Args:
        pl_module: the ``LightningModule`` (``self`` in ``training_step``).
        inputs, targets, outputs: the batch and the module's outputs on it.
        groups: ``(batch,)`` source ids, for a net that reads them (``net="groups"``) (default: ``None``).
        sample_ids: ``(batch,)`` indices of the samples in the dataset, with ``loss_history=True`` (default: ``None``).

    Raises:
        RuntimeError: if the trainer has no ``MetaReweightCallback``.
    """
    # Trainer.callbacks is assigned by Lightning's CallbackConnector and not declared on the class.
    registered = pl_module.trainer.callbacks  # type: ignore[attr-defined]
    callbacks = [cb for cb in registered if isinstance(cb, MetaReweightCallback)]
    if len(callbacks) != 1:
        raise RuntimeError(f"the trainer needs exactly one MetaReweightCallback, found {len(callbacks)}")
    return callbacks[0].step(inputs, targets, outputs, groups, sample_ids=sample_ids)
