"""Named ranges for the profiler: each phase of a meta step appears as ``reweight.<phase>`` in a trace."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch.profiler import record_function

from ._compat import profiler_enabled


def phase(name: str) -> AbstractContextManager[object]:
    """``record_function("reweight." + name)`` while a profiler records, else a no-op (no dispatcher call)."""
    return record_function(f"reweight.{name}") if profiler_enabled() else nullcontext()
