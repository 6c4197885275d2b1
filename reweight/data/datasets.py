"""Offline datasets for the examples and benchmarks: mnist1d's procedural generator and sklearn's digits.

Both packages are optional (``pip install "reweight[examples]"``) and imported only when a loader runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ._checks import check_int

__all__ = ["Dataset", "load_mnist1d", "load_digits", "load_dataset"]


class Dataset(NamedTuple):
    """float32 inputs and int64 labels of a train / test split, and the number of classes."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{package} is needed: pip install 'reweight[examples]' (or pip install {package})") from err


def load_mnist1d(num_samples: int = 5000, *, seed: int = 42) -> Dataset:
    """MNIST-1D generated offline (``mnist1d.data.make_dataset``): 80% train, 20% test, 40-long signals.

    ``x_*`` has shape ``(n, 1, 40)`` (one channel for a 1-D CNN).
    """
    check_int("num_samples", num_samples, minimum=20)
    data = _require("mnist1d.data", "mnist1d")
    args = data.get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    d = data.make_dataset(args)
    f = lambda a: np.asarray(a, dtype=np.float32)[:, None, :]  # noqa: E731
    return Dataset(f(d["x"]), np.asarray(d["y"], np.int64), f(d["x_test"]), np.asarray(d["y_test"], np.int64), 10)


def load_digits(*, test_size: int = 497, seed: int = 0) -> Dataset:
    """sklearn's 8x8 digits (1797 images, bundled with scikit-learn), inputs in ``[0, 1]``, shape ``(n, 64)``."""
    check_int("test_size", test_size, minimum=1)
    sk = _require("sklearn.datasets", "scikit-learn")
    d = sk.load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    if test_size >= len(y):
        raise ValueError(f"test_size must be < {len(y)}, got {test_size}")
    perm = np.random.default_rng(seed).permutation(len(y))
    te, tr = perm[:test_size], perm[test_size:]
    return Dataset(x[tr], y[tr], x[te], y[te], 10)


def load_dataset(name: str, **kwargs) -> Dataset:
    """``"mnist1d"`` or ``"digits"``."""
    loaders: dict[str, Callable[..., Dataset]] = {"mnist1d": load_mnist1d, "digits": load_digits}
    if name not in loaders:
        raise ValueError(f"dataset must be one of {sorted(loaders)}, got {name!r}")
    return loaders[name](**kwargs)
