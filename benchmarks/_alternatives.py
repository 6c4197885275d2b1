"""What a user would do instead of meta reweighting, for ``benchmarks/accuracy.py``; and a pass counter.

- :func:`gce_loss`: generalized cross-entropy (Zhang & Sabuncu 2018), a robust loss that needs no clean data.
- :func:`find_issues`: cleanlab's confident learning on out-of-sample predicted probabilities.
- :class:`PassCounter`: counts the samples that go through a model's forward, forward-mode (JVP) forward and
  backward passes, with hooks, so every method's training cost is measured in the same unit.

``cleanlab`` is a benchmark-only dependency (``pip install "reweight[bench]"``), imported when used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

__all__ = ["GCE_Q", "CLEANLAB_FOLDS", "gce_loss", "find_issues", "fold_indices", "detection", "PassCounter"]

GCE_Q = 0.7  # Zhang & Sabuncu (2018): q = 0.7 on CIFAR
CLEANLAB_FOLDS = 5  # cleanlab's own default number of cross-validation folds


def gce_loss(logits: torch.Tensor, targets: torch.Tensor, q: float = GCE_Q) -> torch.Tensor:
    """Per-sample generalized cross-entropy ``(1 - p_y ** q) / q`` (``q -> 0``: cross-entropy; ``q = 1``: MAE).

    ``p_y ** q`` is computed as ``exp(q * log_softmax)`` so that its gradient stays finite when ``p_y``
    underflows.

    Args:
        logits: ``(batch, K)``.
        targets: class indices ``(batch,)``.
        q: the exponent, in ``(0, 1]`` (default: ``0.7``).

    Raises:
        ValueError: if ``q`` is outside ``(0, 1]``.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return (1.0 - torch.exp(q * log_p)) / q


def fold_indices(n: int, labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Stratified folds: each class's shuffled indices dealt round-robin over ``folds`` (held-out index sets)."""
    gen = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(labels):
        idx = gen.permutation(np.nonzero(labels == c)[0])
        for j, i in enumerate(idx):
            out[(j + offset) % folds].append(int(i))
        offset += len(idx)  # the next class starts where this one stopped: folds stay balanced in size
    return [np.sort(np.array(f, dtype=np.int64)) for f in out]


def find_issues(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Boolean mask of the samples ``cleanlab.filter.find_label_issues`` flags (its defaults)."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the cleanlab method needs cleanlab: pip install 'reweight[bench]'") from err
    return np.asarray(find_label_issues(labels, pred_probs), dtype=bool)


def detection(flagged: np.ndarray, corrupted: np.ndarray) -> dict:
    """Size, precision and recall of a flagged set against the true corruption mask (NaN where undefined)."""
    hit = int((flagged & corrupted).sum())
    n_flag, n_bad = int(flagged.sum()), int(corrupted.sum())
    return {
        "flagged": n_flag,
        "precision": hit / n_flag if n_flag else float("nan"),
        "recall": hit / n_bad if n_bad else float("nan"),
    }


class PassCounter:
    """Counts samples through ``model``: plain forwards, forward-mode (JVP) forwards and backwards.

    The unit is one sample through the whole model once. A forward hook on the root module counts every
    call (including the stateless ``functional_call`` look-aheads of the reweighter); an output carrying a
    forward-mode tangent counts as a JVP; an output that requires grad gets a tensor hook that counts its
    batch each time a gradient reaches it (``backward`` or ``autograd.grad``). The weighting net's own passes
    (a net of a few thousand parameters on ``(batch, K)`` inputs) are not counted. Counting is off inside
    :meth:`paused` (the benchmark's own evaluation).
    """

    def __init__(self, model: nn.Module) -> None:
        self.forwards = self.jvps = self.backwards = 0
        self._on = True
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output) -> None:
        if not self._on or not isinstance(output, torch.Tensor):
            return
        n = int(output.shape[0])
        if fwAD.unpack_dual(output).tangent is not None:
            self.jvps += n
        else:
            self.forwards += n
        if output.requires_grad:
            output.register_hook(lambda grad: self._count_backward(n))

    def _count_backward(self, n: int) -> None:
        self.backwards += n

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count inside this block."""
        on, self._on = self._on, False
        try:
            yield
        finally:
            self._on = on

    def counts(self) -> dict[str, int]:
        """``{"forwards", "jvps", "backwards"}`` so far, in samples."""
        return {"forwards": self.forwards, "jvps": self.jvps, "backwards": self.backwards}

    def remove(self) -> None:
        """Remove the hook from the model."""
        self._handle.remove()
