"""Checks of what ``step`` is handed: the training batch, per-sample losses and meta batches.

Each error names the batch it came from and the shapes involved, so that a wrong meta set or a
mean-reduced loss is reported where it is made, never turned into a silent wrong answer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._batch import Inputs, batch_size, call_model, split_batch, to_device
from ._rng import isolated_rng
from .losses import PerSampleLoss, check_class_targets
from .options import ReweighterOptions
from .settling import is_class_labels, settle_options

__all__ = [
    "check_batch",
    "check_losses",
    "check_groups",
    "check_meta_forward",
    "check_meta_labels",
    "step_losses",
    "naming_batch",
    "prepare_meta_batch",
    "describe_shapes",
]


def check_losses(losses: Any, n: int, what: str) -> None:
    """Refuse anything but per-sample losses of shape ``(n,)`` (a mean-reduced loss ignores the weights)."""
    if not isinstance(losses, Tensor) or losses.shape != (n,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        hint = " (a mean- or sum-reduced loss: use reduction='none')" if shape == () else ""
        raise ValueError(f"{what} must return per-sample losses of shape ({n},), got {shape}{hint}")


def naming_batch(loss_fn: PerSampleLoss, batch: str, what: str) -> PerSampleLoss:
    """``loss_fn`` whose ``ValueError`` (labels out of range, mismatched shapes) names ``batch``, and that
    refuses a result that is not one loss per sample (``what`` names the argument, e.g. ``"meta_loss_fn"``)."""

    def named(logits: Tensor, targets: Tensor) -> Tensor:
        try:
            losses = loss_fn(logits, targets)
        except ValueError as err:
            raise ValueError(f"{batch}: {err}") from err
        check_losses(losses, logits.shape[0], f"{what} on the {batch}")
        return losses

    return named


def check_batch(inputs: Inputs, targets: Any, logits: Tensor, *, net: str | None, num_classes: int | None) -> int:
    """The batch size, after checking that ``inputs``, ``targets`` and ``logits`` agree.

    Args:
        net: the weighting net's name when it reads class logits, else ``None``.
        num_classes: the class count the net was built for, if built.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
    if logits.ndim == 0:
        raise ValueError(
            "the outputs are a scalar: pass step() the model's per-sample outputs (logits of shape "
            "(batch, ...)), not a loss"
        )
    if targets.ndim == 0:
        raise ValueError("targets must have a leading batch dimension, got a scalar")
    n = logits.shape[0]
    if n == 0:
        raise ValueError("the batch is empty")
    n_inputs = batch_size(inputs)
    if not n_inputs == targets.shape[0] == n:
        raise ValueError(f"batch sizes disagree: inputs {n_inputs}, targets {targets.shape[0]}, outputs {n}")
    if net is None:
        return n
    if logits.ndim != 2 or not logits.is_floating_point() or logits.shape[1] < 2:
        hint = (
            "; token-level outputs (causal LM, token classification) suit only the loss-based nets: "
            "use net='lossnet' or net='l2rw'"
            if logits.ndim == 3
            else "; use net='lossnet' or net='l2rw', which need only the per-sample loss"
        )
        raise ValueError(
            f"net {net!r} needs class logits of shape (batch, num_classes >= 2); got outputs of shape "
            f"{tuple(logits.shape)}{hint}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"the weighting net was built for {num_classes} classes, outputs have {logits.shape[1]}")
    return n


def step_losses(
    inputs: Inputs, targets: Any, logits: Tensor, options: ReweighterOptions, num_classes: int | None
) -> tuple[Tensor, ReweighterOptions]:
    """The training batch's per-sample losses (detached), after every check of what ``step`` was given, and the
    reweighter's ``options`` with what the first batch settles settled by it (:func:`settle_options`)."""
    net = options.net if isinstance(options.net, str) else type(options.net).__name__
    n = check_batch(inputs, targets, logits, net=net if options.requires_logits else None, num_classes=num_classes)
    with torch.no_grad():
        losses = naming_batch(options.loss_fn, "training batch", "loss_fn")(logits.detach(), targets)
    check_losses(losses, n, "loss_fn")
    settled = settle_options(options, logits, targets)  # the same options when nothing is pending
    if settled is not options:
        if options.veto_evidence is None and settled.veto_evidence == 0 and options.min_ess_until_evidence:
            raise ValueError(
                "min_ess_until_evidence applies while the veto waits for evidence of label noise, which it does on "
                "class labels only; these targets are not class labels (the veto acts from the first update): drop "
                "min_ess_until_evidence, or pass veto_evidence=0.05 to wait for evidence read on the whole meta batch"
            )
        options = settled
        if options.requires_logits:  # the gated net: the logits' checks it would have had
            check_batch(inputs, targets, logits, net=str(options.net), num_classes=num_classes)
    if math.isfinite(options.veto_refill) and options.normalization != "class":
        raise ValueError(
            "veto_refill applies under normalization='class'; these targets are not class labels (integer class "
            "indices of (batch, K >= 2) logits), so the weights are normalised over the batch: drop veto_refill"
        )
    if options.veto_competence and not (options.normalization == "class" or is_class_labels(logits, targets)):
        raise ValueError(
            "veto_competence reads the model's accuracy on the meta set, which needs class labels (integer class "
            "indices of (batch, K >= 2) logits); these targets are not class labels: drop veto_competence"
        )
    if options.normalization == "class":
        try:
            check_class_targets(logits, targets)
        except ValueError as err:
            raise ValueError(
                f"normalization='class' weighs the samples of each class among themselves and needs class labels: "
                f"{err}; use normalization='sum' for other targets"
            ) from None
    return losses, options


def check_groups(groups: Any, n: int, options: Any, device: torch.device) -> Tensor | None:
    """The group ids of ``step(..., groups=g)`` as a ``(n,)`` int64 tensor on ``device`` (``None`` when the net
    reads no groups), after checking that the net reads them, their shape, dtype and range ``0 .. num_groups-1``.

    The range check reads the ids on the host: ids on the CPU (as a loader yields them) cost no device sync.
    """
    net = options.net if isinstance(options.net, str) else type(options.net).__name__
    if not options.requires_groups:
        if groups is not None:
            raise ValueError(
                f"groups= was given, but net {net!r} does not read group ids; use net='groups' (learned weight "
                "per source) or a net with requires_groups = True, or drop groups="
            )
        return None
    if groups is None:
        raise ValueError(
            f"net {net!r} weights samples by their group: pass step(..., groups=g) with g a (batch,) integer "
            "tensor of group ids"
        )
    if not isinstance(groups, Tensor):
        raise TypeError(f"groups must be a Tensor of integer group ids, got {type(groups).__name__}")
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise TypeError(f"groups must be an integer tensor, got dtype {groups.dtype}")
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), one group id per sample; got {tuple(groups.shape)}")
    num_groups = options.num_groups
    if num_groups is not None:
        extremes = torch.aminmax(groups.detach())
        low, high = int(extremes.min), int(extremes.max)
        if low < 0 or high >= num_groups:
            bad = low if low < 0 else high
            raise ValueError(
                f"groups holds the id {bad}, out of range for num_groups={num_groups} (ids 0..{num_groups - 1})"
            )
    return groups.detach().to(device=device, dtype=torch.long)


def check_meta_labels(meta_targets: Tensor, logits: Tensor, meta_loss_fn: PerSampleLoss) -> None:
    """The meta loss's own checks (labels in range) on stand-in logits shaped like the training batch's."""
    if logits.ndim == 2:
        with torch.no_grad():
            stand_in = logits.new_zeros(meta_targets.shape[0], logits.shape[1])
            naming_batch(meta_loss_fn, "meta batch", "meta_loss_fn")(stand_in, meta_targets)


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _cast(obj: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple | list) and not hasattr(obj, "_fields"):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


def prepare_meta_batch(batch: Any, module: nn.Module, device: torch.device) -> tuple[Inputs, Tensor]:
    """``(inputs, targets)`` of a meta batch on the model's device, floating inputs in its floating dtype
    (a float64 batch from numpy meets a float32 model), floating targets too; integers keep their dtype."""
    inputs, targets = split_batch(batch)
    dtype = _floating_dtype(module)
    inputs, targets = _cast(to_device(inputs, device), dtype), _cast(to_device(targets, device), dtype)
    if not isinstance(targets, Tensor) or targets.ndim == 0:
        raise ValueError("meta batch targets must be a tensor with a batch dimension")
    m = batch_size(inputs)
    if m != targets.shape[0] or m == 0:
        raise ValueError(f"meta batch is empty or inconsistent: inputs {m}, targets {targets.shape[0]}")
    return inputs, targets


def check_meta_forward(model: nn.Module, meta_inputs: Inputs, inputs: Inputs, logits_fn: Any, err: Exception) -> None:
    """After an engine failed with ``err``: if ``model`` cannot take the meta batch at all, say so with its
    shapes (a no-grad forward with the reweighter's RNG untouched); otherwise return and let ``err`` stand."""
    try:
        with torch.no_grad(), isolated_rng(0, _device_of(model)):
            call_model(model, {}, meta_inputs, logits_fn)
    except Exception as meta_err:  # noqa: BLE001  (any failure of the meta batch's forward)
        raise ValueError(
            f"the model cannot take the meta batch: inputs of shapes {describe_shapes(meta_inputs)} "
            f"(training batch: {describe_shapes(inputs)}): {meta_err}"
        ) from err


def describe_shapes(inputs: Inputs) -> str:
    """The shapes of the tensors in ``inputs``, for error messages: ``(20, 32)`` or ``{'x': (20, 32)}``."""
    if isinstance(inputs, Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, Tensor)) + "}"
    return "(" + ", ".join(str(tuple(v.shape)) for v in inputs if isinstance(v, Tensor)) + ")"
