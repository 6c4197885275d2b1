"""timm: a ``ClassificationTask`` for timm's ``train.py`` that learns per-sample loss weights.

timm's ``train.py`` routes every training forward through its task, ``task(input, target)``, and saves the
task's own state in checkpoints (``get_task_state`` / ``load_task_state``). Replacing the task is the hook::

    task = ReweightClassificationTask(model, meta_loader, criterion=train_loss_fn, net="lossnet")
    optimizer = create_optimizer_v2(model, ...)
    task.bind_optimizer(optimizer)          # the optimizer is created after the task in train.py
    saver = CheckpointSaver(model, optimizer, task=task, ...)

* The criterion that ``train.py`` picked (cross-entropy, label smoothing, soft targets from mixup / cutmix,
  BCE) becomes its per-sample twin (:func:`per_sample_criterion`), so all weights 1 give timm's own loss.
* Meta batches come from ``meta_loader``: clean, unmixed, hard labels; do not pass them through ``Mixup``.
  With mixup, each weight lands on a mixed pair; ``lossnet`` takes only the loss, the other nets see the
  soft targets.
* In eval mode or under ``no_grad`` the task returns timm's loss and runs no meta step.
* The reweighter is built by ``bind_optimizer``, before the first forward (so ``lookahead="head"`` works from
  the first step), and rebuilt with its state when ``compile`` / ``prepare_distributed`` wrap the model.
* Logs: :meth:`ReweightClassificationTask.pop_weight_stats` gives the weights' mean std / min / max and the meta
  loss since its last call (and each source's weight with ``net="groups"``), for timm's ``log_interval`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses as _losses
from .._batch import unwrap_model
from .._docstrings import fill_doc, reweighter_arg, reweighter_kwargs
from ..reweighter import MetaReweighter
from . import require
from ._common import LateReweighter, WeightStats, group_stats

_timm = require("timm", "timm")
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.task import ClassificationTask  # noqa: E402

__all__ = ["ReweightClassificationTask", "per_sample_criterion", "TASK_STATE_KEY"]

TASK_STATE_KEY = "reweighter"
_SUPPORTED = "nn.CrossEntropyLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, BinaryCrossEntropy"


def _torch_cross_entropy(logits: Tensor, targets: Tensor, *, criterion: nn.CrossEntropyLoss) -> Tensor:
    if targets.ndim == 2:  # nn.CrossEntropyLoss also takes class probabilities
        _losses.check_class_targets(logits, targets)
    return F.cross_entropy(
        logits,
        targets,
        weight=criterion.weight,
        ignore_index=criterion.ignore_index,
        reduction="none",
        label_smoothing=criterion.label_smoothing,
    )


def _buffer(module: nn.Module, name: str) -> Tensor | None:
    """A tensor attribute that may be ``None`` (timm registers BCE's ``weight`` and ``pos_weight`` as buffers)."""
    value = getattr(module, name)
    return value if isinstance(value, Tensor) else None


def per_sample_criterion(criterion: Callable[..., Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample twin ``(logits, targets) -> (batch,)`` of a timm training criterion.

    The batch mean of the result equals ``criterion(logits, targets)`` (for ``nn.CrossEntropyLoss`` without
    class weights; with them, timm's weighted mean normalises by the weights' sum instead).

    Args:
        criterion: ``nn.CrossEntropyLoss``, ``LabelSmoothingCrossEntropy``, ``SoftTargetCrossEntropy`` or
            ``BinaryCrossEntropy``, as created by ``timm.loss.create_classification_loss``.

    Raises:
        ValueError: for any other criterion; pass ``loss_fn`` to the task instead.
    """
    if isinstance(criterion, LabelSmoothingCrossEntropy):
        return partial(_losses.cross_entropy, label_smoothing=criterion.smoothing)
    if isinstance(criterion, SoftTargetCrossEntropy):
        return _losses.cross_entropy
    if isinstance(criterion, BinaryCrossEntropy):
        return partial(
            _losses.binary_cross_entropy,
            smoothing=criterion.smoothing,
            target_threshold=criterion.target_threshold,
            weight=_buffer(criterion, "weight"),
            pos_weight=_buffer(criterion, "pos_weight"),
            sum_classes=criterion.sum_classes,
            smooth_dense=criterion.smooth_dense,
        )
    if isinstance(criterion, nn.CrossEntropyLoss):
        if criterion.weight is None and criterion.ignore_index == -100:  # the library's own (net="auto": gated)
            return partial(_losses.cross_entropy, label_smoothing=criterion.label_smoothing)
        return partial(_torch_cross_entropy, criterion=criterion)
    raise ValueError(
        f"no per-sample version of {type(criterion).__name__}; supported: {_SUPPORTED}. "
        "Pass loss_fn=(logits, targets) -> (batch,) losses instead"
    )


def _meta_criterion(criterion: Callable[..., Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """The clean meta loss: the criterion's family on hard labels, without smoothing."""
    if isinstance(criterion, BinaryCrossEntropy):
        weight, pos_weight = _buffer(criterion, "weight"), _buffer(criterion, "pos_weight")
        return partial(_losses.binary_cross_entropy, weight=weight, pos_weight=pos_weight)
    return _losses.cross_entropy


_SUPPLIED = ("model", "optimizer", "meta_loader", "loss_fn", "meta_loss_fn")  # not in reweight_kwargs


@fill_doc(
    loss_fn=reweighter_arg("loss_fn"),
    meta_loss_fn=reweighter_arg("meta_loss_fn"),
    reweight_kwargs=reweighter_kwargs(_SUPPLIED, "the task"),
)
class ReweightClassificationTask(ClassificationTask):
    """timm ``ClassificationTask`` whose training forward returns the reweighted loss.

    The weighting net and its optimizer live in a :class:`~reweight.MetaReweighter` that is not a submodule:
    they stay out of ``task.parameters()``, the model's ``state_dict`` and DDP, and are checkpointed through
    ``get_task_state`` under the key ``"reweighter"``.

    Args:
        model: the timm model (may later be compiled or DDP-wrapped by the task).
        meta_loader: re-iterable of clean ``(images, labels)`` batches, not mixed.
        criterion: timm's training criterion; created from ``criterion_kwargs`` when ``None`` (default: ``None``).
        criterion_kwargs: arguments of ``timm.loss.create_classification_loss`` (default: ``None``).
        optimizer: the model's optimizer; may be bound later with :meth:`bind_optimizer` (default: ``None``).
        loss_fn: {loss_fn}, replacing :func:`per_sample_criterion` (default: ``None``).
        meta_loss_fn: {meta_loss_fn} (default: cross-entropy, or BCE for a BCE criterion).
        device, dtype, verbose: as in ``ClassificationTask``.
        **reweight_kwargs: further {reweight_kwargs}.

    Raises:
        ValueError: if the criterion has no per-sample version and no ``loss_fn`` is given.
        TypeError: if ``reweight_kwargs`` sets an argument that the task supplies, or ``meta_loader`` is not an
            iterable of batches (a criterion there, as in timm's ``ClassificationTask(model, criterion)``, is
            named as such).

    Example:
        >>> import timm
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
        >>> meta_loader = [(torch.randn(6, 3, 32, 32), torch.randint(0, 3, (6,)))]  # clean meta batches
        >>> task = ReweightClassificationTask(model, meta_loader, criterion_kwargs={"smoothing": 0.1},
        ...                                   net="lossnet", seed=0, verbose=False)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> task = task.bind_optimizer(optimizer)  # train.py creates the optimizer after the task
        >>> result = task(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))  # a training forward
        >>> result["loss"].backward()  # the weighted mean of the label-smoothing losses
        >>> optimizer.step()
        >>> task.reweighter.step_count, sorted(task.pop_weight_stats())
        (1, ['meta_loss', 'weight_ess', 'weight_max', 'weight_min', 'weight_std'])
    """

    def __init__(
        self,
        model: nn.Module,
        meta_loader: Iterable[Any],
        criterion: nn.Module | Callable[..., Tensor] | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        meta_loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
        **reweight_kwargs: Any,
    ) -> None:
        taken = set(_SUPPLIED) & set(reweight_kwargs)
        if taken:
            raise TypeError(f"reweight_kwargs must not set {sorted(taken)}: the task supplies them")
        if isinstance(meta_loader, nn.Module) or not isinstance(meta_loader, Iterable):
            raise TypeError(
                f"meta_loader must be a re-iterable of clean (images, labels) batches, got {type(meta_loader).__name__}"
                + (
                    "; the task takes (model, meta_loader, criterion), not timm's (model, criterion): "
                    "pass criterion=... by keyword"
                    if isinstance(meta_loader, nn.Module)
                    else ""
                )
            )
        super().__init__(
            model, criterion, criterion_kwargs=criterion_kwargs, device=device, dtype=dtype, verbose=verbose
        )
        self.loss_fn = loss_fn or per_sample_criterion(self.criterion)
        self.meta_loss_fn = meta_loss_fn or _meta_criterion(self.criterion)
        self.meta_loader = meta_loader
        self.reweight_kwargs = reweight_kwargs
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_weights: Tensor | None = None  # the latest training forward's per-sample weights and losses
        self.last_losses: Tensor | None = None
        self._late = LateReweighter(
            meta_loader, loss_fn=self.loss_fn, meta_loss_fn=self.meta_loss_fn, **reweight_kwargs
        )
        self._weight_stats = WeightStats()
        if optimizer is not None:
            self.bind_optimizer(optimizer)

    @property
    def reweighter(self) -> MetaReweighter | None:
        """The :class:`~reweight.MetaReweighter`, built by :meth:`bind_optimizer` (``None`` before)."""
        return self._late.reweighter

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> ReweightClassificationTask:
        """Give the task the model's optimizer (its param groups' lr drive the look-ahead); returns ``self``.

        Builds the reweighter now, before the first training forward (``lookahead="head"`` hooks the final
        Linear layer), keeping the state of an earlier reweighter or of :meth:`load_task_state`.

        Raises:
            TypeError: if ``optimizer`` is not a ``torch.optim.Optimizer``.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._late.build(self.trainable_module, optimizer)
        return self

    def _get_reweighter(self) -> MetaReweighter:
        """The reweighter on the current ``trainable_module`` (rebuilt, keeping its state, after ``compile`` or
        ``prepare_distributed`` wrapped the model)."""
        if self.optimizer is None:
            raise RuntimeError("call task.bind_optimizer(optimizer) before training")
        return self._late.build(self.trainable_module, self.optimizer)

    def forward(
        self, input: Tensor, target: Tensor, groups: Tensor | None = None, sample_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``{"loss", "output"}``: the reweighted loss in training, timm's criterion otherwise; a training forward
        adds ``"weights"`` and ``"losses"``, the batch's detached per-sample weights and losses (also kept as
        :attr:`last_weights` and :attr:`last_losses`), for a :class:`~reweight.diagnostics.WeightRecorder`.
        ``groups``: the batch's source ids, for a net that reads them (``net="groups"``); ``sample_ids``: the
        samples' indices in the dataset, with ``loss_history=True``."""
        training = unwrap_model(self.trainable_module).training and torch.is_grad_enabled()
        reweighter = self._get_reweighter() if training else None  # before the forward: the head hook sees it
        output = self.trainable_module(input)
        if reweighter is None:
            return {"loss": self.criterion(output, target), "output": output}
        weights = reweighter.step(input, target, output, groups=groups, sample_ids=sample_ids)
        losses = self.loss_fn(output, target)
        self.last_weights, self.last_losses = weights, losses.detach()
        self._weight_stats.update(weights, reweighter.last_meta_loss, group_stats(reweighter))
        loss = (weights.to(losses.dtype) * losses).mean()
        return {"loss": loss, "output": output, "weights": weights, "losses": self.last_losses}

    def pop_weight_stats(self) -> dict[str, float]:
        """Means of the weights' std, min and max (and the meta loss, and ``group_weight/<name>`` with
        ``net="groups"``) over the training forwards since the last call, for timm's log line (one host sync);
        empty if there were none.

        In ``train.py``'s ``log_interval`` branch: ``_logger.info(f"... {task.pop_weight_stats()}")``; the
        class's example calls it.
        """
        return self._weight_stats.pop()

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """``{"reweighter": state}`` for the training checkpoint (nothing for the EMA model)."""
        if ema:
            return {}
        state = self._late.state_dict()
        return {} if state is None else {TASK_STATE_KEY: state}

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        """Restore the reweighter from ``get_task_state``'s dict (applied when the reweighter is built).

        Raises:
            KeyError: with ``strict`` when a non-EMA state has no ``"reweighter"`` entry.
        """
        if ema or state is None:
            return
        if TASK_STATE_KEY not in state:
            if strict:
                raise KeyError(f"task state has no {TASK_STATE_KEY!r} entry; keys: {sorted(state)}")
            return
        self._late.load_state_dict(state[TASK_STATE_KEY])
