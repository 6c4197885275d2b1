"""What the first batch settles under a loss of the user's: whether the targets are class labels, and with that
``net="auto"``, ``normalization="auto"`` and a pending ``veto_evidence`` (:func:`settle_options`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .options import (
    AUTO_NET,
    AUTO_NET_OTHER,
    L2RW_MIN_ESS,
    MIN_ESS,
    VETO_COMPETENCE,
    VETO_EVIDENCE,
    ReweighterOptions,
    until_evidence,
)

__all__ = ["settle_options", "is_class_labels", "settled"]


def settle_options(options: ReweighterOptions, logits: Tensor, targets: Tensor) -> ReweighterOptions:
    """``options`` with what a loss other than the library's cross-entropy leaves to the first batch settled by
    it: whether the targets are class labels, integer class indices ``(batch,)`` of logits ``(batch, K)`` with
    ``K >= 2`` (not regression, soft or binary targets, token-level outputs). Then ``net="auto"`` is the gated net
    (else LossNet), ``normalization="auto"`` is ``"class"`` (else ``"sum"``), with L2RW's default floor, and
    ``veto_evidence=None`` is :data:`VETO_EVIDENCE` (else 0), with ``veto_competence=None`` :data:`VETO_COMPETENCE`
    where the veto then waits (else 0). Structural: no host sync."""
    pending = options.net == "auto" or options.normalization == "auto" or options.veto_evidence is None
    if not pending and options.veto_competence is not None:
        return options
    return settled(options, AUTO_NET if is_class_labels(logits, targets) else AUTO_NET_OTHER)


def is_class_labels(logits: Tensor, targets: Tensor) -> bool:
    """Whether a batch's targets are class labels by their structure (what a loss of the user's leaves to the
    first batch): integer class indices ``(batch,)`` of logits ``(batch, K)`` with ``K >= 2``. No host sync."""
    labels = logits.ndim == 2 and logits.shape[1] >= 2 and targets.ndim == 1
    return labels and not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)


def settled(options: ReweighterOptions, auto_net: str) -> ReweighterOptions:
    """``options`` with a pending ``net="auto"`` settled to ``auto_net`` (the gated net on class labels, LossNet
    otherwise), ``normalization="auto"`` to ``"class"`` on class labels (else ``"sum"``) and a pending
    ``veto_evidence`` to :data:`VETO_EVIDENCE` on class labels (else 0), and a pending ``veto_competence`` to
    :data:`VETO_COMPETENCE` where the veto waits for evidence on class labels (else 0)."""
    labels = auto_net == AUTO_NET
    changes: dict[str, Any] = {}
    if options.net == "auto":
        changes.update(net=auto_net, net_kwargs={"history": True} if options.loss_history else {})
    if options.normalization == "auto":
        changes["normalization"] = "class" if labels else "sum"
        if options.min_ess is None:  # L2RW's, decided with its normalisation
            changes["min_ess"] = L2RW_MIN_ESS if labels else MIN_ESS
    if options.veto_evidence is None:  # the veto's wait: on class labels
        changes["veto_evidence"] = VETO_EVIDENCE if labels else 0.0
    options = dataclasses.replace(options, **changes)
    if options.veto_competence is None:  # the veto's wait for competence: where it waits for evidence on class labels
        waits = labels and options.vetoes and bool(options.veto_evidence)
        options = dataclasses.replace(options, veto_competence=VETO_COMPETENCE if waits else 0.0)
    if options.min_ess_until_evidence is None:  # the floor while the veto waits, with the wait and normalisation
        options = dataclasses.replace(options, min_ess_until_evidence=until_evidence(options))
    return options
