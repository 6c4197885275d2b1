"""A clean meta set: ``per_class`` samples of every class, disjoint from the training indices returned."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_labels, check_int, rng

__all__ = ["MetaSplit", "meta_split"]


class MetaSplit(NamedTuple):
    """Sorted training indices and meta indices into the input labels; the two are disjoint."""

    train: np.ndarray
    meta: np.ndarray


def meta_split(labels, per_class: int, *, num_classes: int | None = None, seed: int = 0) -> MetaSplit:
    """Draw ``per_class`` samples of each class as the meta set; the rest is the training set.

    Call it on the *clean* labels before any corruption so the meta set is clean and balanced.

    Raises:
        ValueError: if ``per_class < 1`` or a class has ``per_class`` or fewer samples.
    """
    y, k = as_labels(labels, num_classes)
    check_int("per_class", per_class, minimum=1)
    available = np.bincount(y, minlength=k)
    short = np.nonzero(available <= per_class)[0]
    if short.size:
        c = int(short[0])
        raise ValueError(f"class {c} has {available[c]} samples; per_class={per_class} would leave none to train on")
    gen = rng(seed)
    meta = np.sort(np.concatenate([gen.choice(np.nonzero(y == c)[0], size=per_class, replace=False) for c in range(k)]))
    train = np.setdiff1d(np.arange(len(y)), meta)
    return MetaSplit(train, meta)
