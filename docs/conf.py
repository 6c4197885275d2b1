"""Sphinx configuration of the reweight documentation.

Build (offline, warnings as errors) from the repository root::

    pip install -e ".[docs]"
    sphinx-build -W -b html docs docs/_build/html

The trainer frameworks are mocked (``autodoc_mock_imports``), so the build needs none of them.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the checkout even without `pip install -e .`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import reweight  # noqa: E402

project = "reweight"
author = "reweight developers"
copyright = "2026, reweight developers"
release = reweight.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# autodoc: imports each module; the integrations' frameworks are stand-ins, so the build needs none of them
autodoc_mock_imports = ["transformers", "accelerate", "timm", "lightning", "pytorch_lightning"]
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autoclass_content = "class"

# napoleon: the docstrings are Google style
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# MyST: the existing Markdown pages (docs/*.md)
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"reweight {release}"


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented by the class's ``Attributes:`` section, not as bare ``Alias for field``."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def _signature_of_own_init(app, what, name, obj, options, signature, return_annotation):
    """A class on a mocked framework base shows the mock's ``(*args, **kwargs)``: show the ``__init__`` of the
    first class of this package in its MRO that defines one (its own, or a mixin's)."""
    if what != "class" or signature != "(*args, **kwargs)":
        return None
    from sphinx.util.inspect import signature as sphinx_signature
    from sphinx.util.inspect import stringify_signature

    for cls in obj.__mro__:
        if "__init__" in vars(cls) and cls.__module__.partition(".")[0] == "reweight":
            own = sphinx_signature(cls.__init__, bound_method=True)
            return stringify_signature(own, show_annotation=False, show_return_annotation=False), None
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-process-signature", _signature_of_own_init)
