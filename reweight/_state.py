"""The format of :meth:`MetaReweighter.state_dict`: its version, the upgrade path and field checks.

Every check here only reads: :meth:`MetaReweighter.load_state_dict` runs all of them before it changes
anything, so that a state it refuses leaves the reweighter exactly as it was.

A change of the format bumps :data:`STATE_VERSION` and registers, in :data:`UPGRADES`, the function that
turns a state of the previous version into one of the new version; older checkpoints are then brought
forward one version at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = [
    "STATE_VERSION",
    "STATE_KEYS",
    "UPGRADES",
    "upgrade_state",
    "check_count",
    "check_tensor_shapes",
    "check_optimizer_state",
    "check_rng_state",
]

#: Version written by :meth:`MetaReweighter.state_dict`.
STATE_VERSION = 4

#: Keys of a current-version state.
STATE_KEYS = frozenset(
    {"version", "step", "num_classes", "engine", "net", "meta_optimizer", "rng", "meta_stream", "loss_history",
     "noise_evidence", "meta_competence"}
)


def _add_loss_history(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had no loss history (``loss_history=True`` came with version 2)."""
    return {**state, "loss_history": None}


def _add_noise_evidence(state: dict[str, Any]) -> dict[str, Any]:
    """Version 2 had no evidence of label noise (``veto_evidence`` came with version 3): its veto acted from the
    first update, so a resumed run's veto keeps acting."""
    return {**state, "noise_evidence": {"level": None, "shown": True}}


def _add_meta_competence(state: dict[str, Any]) -> dict[str, Any]:
    """Version 3 had no competence on the meta set (``veto_competence`` came with version 4): its veto did not wait
    for it, so a resumed run's veto does not either."""
    return {**state, "meta_competence": {"level": None, "shown": True}}


#: ``UPGRADES[v]`` maps a version-``v`` state to a version-``v + 1`` one (a new dict; the input is not modified).
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _add_loss_history, 2: _add_noise_evidence, 3: _add_meta_competence
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def upgrade_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` in the current format: each registered upgrade applied in turn from its own version.

    Raises:
        TypeError: if ``state`` is not a mapping.
        ValueError: if the version is missing, not an int, newer than :data:`STATE_VERSION`, or has no
            upgrade path; or if the (upgraded) state lacks a key.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    version = state.get("version")
    if not _is_int(version):
        raise ValueError(f"reweighter state needs an int 'version', got {version!r}")
    assert isinstance(version, int)
    if version > STATE_VERSION:
        raise ValueError(f"reweighter state version {version} is newer than supported ({STATE_VERSION})")
    upgraded = dict(state)
    while version < STATE_VERSION:
        if version not in UPGRADES:
            raise ValueError(f"reweighter state version {version} is too old: no upgrade to version {version + 1}")
        upgraded = dict(UPGRADES[version](upgraded))
        version += 1
        upgraded["version"] = version
    missing = STATE_KEYS - set(upgraded)
    if missing:
        raise ValueError(f"reweighter state is missing keys: {sorted(missing)}")
    return upgraded


def check_count(name: str, value: Any, *, minimum: int = 0, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= minimum`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:
        raise ValueError(f"reweighter state: {name} must be an int >= {minimum}, got {value!r}")


def _layout(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in state.items()}


def check_tensor_shapes(what: str, saved: Any, expected: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``saved`` has ``expected``'s keys, with tensors of the same shapes (and
    non-tensor entries, such as a module's extra state, of the same types)."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"reweighter state: {what} must be a dict of tensors, got {type(saved).__name__}")
    got, want = _layout(saved), _layout(expected)
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError(
            f"the saved {what} does not match this reweighter's (keys or shapes differ: {diff[:5]}); "
            "was it saved with another net, net_kwargs or number of classes?"
        )


def check_optimizer_state(saved: Any, group_sizes: list[int] | None, num_params: int) -> None:
    """Raise ``ValueError`` unless ``saved`` is a ``torch.optim.Optimizer.state_dict()`` for ``num_params``
    parameters, in groups of ``group_sizes`` when known; ``{}`` when ``num_params`` is 0 (no net)."""
    if num_params == 0:
        if saved != {}:
            raise ValueError("reweighter state: meta_optimizer must be {} for a reweighter without a weighting net")
        return
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if (
        not isinstance(saved, Mapping)
        or not isinstance(saved.get("state"), Mapping)
        or not isinstance(groups, list)
        or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise ValueError("reweighter state: meta_optimizer must be an optimizer state_dict ('state', 'param_groups')")
    sizes = [len(g["params"]) for g in groups]
    if (group_sizes is not None and sizes != group_sizes) or sum(sizes) != num_params:
        expected = group_sizes if group_sizes is not None else f"{num_params} parameters in all"
        raise ValueError(f"reweighter state: the meta optimizer's groups hold {sizes} parameters, expected {expected}")


def check_rng_state(saved: Any, current: Tensor) -> None:
    """Raise ``ValueError`` unless ``saved`` is a generator state of ``current``'s dtype and shape."""
    if not isinstance(saved, Tensor) or saved.dtype != current.dtype or saved.shape != current.shape:
        got = f"{saved.dtype} of shape {tuple(saved.shape)}" if isinstance(saved, Tensor) else type(saved).__name__
        raise ValueError(
            f"reweighter state: rng must be a torch.Generator state ({current.dtype} of shape "
            f"{tuple(current.shape)}), got {got}"
        )
