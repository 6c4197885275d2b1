"""The published tables are the output of the result tables: every ``<!-- table:NAME -->`` block of the docs
and the README equals what ``benchmarks/render_docs.py`` renders from ``benchmarks/results/*.jsonl``."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("_render_docs", ROOT / "benchmarks" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def renderers(render):
    cache = {}

    def once(name, fn):  # each table rendered once for all pages
        return lambda: cache[name] if name in cache else cache.setdefault(name, fn())

    return {name: once(name, fn) for name, fn in render.renderers().items()}


@pytest.mark.parametrize("page", ["docs/results.md", "docs/benchmarks.md", "README.md"])
def test_page_matches_its_rendering(render, renderers, page):
    text = (ROOT / page).read_text()
    names = [m.group(2) for m in render.BLOCK.finditer(text)]
    assert len(names) == len(set(names)) and text.count("<!-- table:") == len(names), "unbalanced markers"
    rendered = render.render_page(text, renderers)
    stale = [
        m.group(2)
        for m, n in zip(render.BLOCK.finditer(text), render.BLOCK.finditer(rendered))
        if m.group(3) != n.group(3)
    ]
    assert not stale, f"{page}: tables differ from the results (run python benchmarks/render_docs.py): {stale}"


def test_a_changed_figure_is_caught(render, renderers):
    text = (ROOT / "docs/results.md").read_text()
    assert "<!-- table:guide -->" in text
    edited = text.replace("| mnist1d | flip1-20 |", "| mnist1d | flip1-20 | 99.9 |", 1)
    assert render.render_page(edited, renderers) == text
    assert edited != text


def test_an_unknown_table_is_an_error(render):
    with pytest.raises(KeyError, match="no renderer"):
        render.render_page("<!-- table:nope -->\nx\n<!-- /table:nope -->", {})
