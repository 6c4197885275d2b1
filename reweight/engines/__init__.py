"""Meta-gradient engines, registered by name.

``forward`` (exact, one JVP), ``ghost`` (exact, per-layer inner products from activations and output
gradients, for models whose samples do not interact; ``ghost_lean`` the same with less memory),
``reverse`` (the reference create_graph look-ahead), ``finite_difference`` (approximate, two no-grad
forwards), ``higher`` (optional extra), ``linear_head`` (closed form for ``lookahead="head"``).
Importing this package imports no optional dependency.
"""

from . import finite_difference as _finite_difference  # noqa: F401  (each import registers an engine)
from . import forward as _forward  # noqa: F401
from . import ghost as _ghost  # noqa: F401
from . import ghost_lean as _ghost_lean  # noqa: F401
from . import higher as _higher  # noqa: F401
from . import linear_head as _linear_head  # noqa: F401
from . import reverse as _reverse  # noqa: F401
from .base import (
    Engine,
    MetaGradient,
    MetaProblem,
    get_engine,
    list_engines,
    register_engine,
)

__all__ = ["Engine", "MetaGradient", "MetaProblem", "get_engine", "list_engines", "register_engine"]
