"""Each training sample's past losses, kept by its id: the input that tells a memorised noisy sample from a clean one.

Once the model has fitted a noisy label, the sample's loss and logits look like a clean sample's; its losses on
earlier visits (high while the label disagreed with what the model learned from the rest) do not. With
``MetaReweighter(..., loss_history=True)`` and ``step(..., sample_ids=ids)``, the nets that read the loss
(:class:`~reweight.nets.LossNet`, the gated net's LossNet) also read each sample's exponential moving average of
its training losses over its earlier visits (:data:`HISTORY_DECAY` per visit); a sample seen for the first time
reads its current loss.

Measured (docs/results.md, "Each sample's loss history"): with the gated net (``net="auto"`` for classification)
it removed the late falls of the stability benchmark and was level elsewhere; LossNet alone with it gained where
the model memorises the noisy labels and lost 2.5 to 3 test points on average (up to 6 on one noise) where
the model fits little of them.

Under data parallelism every rank keeps the whole history: each step's ids and losses
are gathered from every rank (two small collectives per step, and two host reads: the ranks' batch sizes and the
largest id).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .losses import is_class_cross_entropy

if TYPE_CHECKING:
    from .options import ReweighterOptions

__all__ = [
    "HISTORY_DECAY", "MAX_SAMPLE_ID", "LossHistory", "LossHistoryWarning", "check_sample_ids", "check_history_state",
    "check_history", "warn_lossnet_history",
]

# The moving average keeps 0.9 of the history per visit (each sample is visited once per epoch by a shuffled
# loader, so the history spans about ten epochs); the one value measured. On the stability benchmark (BN CNN,
# paper schedule, 10 seeds) the gated net reading it was level on Flip-1 and ahead under Flip-2 and uniform
# noise, on the meta set and in test accuracy, with no late falls (docs/results.md, "Each sample's loss history").
HISTORY_DECAY = 0.9
# The store is dense, one float and one flag per index up to the largest id: ids are the samples' indices.
MAX_SAMPLE_ID = 2**31


class LossHistoryWarning(UserWarning):
    """``loss_history=True`` with LossNet alone on class labels, where it was measured to cost accuracy."""


def check_sample_ids(sample_ids: Any, n: int, wanted: bool) -> Tensor | None:
    """The ids of ``step(..., sample_ids=ids)`` as a ``(n,)`` int64 tensor where they are (``None`` when the loss
    history is off), after checking that the history is on, and their shape, dtype and sign.

    The range check reads the ids on the host: ids on the CPU (as a loader yields them) cost no device sync.
    """
    if not wanted:
        if sample_ids is not None:
            raise ValueError(
                "sample_ids= was given, but loss_history is off: pass MetaReweighter(..., loss_history=True) for the "
                "nets to read each sample's past losses, or drop sample_ids="
            )
        return None
    if sample_ids is None:
        raise ValueError(
            "loss_history=True reads each sample's past losses: pass step(..., sample_ids=ids) with ids a (batch,) "
            "integer tensor of the samples' indices in the dataset"
        )
    if not isinstance(sample_ids, Tensor) or sample_ids.shape != (n,):
        shape = tuple(sample_ids.shape) if isinstance(sample_ids, Tensor) else type(sample_ids).__name__
        raise ValueError(f"sample_ids must be a ({n},) integer tensor (one id per sample of the batch), got {shape}")
    if sample_ids.dtype.is_floating_point or sample_ids.dtype.is_complex or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
    if n:
        low, high = (int(v) for v in torch.aminmax(sample_ids))
        if low < 0:
            raise ValueError(f"sample_ids must be >= 0 (the samples' indices in the dataset), got {low}")
        if high >= MAX_SAMPLE_ID:
            raise ValueError(
                f"sample_ids must be below {MAX_SAMPLE_ID} (the history keeps 5 bytes for every index up to the "
                f"largest): pass the samples' indices 0 .. N-1 in the dataset, not hashes or global ids; got {high}"
            )
    return sample_ids.long()


def check_history_state(state: Any, history: LossHistory | None) -> None:
    """Check a saved ``"loss_history"`` entry against this reweighter's (``None`` when the history is off)."""
    if history is None:
        if state is not None:
            raise ValueError("reweighter state holds a loss history, but this reweighter has loss_history=False")
        return
    if state is None:
        raise ValueError("reweighter state holds no loss history, but this reweighter has loss_history=True")
    history.check_state(state)


class LossHistory:
    """Per-sample exponential moving average of the training loss, indexed by sample id; grows with the ids.

    The store lives on the losses' device in float32, one value and one flag per index up to the largest id seen;
    ids given on the CPU (as a loader yields them) are sized on the host, so a step costs no device sync. A
    sample given twice in one step (sampling with replacement) has one of its two visits recorded.

    Args:
        decay: share of the history kept at each visit (default: :data:`HISTORY_DECAY`).
    """

    def __init__(self, decay: float = HISTORY_DECAY) -> None:
        self.decay = float(decay)
        self.average = torch.zeros(0)
        self.seen = torch.zeros(0, dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.seen.shape[0])

    def _place(self, ids: Tensor, device: torch.device) -> Tensor:
        """``ids`` on ``device``, after growing the store to hold them and moving it there."""
        size = max(len(self), int(ids.max()) + 1) if ids.numel() else len(self)
        if size > len(self) or self.average.device != device:
            average = torch.zeros(size, device=device)
            seen = torch.zeros(size, dtype=torch.bool, device=device)
            average[: len(self)] = self.average.to(device)
            seen[: len(self)] = self.seen.to(device)
            self.average, self.seen = average, seen
        return ids.to(device)

    def lookup(self, ids: Tensor, losses: Tensor) -> Tensor:
        """Each sample's history; its current loss where it has none yet. Detached, in ``losses``' dtype."""
        ids = self._place(ids, losses.device)
        return torch.where(self.seen[ids], self.average[ids].to(losses.dtype), losses.detach())

    def record(self, ids: Tensor, losses: Tensor, finite: Tensor) -> None:
        """Fold this visit's ``losses`` into the history of ``ids``; a non-finite loss leaves a sample's history as
        it was."""
        ids = self._place(ids, losses.device)
        average, current = self.average[ids], losses.detach().float()
        new = torch.where(self.seen[ids], self.decay * average + (1 - self.decay) * current, current)
        self.average[ids] = torch.where(finite, new, average)
        self.seen[ids] = self.seen[ids] | finite

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "average": self.average.clone(), "seen": self.seen.clone()}

    @staticmethod
    def check_state(state: Any) -> None:
        """Refuse a malformed saved history (reads only)."""
        if not isinstance(state, Mapping) or set(state) != {"decay", "average", "seen"}:
            raise ValueError("reweighter state: loss_history must be a dict with 'decay', 'average' and 'seen'")
        average, seen = state["average"], state["seen"]
        if not (
            isinstance(average, Tensor) and isinstance(seen, Tensor) and average.ndim == 1
            and average.shape == seen.shape and seen.dtype == torch.bool
        ):
            raise ValueError("reweighter state: loss_history needs a 1-D 'average' and a boolean 'seen' of its length")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)
        self.decay = float(state["decay"])
        self.average, self.seen = state["average"].float().clone(), state["seen"].clone()


def warn_lossnet_history(stacklevel: int) -> None:
    """The :class:`~reweight.loss_history.LossHistoryWarning` of LossNet alone reading the history of class labels."""
    warnings.warn(
        "loss_history=True with net='lossnet' on class labels: LossNet alone with the history lost 2.5 to 3 "
        "points of test accuracy on average (up to 6 on one noise) where the model fits little of the label "
        "noise (docs/results.md, \"Each sample's loss history\"); the gated net (net='auto' or 'gated') reads "
        "the history without that loss",
        LossHistoryWarning,
        stacklevel=stacklevel,
    )


def check_history(options: ReweighterOptions) -> None:
    """``loss_history`` and a net that reads the history go together: refuse one without the other. LossNet
    alone with it on class labels gets a :class:`~reweight.loss_history.LossHistoryWarning` (measured losses)."""
    net = options.net if isinstance(options.net, str) else type(options.net).__name__
    if options.loss_history and net == "lossnet" and is_class_cross_entropy(options.loss_fn):
        warn_lossnet_history(stacklevel=5)  # under a loss of the user's: at the first batch of class labels
    if options.loss_history and not options.requires_history:
        raise ValueError(
            f"loss_history=True, but net {net!r} does not read the loss history: use net='auto', 'gated' or "
            "'lossnet' (the nets that read the loss), or a module with requires_history = True"
        )
    if options.requires_history and not options.loss_history:
        raise ValueError(
            f"net {net!r} reads each sample's loss history: pass loss_history=True and step(..., sample_ids=ids)"
        )
