"""Which engine computes a reweighter's meta-gradient, and why: ``engine="auto"``'s choice and its fallbacks.

The choice reads only what each engine declared when registered (:class:`~reweight.engines.base.EngineSpec`):
whether it splits over data-parallel ranks, whether it is exact for the model, whether it needs
``lookahead="head"``, and its rank among ``auto``'s engines. Falling back from one engine to the next is
decided here and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

from torch import Tensor, nn

from .base import EngineSpec, engine_specs, get_engine_spec

__all__ = ["EngineSelection", "check_engine", "select_engine"]

logger = logging.getLogger("reweight")


@dataclass(frozen=True)
class EngineSelection:
    """The engine in use, the ones ``auto`` would fall back to, and the reason for the choice.

    Attributes:
        requested: ``"auto"`` or the engine name the caller gave.
        name: the engine in use.
        candidates: ``auto``'s order from ``name`` on (only ``name`` when the caller named an engine).
        reason: one sentence saying why ``name`` runs (and which module kept a faster engine out).
    """

    requested: str
    name: str
    candidates: tuple[str, ...]
    reason: str

    @property
    def spec(self) -> EngineSpec:
        """What the engine in use declared."""
        return get_engine_spec(self.name)

    def fallback(self, error: NotImplementedError) -> EngineSelection | None:
        """The next of ``auto``'s engines after ``error`` from the one in use; ``None`` when there is none."""
        if self.requested != "auto" or self.candidates.index(self.name) + 1 >= len(self.candidates):
            return None
        following = self.candidates[self.candidates.index(self.name) + 1]
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        reason = f"auto fell back from {self.name!r} to {following!r}: {why}"
        return replace(self, name=following, reason=reason)

    def restored(self, name: str) -> EngineSelection:
        """The selection after a saved state named ``name`` as the engine in use."""
        order = self.candidates[self.candidates.index(name) :] if name in self.candidates else (name,)
        return replace(self, name=name, candidates=order, reason=f"{name!r} was restored from a saved state")


SHARDED_ALTERNATIVE = (
    "train with DistributedDataParallel (exact under reweighting), or use an engine that supports FSDP2; "
    "see docs/distributed.md"
)


def _sharded_refusal(detail: str) -> ValueError:
    return ValueError(
        f"the model's parameters are DTensor shards of FSDP2's fully_shard, and {detail}; {SHARDED_ALTERNATIVE}"
    )


def check_engine(name: str, *, world_size: int, head_mode: bool, sharded: bool = False) -> EngineSpec:
    """The spec of ``name`` if it can run here; otherwise the error that names the alternative.

    Raises:
        ValueError: an engine that cannot split over ``world_size > 1`` data-parallel ranks, a head-only
            engine without ``lookahead="head"``, or an engine that does not declare ``sharded`` on an FSDP2
            model.
        ImportError: an engine whose optional dependency is missing.
    """
    spec = get_engine_spec(name)
    if sharded and not spec.sharded:
        supported = [s.name for s in engine_specs() if s.sharded]
        raise _sharded_refusal(f"engine {name!r} does not support them (engines that do: {supported})")
    if world_size > 1 and not spec.data_parallel:
        raise ValueError(
            f"engine {name!r} does not support data-parallel training (world size {world_size}); "
            "use engine='auto', 'ghost' or 'forward'"
        )
    if spec.needs_head and not head_mode:
        raise ValueError(f"engine={name!r} needs lookahead='head'")
    if spec.requires is not None:
        spec.requires()
    return spec


def _auto_order(head_mode: bool, world_size: int, sharded: bool = False) -> list[EngineSpec]:
    specs = [
        s
        for s in engine_specs()
        if s.auto is not None
        and (head_mode or not s.needs_head)
        and (world_size == 1 or s.data_parallel)
        and (s.sharded or not sharded)
    ]
    return sorted(specs, key=lambda s: (not s.needs_head, s.auto, s.name))  # head-only engines first


def select_engine(
    requested: str,
    model: nn.Module,
    params: Mapping[str, Tensor],
    *,
    world_size: int = 1,
    head_mode: bool = False,
    sharded: bool = False,
) -> EngineSelection:
    """The engine for ``model`` with look-ahead parameters ``params`` (``requested`` may be ``"auto"``).

    ``auto`` takes, in the order of their declared rank, the engines that split over ``world_size`` ranks
    and whose exactness check finds no problem with the model (head-only engines first with
    ``lookahead="head"``); the rest of that order is its fallback. The choice is logged once at INFO on the
    ``"reweight"`` logger. With ``sharded`` (an FSDP2 model) only engines that declare ``sharded`` qualify.

    Raises:
        ValueError, ImportError: as :func:`check_engine` for a named engine; ``ValueError`` when no engine
            can run a sharded model exactly (naming why and the alternative).
    """
    if requested != "auto":
        check_engine(requested, world_size=world_size, head_mode=head_mode, sharded=sharded)
        return EngineSelection(requested, requested, (requested,), f"engine={requested!r} was given")
    usable: list[str] = []
    passed_over: list[str] = []
    for spec in _auto_order(head_mode, world_size, sharded):
        problem = spec.exactness(model, params) if spec.exactness is not None else None
        if problem is not None:
            passed_over.append(f"{spec.name!r} is not exact for this model: {problem}")
        else:
            usable.append(spec.name)
    if not usable and sharded:
        why = "; ".join(passed_over) or "no engine that supports them applies (lookahead='head' has none)"
        raise _sharded_refusal(f"no engine can compute their meta-gradient exactly here ({why})")
    if not usable:  # pragma: no cover - forward declares no exactness check
        raise ValueError("no registered engine can run this model: " + "; ".join(passed_over))
    chosen = get_engine_spec(usable[0])
    reason = f"auto chose {chosen.name!r}"
    reason += " (" + "; ".join(passed_over) + ")" if passed_over else f": {chosen.description or 'first in order'}"
    logger.info("reweight: %s", reason)
    return EngineSelection("auto", usable[0], tuple(usable), reason)
