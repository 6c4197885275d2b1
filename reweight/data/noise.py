"""Label-noise simulators of the MetaInfoNet paper, §5.1: Uniform, Flip-1 and Flip-2.

Each is a class transition matrix ``T[i, j] = P(observed j | true i)`` and one draw per sample from the
row of its true class. ``corrupted`` marks the samples whose observed label differs from the true one.

Uniform noise: the paper says "changed to a random class with probability p". By default
(``exclude_true=True``) the new class is drawn among the *other* K-1 classes, so the realised flip rate is
``p``; ``exclude_true=False`` draws among all K classes as the Meta-Weight-Net reference code does, and
the realised flip rate is then ``p (K-1) / K``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_labels, check_int, check_rate, rng

__all__ = [
    "NoisyLabels",
    "apply_transition",
    "uniform_transition",
    "flip1_transition",
    "flip2_transition",
    "uniform_noise",
    "flip1_noise",
    "flip2_noise",
]


class NoisyLabels(NamedTuple):
    """Observed labels ``(n,)``, a boolean mask of corrupted samples ``(n,)`` and the ``(K, K)`` transition."""

    labels: np.ndarray
    corrupted: np.ndarray
    transition: np.ndarray


def uniform_transition(num_classes: int, rate: float, *, exclude_true: bool = True) -> np.ndarray:
    """``T = (1-p) I + p / (K-1) (1 - I)``, or ``(1-p) I + p / K`` with ``exclude_true=False``."""
    check_int("num_classes", num_classes, minimum=2)
    rate = check_rate("rate", rate)
    k = num_classes
    if exclude_true:
        t = np.full((k, k), rate / (k - 1))
        np.fill_diagonal(t, 1.0 - rate)
    else:
        t = np.full((k, k), rate / k)
        t[np.diag_indices(k)] += 1.0 - rate
    return t


def _flip_transition(num_classes: int, rate: float, flips: int, seed: int) -> np.ndarray:
    """Each class keeps ``1-p`` and sends ``p / flips`` to each of ``flips`` distinct other classes,
    chosen at random (seeded)."""
    check_int("num_classes", num_classes, minimum=flips + 1)
    rate = check_rate("rate", rate)
    gen = rng(seed)
    t = np.eye(num_classes) * (1.0 - rate)
    for i in range(num_classes):
        others = np.delete(np.arange(num_classes), i)
        t[i, gen.choice(others, size=flips, replace=False)] += rate / flips
    return t


def flip1_transition(num_classes: int, rate: float, *, seed: int = 0) -> np.ndarray:
    """Each class keeps ``1-p`` and sends ``p`` to one other class chosen at random (seeded)."""
    return _flip_transition(num_classes, rate, 1, seed)


def flip2_transition(num_classes: int, rate: float, *, seed: int = 0) -> np.ndarray:
    """Each class keeps ``1-p`` and sends ``p/2`` to each of two distinct other classes chosen at random."""
    return _flip_transition(num_classes, rate, 2, seed)


def _flip_noise(labels, rate: float, num_classes: int | None, seed: int, flips: int) -> NoisyLabels:
    y, k = as_labels(labels, num_classes)
    seeds = rng(seed).integers(0, 2**62, size=2)
    return apply_transition(y, _flip_transition(k, rate, flips, int(seeds[0])), seed=int(seeds[1]))


def apply_transition(labels, transition: np.ndarray, *, seed: int = 0) -> NoisyLabels:
    """Draw each sample's observed label from the row ``transition[true label]``.

    Raises:
        ValueError: if ``transition`` is not a square row-stochastic matrix covering the labels.
    """
    t = np.asarray(transition, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"transition must be a square matrix, got shape {t.shape}")
    if (t < 0).any() or not np.allclose(t.sum(1), 1.0):
        raise ValueError("transition rows must be non-negative and sum to 1")
    y, k = as_labels(labels, t.shape[0])
    gen = rng(seed)
    cdf = np.cumsum(t, axis=1)
    cdf[:, -1] = 1.0
    u = gen.random(len(y))
    noisy = (u[:, None] >= cdf[y]).sum(1).astype(np.int64)
    return NoisyLabels(noisy, noisy != y, t)


def uniform_noise(
    labels, rate: float, *, num_classes: int | None = None, seed: int = 0, exclude_true: bool = True
) -> NoisyLabels:
    """Uniform noise: with probability ``rate`` a label becomes a random other class (see module doc).

    Args:
        labels: true labels, integer array-like ``(n,)``.
        rate: noise rate ``p`` in ``[0, 1)``.
        num_classes: ``K`` (default: ``None``, inferred as ``max(labels) + 1``).
        seed: seed of the draw (default: ``0``).
        exclude_true: draw the new label among the other ``K-1`` classes (default: ``True``).

    Raises:
        ValueError: if ``rate`` is outside ``[0, 1)`` or the labels do not fit ``num_classes``.
    """
    y, k = as_labels(labels, num_classes)
    return apply_transition(y, uniform_transition(k, rate, exclude_true=exclude_true), seed=seed)


def flip1_noise(labels, rate: float, *, num_classes: int | None = None, seed: int = 0) -> NoisyLabels:
    """Flip-1 noise: each class flips with probability ``rate`` to one randomly chosen other class.

    Args:
        labels: true labels, integer array-like ``(n,)``.
        rate: noise rate ``p`` in ``[0, 1)``.
        num_classes: ``K`` (default: ``None``, inferred as ``max(labels) + 1``).
        seed: seeds both the choice of the target classes and the per-sample draw (default: ``0``).

    Raises:
        ValueError: if ``rate`` is outside ``[0, 1)`` or the labels do not fit ``num_classes``.
    """
    return _flip_noise(labels, rate, num_classes, seed, flips=1)


def flip2_noise(labels, rate: float, *, num_classes: int | None = None, seed: int = 0) -> NoisyLabels:
    """Flip-2 noise: each class flips with probability ``rate / 2`` to each of two randomly chosen classes.

    Args:
        labels: true labels, integer array-like ``(n,)``.
        rate: total noise rate ``p`` in ``[0, 1)``.
        num_classes: ``K >= 3`` (default: ``None``, inferred as ``max(labels) + 1``).
        seed: seeds both the choice of the target classes and the per-sample draw (default: ``0``).

    Raises:
        ValueError: if ``rate`` is outside ``[0, 1)``, ``K < 3`` or the labels do not fit ``num_classes``.
    """
    return _flip_noise(labels, rate, num_classes, seed, flips=2)
