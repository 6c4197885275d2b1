"""Non-finite losses and meta-gradients: raise, or skip the meta update, with one host sync per step."""

from __future__ import annotations

from torch import Tensor

from .distributed import DataParallelGroup

__all__ = ["NonFiniteLossError", "finite_or_skip", "joint_check"]


class NonFiniteLossError(FloatingPointError):
    """A per-sample loss, the meta loss or the meta-gradient was NaN or infinite."""


def finite_or_skip(ok: bool, what: str, on_nonfinite: str) -> bool:
    """``ok``; or, when not, ``False`` with ``on_nonfinite="skip"`` and :class:`NonFiniteLossError` naming
    ``what`` with ``"raise"``."""
    if ok:
        return True
    if on_nonfinite == "raise":
        raise NonFiniteLossError(
            f"{what} is not finite (NaN or inf); pass on_nonfinite='skip' to skip such meta updates"
        )
    return False


def joint_check(flag: Tensor, what: str, pending: Tensor | None, group: DataParallelGroup, on_nonfinite: str) -> bool:
    """``flag`` (all finite, over every rank) and the training losses' deferred flag ``pending``, in one host
    sync; the error names the training loss when ``pending`` is the one that failed."""
    if pending is None:
        return finite_or_skip(group.all_(flag), what, on_nonfinite)
    if group.all_(flag & pending):
        return True
    return finite_or_skip(False, what if bool(pending) else "a per-sample training loss", on_nonfinite)
