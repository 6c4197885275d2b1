"""Long-tailed subsampling: class ``i`` keeps ``n_max * mu**i`` samples, ``mu = imbalance ** (-1 / (K-1))``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_labels, check_int, rng

__all__ = ["LongTail", "long_tail", "long_tail_counts"]


class LongTail(NamedTuple):
    """Kept sample indices (sorted) into the input and the per-class counts ``(K,)``."""

    indices: np.ndarray
    counts: np.ndarray


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> np.ndarray:
    """Per-class sizes ``round(n_max * mu**i)``, ``i = 0..K-1``; largest / smallest is ``imbalance`` up to rounding.

    Raises:
        ValueError: if ``imbalance < 1`` or ``n_max / imbalance`` rounds to fewer than one sample.
    """
    check_int("n_max", n_max, minimum=1)
    check_int("num_classes", num_classes, minimum=1)
    if isinstance(imbalance, bool) or not isinstance(imbalance, int | float | np.number):
        raise TypeError(f"imbalance must be a number, got {type(imbalance).__name__}")
    if not imbalance >= 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    if round(n_max / imbalance) < 1:
        raise ValueError(f"n_max={n_max} / imbalance={imbalance} leaves the smallest class empty")
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    mu = float(imbalance) ** (-1.0 / (num_classes - 1))
    return np.round(n_max * mu ** np.arange(num_classes)).astype(np.int64)


def long_tail(
    labels, imbalance: float, *, num_classes: int | None = None, n_max: int | None = None, seed: int = 0
) -> LongTail:
    """Subsample ``labels`` to an exponential class profile (class 0 largest, class ``K-1`` smallest).

    Args:
        labels: integer labels ``(n,)``.
        imbalance: largest / smallest class size, ``>= 1``.
        num_classes: ``K`` (default: ``None``, inferred as ``max(labels) + 1``).
        n_max: size of the largest class (default: ``None``, the smallest available class size).
        seed: seed of which samples are kept (default: ``0``).

    Raises:
        ValueError: on a bad ``imbalance`` or if a class has fewer samples than its target count.
    """
    y, k = as_labels(labels, num_classes)
    available = np.bincount(y, minlength=k)
    if n_max is None:
        n_max = int(available.min())
    counts = long_tail_counts(n_max, k, imbalance)
    short = np.nonzero(available < counts)[0]
    if short.size:
        c = int(short[0])
        raise ValueError(f"class {c} has {available[c]} samples, fewer than the {counts[c]} the profile needs")
    gen = rng(seed)
    kept = [gen.choice(np.nonzero(y == c)[0], size=int(counts[c]), replace=False) for c in range(k)]
    return LongTail(np.sort(np.concatenate(kept)), counts)
