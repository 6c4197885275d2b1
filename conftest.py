"""Root pytest configuration: the doctests of ``reweight/`` (collected with ``--doctest-modules``, see setup.cfg).

An integration module imports its framework at import time; without that framework installed its doctests are
skipped (not collected) instead of failing collection.
"""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_FRAMEWORKS = {"transformers": "transformers", "timm": "timm", "lightning": "lightning"}

collect_ignore = [
    f"reweight/integrations/{name}.py"
    for name, module in _FRAMEWORKS.items()
    if importlib.util.find_spec(module) is None
]
