"""Meta-gradient engines, registered by name: ``reverse`` (reference) and ``forward`` (exact, fastest)."""

from . import forward as _forward  # noqa: F401  (registers "forward")
from . import reverse as _reverse  # noqa: F401  (registers "reverse")
from .base import (
    Engine,
    MetaGradient,
    MetaProblem,
    get_engine,
    list_engines,
    register_engine,
)

__all__ = ["Engine", "MetaGradient", "MetaProblem", "get_engine", "list_engines", "register_engine"]
