"""Named bundles of :class:`~reweight.MetaReweighter` options: ``preset="exact"`` and ``preset="fast"``.

A preset fills in the options the caller did not give; an argument given explicitly always wins. The
``"exact"`` bundle holds the library defaults, so every other preset is read as a set of changes to it.

Example:
    >>> from reweight.presets import PRESETS, resolve_preset
    >>> sorted(PRESETS)
    ['exact', 'fast']
    >>> resolve_preset("fast", {"interval": 2})["interval"]
    2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "FROM_PRESET", "DefaultMetaOptimizer", "resolve_preset"]


class _FromPreset:
    """Default of an option whose value comes from the ``preset`` argument."""

    def __repr__(self) -> str:
        return "<from preset>"

    def __reduce__(self) -> str:
        return "FROM_PRESET"


#: Sentinel default of the options a preset may set (typed ``Any`` so that it fits every annotation).
FROM_PRESET: Any = _FromPreset()


@dataclass(frozen=True)
class DefaultMetaOptimizer:
    """The net's own default meta optimizer with its lr times ``lr_scale``: AdamW (lr 1e-3, weight decay 5e-4) for
    the per-sample nets, SGD (lr 1e-3) for the group net alone (:mod:`reweight.options`)."""

    lr_scale: float = 1.0


PRESETS: dict[str, dict[str, Any]] = {
    # Algorithm 1 as written: a meta update on every step with the exact meta-gradient over all parameters.
    "exact": {
        "interval": 1,
        "engine": "auto",
        "lookahead": "full",
        "normalization": None,
        "virtual_step": "sgd",
        "lookahead_lr": None,
        "meta_optimizer": None,
    },
    # The exact meta-gradient every sixth step, with the net's meta lr six times larger so that it moves as far
    # per epoch as with interval 1 (AdamW lr 6e-3 for the per-sample nets); chosen on the meta set among the
    # intervals that cost at most 1.6x a plain step (docs/results.md, "Cost against accuracy").
    "fast": {"interval": 6, "meta_optimizer": DefaultMetaOptimizer(lr_scale=6.0)},
}


def resolve_preset(preset: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``preset`` overridden by ``given`` (entries equal to :data:`FROM_PRESET` are ignored).

    Raises:
        ValueError: if ``preset`` is not a registered name (the message lists them).
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}; got {preset!r}")
    options = {**PRESETS["exact"], **PRESETS[preset]}
    options.update({k: v for k, v in given.items() if v is not FROM_PRESET})
    return options
