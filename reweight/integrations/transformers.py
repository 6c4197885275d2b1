"""Hugging Face Transformers: a ``Trainer`` whose ``compute_loss`` learns per-sample weights.

``ReweightTrainer`` (or ``ReweightTrainerMixin`` on top of another ``Trainer`` subclass) takes a clean
``meta_dataset`` and, for every training micro-batch, forwards the batch through the (possibly wrapped or
compiled) model once, asks a :class:`~reweight.MetaReweighter` for the weights (its look-ahead runs on the
unwrapped module), and returns ``(weights * per_sample_loss).mean()``. With all weights 1 that is exactly the
Trainer's own loss: cross-entropy for sequence classification, the mean over valid (``!= -100``) shifted
tokens for causal LMs, label smoothing included.

* Gradient accumulation: for sequence classification the loss is a per-micro-batch mean and the Trainer
  divides it by the accumulation steps (``loss_is_scaled_for_ga = False``, ``model_accepts_loss_kwargs =
  False``), so accumulating two equal micro-batches gives the gradient of the double batch. For causal LM
  and token classification the weighted token sums are divided by the valid tokens of all accumulated
  micro-batches (``loss_is_scaled_for_ga = True``), exactly as the Trainer's own loss.
* Evaluation (``prediction_step``, or any call under ``no_grad`` or in eval mode) runs no meta step and
  returns the unweighted loss.
* Checkpoints: the reweighter's state is written to ``checkpoint-*/reweighter.pt`` and restored by
  ``train(resume_from_checkpoint=...)``.
* Logs: ``reweight/weight_std``, ``reweight/weight_min``, ``reweight/weight_max``, ``reweight/weight_ess``
  (effective sample size) and ``reweight/meta_loss``, averaged over the steps since the last log, join the
  Trainer's training logs; with ``net="groups"`` also ``reweight/group_weight/<name>``, each source's weight.
  ``trainer.last_weights`` and ``trainer.last_losses`` hold the latest training micro-batch's per-sample
  weights and losses (detached), for a :class:`~reweight.diagnostics.WeightRecorder` in a ``TrainerCallback``.
* Sources: a net that reads group ids (``net="groups"``) gets each sample's source id from the dataset column
  ``group_column`` (default ``"source"``), kept through the Trainer's column filter and never given to the model.
* Loss history: with ``reweight_kwargs={"loss_history": True}`` each sample's index comes from the dataset column
  ``id_column`` (default ``"sample_id"``, e.g. ``dataset.add_column("sample_id", range(len(dataset)))``), kept
  and popped alike.
* Warmup: a linear warmup starting at lr 0 makes the look-ahead (and the meta-gradient) zero until the lr
  rises; pass ``lookahead_lr`` (e.g. ``0.1``) to decouple the look-ahead from the schedule. AdamW's small lrs
  need nothing: the net's update does not depend on the lr's scale.

:class:`ReweightTrainer`'s example trains a tiny model end to end.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import losses as _losses
from .._batch import as_logits, unwrap_model
from .._docstrings import fill_doc, reweighter_arg, reweighter_kwargs
from ..presets import FROM_PRESET
from ..reweighter import MetaReweighter
from . import require
from ._common import (
    LateReweighter,
    WeightStats,
    describe_net,
    group_stats,
    needs_class_logits,
    reads_groups,
    warn_if_short,
)

_transformers = require("transformers", "transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

__all__ = [
    "ReweightTrainer",
    "ReweightTrainerMixin",
    "REWEIGHTER_STATE_NAME",
    "TASKS",
    "per_sample_loss",
]

REWEIGHTER_STATE_NAME = "reweighter.pt"
TASKS = ("auto", "sequence_classification", "causal_lm", "token_classification")
_LABEL_KEYS = ("labels", "label", "label_ids")
_TOKEN_TASKS = ("causal_lm", "token_classification")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def per_sample_loss(
    task: str, label_smoothing: float = 0.0, reduction: str = "token_mean"
) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample loss of a Hugging Face task whose batch mean is the Trainer's own loss.

    Args:
        task: ``"sequence_classification"`` (cross-entropy), ``"causal_lm"`` (shifted token losses summed per
            sequence over the batch's valid tokens) or ``"token_classification"`` (the same, unshifted).
        label_smoothing: the Trainer's ``label_smoothing_factor`` (default: ``0.0``).
        reduction: for the token tasks, as in :func:`reweight.losses.sequence_cross_entropy`; ``"sum"`` gives
            each sequence's token-loss sum (default: ``"token_mean"``).

    Raises:
        ValueError: on an unknown task.
    """
    if task == "sequence_classification":
        return partial(_losses.cross_entropy, label_smoothing=label_smoothing)
    if task == "causal_lm":
        return partial(_losses.causal_lm_loss, label_smoothing=label_smoothing, reduction=reduction)
    if task == "token_classification":
        return partial(_losses.sequence_cross_entropy, label_smoothing=label_smoothing, reduction=reduction)
    raise ValueError(f"task must be one of {TASKS[1:]}, got {task!r}")


def _infer_task(module: nn.Module) -> str:
    """The task of ``module`` by its class name, or by its base model's under a peft wrapper (a ``PeftModel``
    built without ``task_type`` keeps the generic class name)."""
    get_base_model = getattr(module, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else module
    name = type(base).__name__
    if name.endswith(_CAUSAL_SUFFIXES):
        return "causal_lm"
    if name.endswith("ForTokenClassification"):
        return "token_classification"
    return "sequence_classification"


class _ReweighterCallback(TrainerCallback):
    """Builds the reweighter when training begins and writes its state into each checkpoint folder."""

    def __init__(self, trainer: ReweightTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the reweighter (and ``lookahead="head"``'s hook) before the first training forward; warn when
        the run is shorter than the net's warm-up (:func:`~reweight.integrations._common.warn_if_short`)."""
        reweighter = self.trainer._ensure_reweighter(self.trainer.model_wrapped)
        warn_if_short(reweighter, state.max_steps * args.gradient_accumulation_steps)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Save ``reweighter.pt`` beside the checkpoint just written."""
        reweighter_state = self.trainer._late.state_dict()
        if not args.should_save or reweighter_state is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(reweighter_state, os.path.join(folder, REWEIGHTER_STATE_NAME))


if TYPE_CHECKING:  # type-check the mixin against the Trainer it is combined with; at run time it is a plain mixin
    _TrainerBase = Trainer
else:
    _TrainerBase = object


_SUPPLIED = ("model", "optimizer", "meta_loader", "lookahead_lr", "loss_fn")  # not in reweight_kwargs


@fill_doc(
    loss_fn=reweighter_arg("loss_fn"),
    lookahead_lr=reweighter_arg("lookahead_lr"),
    reweight_kwargs=reweighter_kwargs(_SUPPLIED, "the Trainer"),
)
class ReweightTrainerMixin(_TrainerBase):
    """Mixin for a ``transformers.Trainer`` subclass: the meta step inside ``compute_loss``.

    Args:
        meta_dataset: clean meta samples, collated and column-filtered as the Trainer does for its own datasets
            (``get_test_dataloader``), then shuffled (default: ``None``).
        meta_loader: instead of ``meta_dataset``, a re-iterable of ready meta batches (dicts of model inputs
            with ``labels``) (default: ``None``).
        meta_batch_size: batch size of the meta loader built from ``meta_dataset``
            (default: ``per_device_train_batch_size``).
        task: ``"auto"`` (from the model class: ``*ForCausalLM`` is causal LM, ``*ForTokenClassification`` token
            classification, anything else sequence classification) or one of :data:`TASKS` (default: ``"auto"``).
        loss_fn: {loss_fn}, replacing the task's; ``None`` uses the task's (:func:`per_sample_loss`)
            (default: ``None``).
        lookahead_lr: {lookahead_lr}; ``None`` follows the schedule (default: the ``preset``'s, ``None``).
        reweight_kwargs: further {reweight_kwargs}. ``meta_loss_fn`` defaults to the task's loss without
            smoothing (default: ``None``).
        group_column: the dataset column holding each sample's source id (an int in ``0 .. num_groups-1``), read
            when the net reads groups (``net="groups"``); popped from every batch before the model's forward and
            dropped from meta batches (default: ``"source"``).
        id_column: the dataset column holding each sample's index in the dataset, read with
            ``reweight_kwargs={"loss_history": True}``; popped and dropped like ``group_column`` (default:
            ``"sample_id"``).
        *args: the Trainer's own positional arguments.
        **kwargs: the Trainer's own keyword arguments.

    Raises:
        ValueError: if neither or both of ``meta_dataset`` and ``meta_loader`` are given, on an unknown task, a
            ``meta_batch_size`` below 1, with a ``compute_loss_func`` (the weighted loss replaces it), or with a
            net that needs class logits (``"logitnet"``, ``"metainfonet"``) on a token-level task.
        TypeError: if ``meta_batch_size`` is not an int, or ``reweight_kwargs`` sets an argument that the Trainer
            or this mixin supplies (listed under ``reweight_kwargs``).
    """

    loss_is_scaled_for_ga: bool | None = False

    def __init__(
        self,
        *args: Any,
        meta_dataset: Dataset | None = None,
        meta_loader: Iterable[Any] | None = None,
        meta_batch_size: int | None = None,
        task: str = "auto",
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        lookahead_lr: float | None = FROM_PRESET,
        reweight_kwargs: dict[str, Any] | None = None,
        group_column: str = "source",
        id_column: str = "sample_id",
        **kwargs: Any,
    ) -> None:
        for name, value in (("group_column", group_column), ("id_column", id_column)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        self.group_column, self.id_column = group_column, id_column
        self._reads_groups = reads_groups((reweight_kwargs or {}).get("net", "auto"))
        self._reads_ids = (reweight_kwargs or {}).get("loss_history") is True
        # the dataset columns kept for training batches and never given to the model
        kept = ((group_column, self._reads_groups), (id_column, self._reads_ids))
        self._extra_columns = [column for column, wanted in kept if wanted]
        if (meta_dataset is None) == (meta_loader is None):
            raise ValueError("pass exactly one of meta_dataset and meta_loader")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if meta_batch_size is not None:
            if isinstance(meta_batch_size, bool) or not isinstance(meta_batch_size, int):
                raise TypeError(f"meta_batch_size must be an int or None, got {type(meta_batch_size).__name__}")
            if meta_batch_size < 1:
                raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
        reweight_kwargs = dict(reweight_kwargs or {})
        taken = set(_SUPPLIED) & set(reweight_kwargs)
        if taken:
            raise TypeError(f"reweight_kwargs must not set {sorted(taken)}: the Trainer supplies them")
        super().__init__(*args, **kwargs)
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("compute_loss_func is not supported: pass loss_fn, a per-sample loss, instead")
        self.meta_dataset, self._meta_loader_arg = meta_dataset, meta_loader
        self.meta_batch_size = meta_batch_size
        if self.model is None:  # the Trainer builds it from model_init when not given
            raise ValueError("ReweightTrainer needs a model or a model_init")
        self.task = _infer_task(unwrap_model(self.model)) if task == "auto" else task
        net = reweight_kwargs.get("net", "auto")  # "auto": the gated net on class labels, LossNet on token logits
        if self.task in _TOKEN_TASKS and needs_class_logits(net, reweight_kwargs.get("net_kwargs")):
            raise ValueError(
                f"net={describe_net(net)} needs class logits (batch, num_classes), but a {self.task} model outputs "
                f"token logits (batch, sequence, vocabulary); use net='lossnet' or net='l2rw', which weight each "
                "sequence from its loss alone"
            )
        smoothing = float(self.args.label_smoothing_factor or 0.0)
        self.per_sample_loss = loss_fn or per_sample_loss(self.task, smoothing)
        # token tasks: normalise by the valid tokens of all accumulated micro-batches, which the Trainer counts
        # (num_items_in_batch) when it believes the loss takes them; the mixin's compute_loss does
        self._token_sums = (
            None if loss_fn or self.task not in _TOKEN_TASKS else per_sample_loss(self.task, smoothing, "sum")
        )
        self.model_accepts_loss_kwargs = self._token_sums is not None
        self.loss_is_scaled_for_ga = self._token_sums is not None
        self.meta_loss_fn = reweight_kwargs.pop("meta_loss_fn", None) or loss_fn or per_sample_loss(self.task)
        self.logits_fn: Callable[[Any], Tensor] = reweight_kwargs.get("logits_fn") or as_logits
        self.lookahead_lr = lookahead_lr
        self.reweight_kwargs = reweight_kwargs
        self._late = LateReweighter(
            lookahead_lr=lookahead_lr, loss_fn=self.per_sample_loss, meta_loss_fn=self.meta_loss_fn, **reweight_kwargs
        )
        self._weight_stats = WeightStats()
        self.last_weights: Tensor | None = None  # the latest training micro-batch's, for a WeightRecorder
        self.last_losses: Tensor | None = None
        self.add_callback(_ReweighterCallback(self))

    # ------------------------------------------------------------------ reweighter

    @property
    def reweighter(self) -> MetaReweighter | None:
        """The :class:`~reweight.MetaReweighter`, built when training begins (``None`` before)."""
        return self._late.reweighter

    def get_meta_dataloader(self) -> Iterable[Any]:
        """The meta loader: ``meta_loader`` as given, or ``meta_dataset`` collated and column-filtered by the
        Trainer's own ``get_test_dataloader``, re-batched with ``meta_batch_size`` and shuffled."""
        if self._meta_loader_arg is not None:
            return self._meta_loader_arg
        assert self.meta_dataset is not None  # the constructor takes exactly one of the two
        reference = self.get_test_dataloader(self.meta_dataset)
        collate = reference.collate_fn
        if self._extra_columns:  # kept for training batches; the model never takes them
            collate = partial(_without_keys, collate, self._extra_columns)
        return DataLoader(
            reference.dataset,
            batch_size=self.meta_batch_size or self.args.per_device_train_batch_size,
            shuffle=True,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def _set_signature_columns_if_needed(self) -> None:
        """The Trainer's column filter keeps the model's arguments and the labels; and ``group_column`` when the
        net reads groups, ``id_column`` with the loss history."""
        super()._set_signature_columns_if_needed()
        columns = self._signature_columns
        for column in self._extra_columns:
            if columns is not None and column not in columns:
                columns.append(column)

    def _ensure_reweighter(self, model: nn.Module) -> MetaReweighter:
        """The reweighter on ``model`` (the module the Trainer forwards) and the Trainer's optimizer."""
        bare = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        target = model if unwrap_model(model) is bare else bare  # the core unwraps DDP/compile itself
        optimizer = self.optimizer
        inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        if optimizer is None:
            raise RuntimeError("the reweighter is built on the Trainer's optimizer, which does not exist yet")
        if self._late.meta_loader is None:
            self._late.meta_loader = self.get_meta_dataloader()
        return self._late.build(target, optimizer)

    # ------------------------------------------------------------------ the loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Any]:
        """The weighted loss ``(weights * per_sample_loss).mean()``; unweighted, with no meta step, in evaluation.

        Sequence classification (or a custom ``loss_fn``): the loss is the micro-batch's weighted mean and the
        Trainer divides it by the gradient-accumulation steps. Token tasks: ``sum_i w_i * token_sum_i /
        num_items_in_batch``, the valid tokens of all accumulated micro-batches as the Trainer counts them, so
        that unit weights give the Trainer's own loss under accumulation too.

        Raises:
            ValueError: if the batch has no ``labels``.
        """
        inputs = dict(inputs)
        labels = None
        for key in _LABEL_KEYS:
            if key in inputs:
                labels = inputs.pop(key)
                break
        if labels is None:
            raise ValueError(f"ReweightTrainer needs labels in each batch (one of {_LABEL_KEYS}); got {sorted(inputs)}")
        groups = inputs.pop(self.group_column, None) if self._reads_groups else None
        ids = inputs.pop(self.id_column, None) if self._reads_ids else None
        training = model.training and torch.is_grad_enabled() and self.optimizer is not None
        if training and self._reads_ids and ids is None:
            raise ValueError(
                f"loss_history=True reads each sample's past losses: the batch needs the dataset column "
                f"id_column={self.id_column!r} (each sample's index); got {sorted(inputs)}"
            )
        if training and self._reads_groups and groups is None:
            raise ValueError(
                f"the weighting net reads each sample's source (groups): the batch needs the dataset column "
                f"group_column={self.group_column!r}; got {sorted(inputs)}"
            )
        # built before the forward, so that lookahead="head"'s hook on the final Linear sees this batch
        reweighter = self._ensure_reweighter(model) if training else None
        outputs = model(**inputs)
        logits = self.logits_fn(outputs)
        losses = self.per_sample_loss(logits, labels)
        if reweighter is not None:
            weights = reweighter.step(inputs, labels, outputs, groups=groups, sample_ids=ids).to(losses.dtype)
            self.last_losses = losses.detach()
            self._record(weights)
            if self._token_sums is None:
                loss = (weights * losses).mean()
            elif num_items_in_batch is not None:
                loss = (weights * self._token_sums(logits, labels)).sum() / num_items_in_batch
                if self.args.average_tokens_across_devices:  # the count spans all ranks, as in Trainer.compute_loss
                    loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            else:  # no count from the Trainer: this micro-batch's token mean, scaled for accumulation here
                steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                loss = (weights * losses).mean() / steps
        else:
            loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logs and checkpoints

    def _record(self, weights: Tensor) -> None:
        self.last_weights = weights.detach()
        meta_loss = self.reweighter.last_meta_loss if self.reweighter is not None else None
        self._weight_stats.update(weights, meta_loss, group_stats(self.reweighter))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``, with the weight statistics since the last training log added."""
        if "loss" in logs:
            for key, value in self._weight_stats.pop().items():
                logs[f"reweight/{key}"] = value
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``; on resume, also restores the reweighter from ``checkpoint-*/reweighter.pt``."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, str):
            file = os.path.join(path, REWEIGHTER_STATE_NAME)
            if os.path.isfile(file):
                self._late.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
            else:
                warnings.warn(
                    f"{path} has no {REWEIGHTER_STATE_NAME}: the weighting net starts afresh", RuntimeWarning, 2
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)


def _without_keys(collate: Callable[[list[Any]], Any], keys: list[str], rows: list[Any]) -> Any:
    batch = collate(rows)
    if isinstance(batch, dict) and any(key in batch for key in keys):
        batch = {k: v for k, v in batch.items() if k not in keys}
    return batch


class ReweightTrainer(ReweightTrainerMixin, Trainer):
    """``transformers.Trainer`` with meta sample reweighting; see :class:`ReweightTrainerMixin` for the arguments.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> _ = torch.manual_seed(0)
        >>> config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                     intermediate_size=32, num_labels=3)
        >>> model = BertForSequenceClassification(config)  # a tiny random BERT
        >>> def rows(n):  # synthetic sequences of 8 token ids with a label in {0, 1, 2}
        ...     return [{"input_ids": torch.randint(1, 40, (8,)), "labels": int(torch.randint(0, 3, ()))}
        ...             for _ in range(n)]
        >>> out = tempfile.TemporaryDirectory()
        >>> args = TrainingArguments(out.name, max_steps=2, per_device_train_batch_size=8, use_cpu=True,
        ...                          report_to=[], save_strategy="no", disable_tqdm=True)
        >>> trainer = ReweightTrainer(model=model, args=args, train_dataset=rows(16), meta_dataset=rows(8),
        ...                           lookahead_lr=0.1, reweight_kwargs={"net": "lossnet", "seed": 0})
        >>> trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        TrainOutput(global_step=2, ...)
        >>> trainer.reweighter.step_count  # one meta step per training step
        2
        >>> out.cleanup()
    """
