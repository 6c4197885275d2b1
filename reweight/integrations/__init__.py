"""Trainer integrations; each submodule imports its framework, this package imports none.

* :mod:`reweight.integrations.transformers`: ``ReweightTrainer``, a Hugging Face ``Trainer`` whose
  ``compute_loss`` runs the meta step (``pip install "reweight[transformers]"``).
* :mod:`reweight.integrations.timm`: ``ReweightClassificationTask`` for timm's ``train.py``
  (``pip install "reweight[timm]"``).
* :mod:`reweight.integrations.lightning`: ``MetaReweightCallback`` for a ``LightningModule`` with automatic
  optimisation (``pip install "reweight[lightning]"``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or fail with the ``pip install`` command of the extra that provides it.

    Args:
        module: the framework's import name, e.g. ``"transformers"``.
        extra: the name of reweight's extra, e.g. ``"transformers"``.

    Raises:
        ImportError: if ``module`` is not installed; the message names ``pip install "reweight[extra]"``.

    Example:
        >>> require("torch", "core").__name__
        'torch'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"reweight.integrations.{extra} needs {module!r}, which is not installed; "
            f'install it with: pip install "reweight[{extra}]"'
        ) from err
