"""What the three integrations share: building the reweighter when the trainer is ready, and weight statistics.

Trainers create the optimizer (and wrap the model) after the integration object exists, and restore a
checkpoint either before or after that point. :class:`LateReweighter` builds the
:class:`~reweight.MetaReweighter` once both exist, applies state loaded earlier, and rebuilds (carrying the
state over, removing the old forward hooks) when the trainer hands over a new optimizer or wrapper.
Integrations build it before the first training forward, so that ``lookahead="head"``'s hook on the final
Linear layer sees the very first batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._batch import unwrap_model
from ..monitor import ShortRunWarning, weight_statistics
from ..nets import named_net_reads
from ..reweighter import MetaReweighter

__all__ = [
    "LateReweighter", "WeightStats", "needs_class_logits", "reads_groups", "describe_net", "group_stats",
    "warn_if_short",
]


def needs_class_logits(net: str | nn.Module, net_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether the weighting net ``net`` (a name with its ``net_kwargs``, or a module) reads class logits
    ``(batch, num_classes)``.

    Example:
        >>> needs_class_logits("metainfonet"), needs_class_logits("lossnet"), needs_class_logits("groups")
        (True, False, False)
    """
    if isinstance(net, str):
        return named_net_reads(net, net_kwargs, "logits")
    return bool(getattr(net, "requires_logits", False))


def reads_groups(net: str | nn.Module) -> bool:
    """Whether the weighting net reads group ids (``step(..., groups=g)``): ``"groups"`` or ``requires_groups``."""
    if isinstance(net, str):
        return named_net_reads(net, None, "groups")
    return bool(getattr(net, "requires_groups", False))


def group_stats(reweighter: MetaReweighter | None) -> dict[str, Tensor]:
    """``{"group_weight/<name>": weight}`` of a net with group weights, on the device (empty otherwise)."""
    weights = None if reweighter is None else reweighter.group_weights
    if reweighter is None or weights is None:
        return {}
    names = [str(n) for n in getattr(reweighter.net, "group_names", None) or range(weights.shape[0])]
    return {f"group_weight/{n}": w for n, w in zip(names, weights.float(), strict=True)}


def describe_net(net: str | nn.Module) -> str:
    """``'name'`` for a named net, the class name for a module."""
    return repr(net) if isinstance(net, str) else type(net).__name__


def _data_parallel_wrapped(model: nn.Module) -> bool:
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            return True
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner


def _same_target(old: nn.Module, new: nn.Module) -> bool:
    return old is new or (
        unwrap_model(old) is unwrap_model(new) and _data_parallel_wrapped(old) == _data_parallel_wrapped(new)
    )


class LateReweighter:
    """A :class:`~reweight.MetaReweighter` built once the trainer has a model and an optimizer.

    Args:
        meta_loader: the clean meta batches (or ``None`` until :meth:`build` is given them).
        **reweight_kwargs: keyword arguments of :class:`~reweight.MetaReweighter`.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> late = LateReweighter([(torch.randn(6, 4), torch.randint(0, 3, (6,)))], seed=0)
        >>> late.reweighter is None
        True
        >>> late.build(model, torch.optim.SGD(model.parameters(), lr=0.1)).step_count
        0
    """

    def __init__(self, meta_loader: Iterable[Any] | None = None, **reweight_kwargs: Any) -> None:
        self.meta_loader = meta_loader
        self.reweight_kwargs = reweight_kwargs
        self.reweighter: MetaReweighter | None = None
        self._pending: dict[str, Any] | None = None

    def build(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, meta_loader: Iterable[Any] | None = None
    ) -> MetaReweighter:
        """The reweighter on ``model`` and ``optimizer``: the current one if it already uses both, else a new one.

        A ``torch.compile`` wrapper around the same module counts as the same model (the look-ahead runs on the
        bare module, and the head hook registered before compilation stays in the compiled forward); a new
        ``DistributedDataParallel`` wrapper does not (it brings the data-parallel group).

        A new reweighter receives the pending state (from :meth:`load_state_dict`) or its predecessor's
        state; the predecessor's forward hooks are removed. If building fails, the state stays pending.
        """
        current = self.reweighter
        if current is not None and current.optimizer is optimizer and _same_target(current.model, model):
            return current
        if current is not None:
            self._pending = current.state_dict()
            current.remove_hooks()
            self.reweighter = None
        if meta_loader is not None:
            self.meta_loader = meta_loader
        if self.meta_loader is None:
            raise RuntimeError("LateReweighter.build needs a meta_loader")
        reweighter = MetaReweighter(model, optimizer, self.meta_loader, **self.reweight_kwargs)
        if self._pending is not None:
            try:
                reweighter.load_state_dict(self._pending)
            except BaseException:
                reweighter.remove_hooks()
                raise
            self._pending = None
        self.reweighter = reweighter
        return reweighter

    def release(self) -> None:
        """Drop the reweighter (removing its hooks), keeping its state for the next :meth:`build`."""
        if self.reweighter is not None:
            self._pending = self.reweighter.state_dict()
            self.reweighter.remove_hooks()
            self.reweighter = None

    def state_dict(self) -> dict[str, Any] | None:
        """The reweighter's state, the pending state before it is built, or ``None``."""
        return self.reweighter.state_dict() if self.reweighter is not None else self._pending

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the reweighter now, or at its :meth:`build`."""
        if self.reweighter is not None:
            self.reweighter.load_state_dict(state)
        else:
            self._pending = state


class WeightStats:
    """Running means of the weights' statistics (:func:`reweight.monitor.weight_statistics`: std, min, max,
    effective sample size) and the meta loss (and of each group's weight, for a net with group weights), kept on
    the device (no host sync per step).

    Example:
        >>> stats = WeightStats()
        >>> stats.update(torch.tensor([0.5, 1.5]))
        >>> {k: round(v, 3) for k, v in stats.pop().items()}
        {'weight_std': 0.5, 'weight_min': 0.5, 'weight_max': 1.5, 'weight_ess': 0.8}
    """

    _KEYS = ("weight_std", "weight_min", "weight_max", "weight_ess")

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0
        self._meta_count = 0
        self._groups: dict[str, Tensor] = {}

    def update(self, weights: Tensor, meta_loss: Tensor | None = None, groups: dict[str, Tensor] | None = None) -> None:
        """Add one batch's ``weights`` (shape ``(batch,)``), the meta loss of its update, if one ran, and the
        current group weights ``{"group_weight/<name>": scalar}`` (:func:`group_stats`), if any."""
        for key, value in (groups or {}).items():
            self._groups[key] = self._groups[key] + value.detach() if key in self._groups else value.detach()
        stats = weight_statistics(weights)
        has_meta = meta_loss is not None
        device = stats["weight_std"].device
        loss = meta_loss.detach().float().to(device) if meta_loss is not None else torch.zeros((), device=device)
        row = torch.stack([*(stats[k] for k in self._KEYS), loss])
        self._sum = row if self._sum is None else self._sum + row
        self._count += 1
        self._meta_count += int(has_meta)

    def pop(self) -> dict[str, float]:
        """The means since the last call (one host sync), then reset; empty if nothing was recorded."""
        if self._sum is None:
            return {}
        group_keys = list(self._groups)
        row = torch.cat([self._sum, *(v.to(self._sum.device).reshape(1) for v in self._groups.values())])
        values = (row / self._count).tolist()
        out = dict(zip(self._KEYS, values))
        if self._meta_count:
            out["meta_loss"] = values[len(self._KEYS)] * self._count / self._meta_count
        out.update(zip(group_keys, values[len(self._KEYS) + 1 :], strict=True))
        self._sum, self._count, self._meta_count, self._groups = None, 0, 0, {}
        return out


def warn_if_short(reweighter: MetaReweighter, calls: float) -> None:
    """Warn (:class:`~reweight.monitor.ShortRunWarning`) when a run of ``calls`` reweighter steps ends before the
    weighting net's meta lr has warmed up while the veto acts (``veto_warmup`` below ``meta_warmup``): the weights
    are then the veto's alone, read off a model that has learned little, which left a 96-step run below plain
    training (docs/results.md, "The veto waits for the net"). By default the veto waits for the net: no warning."""
    options = reweighter.options
    if not options.vetoes or options.veto_warmup >= options.meta_warmup:  # no veto, or it waits for the net
        return
    if not math.isfinite(calls) or calls >= options.meta_warmup:
        return
    warnings.warn(
        f"the run has {int(calls)} reweighter steps, fewer than the weighting net's warm-up (meta_warmup="
        f"{options.meta_warmup}): the meta-gradient's veto will act before the net has learned from the meta set, "
        "which in a measured short run left the model below plain training. Leave veto_warmup at its default (None: "
        "the veto held off while the net warms up), train longer, or pass veto=math.inf (docs/results.md, 'The "
        "veto waits for the net')",
        ShortRunWarning,
        stacklevel=3,
    )
