"""Seeded simulators of biased training data (paper §5.1) and offline dataset loaders.

Label noise (:func:`uniform_noise`, :func:`flip1_noise`, :func:`flip2_noise`) returns the noisy labels,
a mask of the corrupted samples and the class transition matrix; :func:`long_tail` subsamples to an
exponential class profile; :func:`meta_split` draws a clean, class-balanced meta set. Everything is pure
numpy; the dataset loaders import ``mnist1d`` / ``scikit-learn`` only when called. :class:`WithIndex` gives each
sample its index, the ``sample_ids`` of ``MetaReweighter(..., loss_history=True)``.

Example:
    >>> import numpy as np
    >>> from reweight.data import flip1_noise
    >>> y = np.repeat(np.arange(10), 100)
    >>> noisy = flip1_noise(y, 0.4, num_classes=10, seed=0)
    >>> noisy.labels.shape, noisy.corrupted.dtype
    ((1000,), dtype('bool'))
"""

from .datasets import Dataset, load_dataset, load_digits, load_mnist1d
from .indexed import WithIndex
from .long_tail import LongTail, long_tail, long_tail_counts
from .noise import (
    NoisyLabels,
    apply_transition,
    flip1_noise,
    flip1_transition,
    flip2_noise,
    flip2_transition,
    uniform_noise,
    uniform_transition,
)
from .split import MetaSplit, meta_split

__all__ = [
    "NoisyLabels",
    "apply_transition",
    "uniform_transition",
    "flip1_transition",
    "flip2_transition",
    "uniform_noise",
    "flip1_noise",
    "flip2_noise",
    "LongTail",
    "long_tail",
    "long_tail_counts",
    "MetaSplit",
    "meta_split",
    "Dataset",
    "load_dataset",
    "load_mnist1d",
    "load_digits",
    "WithIndex",
]
