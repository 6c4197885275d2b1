"""Argument checks shared by the simulators."""

from __future__ import annotations

import numpy as np


def as_labels(labels, num_classes: int | None) -> tuple[np.ndarray, int]:
    """``labels`` as a 1-D int64 array and the number of classes (inferred as ``max + 1`` when ``None``)."""
    if hasattr(labels, "detach"):  # a torch tensor, without importing torch here
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels must be >= 0, got {arr.min()}")
    if num_classes is None:
        num_classes = int(arr.max()) + 1 if arr.size else 0
    check_int("num_classes", num_classes, minimum=1)
    if arr.size and arr.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got {arr.max()}")
    return arr, num_classes


def check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def rng(seed) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))
