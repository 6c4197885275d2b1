"""The published tables and figures are the output of the result tables: every ``<!-- table:NAME -->`` block and
every ``<!-- fig:... -->`` figure of the docs and the README equals what ``benchmarks/render_docs.py`` renders
from ``benchmarks/results/*.jsonl``."""

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


@pytest.fixture(scope="module")
def kinds(render):
    return render.figures()


@pytest.mark.parametrize("page", ["docs/results.md", "docs/benchmarks.md", "README.md"])
def test_page_matches_its_rendering(render, renderers, kinds, page):
    text = (ROOT / page).read_text()
    names = [m.group(2) for m in render.BLOCK.finditer(text)]
    assert len(names) == len(set(names)) and text.count("<!-- table:") == len(names), "unbalanced markers"
    rendered = render.render_page(text, renderers, kinds)
    stale = [
        m.group(2)
        for m, n in zip(render.BLOCK.finditer(text), render.BLOCK.finditer(rendered))
        if m.group(3) != n.group(3)
    ]
    assert not stale, f"{page}: tables differ from the results (run python benchmarks/render_docs.py): {stale}"
    pairs = zip(render.FIG.finditer(text), render.FIG.finditer(rendered))
    stale = [f"{m.group(1)}{m.group(4)} (now {n.group(4)})" for m, n in pairs if m.group(4) != n.group(4)]
    assert not stale, f"{page}: figures differ from the results (run python benchmarks/render_docs.py): {stale}"


def test_a_changed_figure_is_caught(render, renderers, kinds):
    text = (ROOT / "docs/results.md").read_text()
    assert "<!-- table:guide -->" in text
    edited = text.replace("| mnist1d | flip1-20 |", "| mnist1d | flip1-20 | 99.9 |", 1)
    assert render.render_page(edited, renderers, kinds) == text
    assert edited != text


def test_an_unknown_table_is_an_error(render):
    with pytest.raises(KeyError, match="no renderer"):
        render.render_page("<!-- table:nope -->\nx\n<!-- /table:nope -->", {})


def _tiny_table(path, bests):
    """A synthetic accuracy table: Standard on one cell, one row per seed."""
    import json

    rows = [
        {
            "key": {"dataset": "mnist1d", "setting": "flip1-40", "method": "standard", "seed": seed,
                    "net_kwargs": None, "schedule": "gentle", "variant": "default", "model": "plain"},
            "result": {"best": best, "last": best},
        }
        for seed, best in enumerate(bests)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_figure_renders_from_the_results(render, tmp_path):
    kinds = render.figures(_tiny_table(tmp_path / "accuracy.jsonl", [0.5, 0.6, 0.7]))
    text = "Standard: <!-- fig:acc mnist1d flip1-40 standard seeds=0-2 -->?<!-- /fig -->, so."
    out = render.render_page(text, {}, kinds)
    assert out == "Standard: <!-- fig:acc mnist1d flip1-40 standard seeds=0-2 -->60.0 ± 10.0<!-- /fig -->, so."
    assert render.render_page(out, {}, kinds) == out  # a page that matches its rendering is left as it is


def test_a_stale_figure_is_caught(render, tmp_path, monkeypatch):
    table = _tiny_table(tmp_path / "accuracy.jsonl", [0.5, 0.6, 0.7])
    page = tmp_path / "page.md"
    page.write_text("<!-- fig:acc mnist1d flip1-40 standard seeds=0-2 -->60.0 ± 10.0<!-- /fig -->\n")
    monkeypatch.setattr(render, "ROOT", tmp_path)
    monkeypatch.setattr(render, "PAGES", ("page.md",))
    monkeypatch.setattr(render, "renderers", lambda: {})
    figures = render.figures
    monkeypatch.setattr(render, "figures", lambda: figures(table))
    assert render.main(["--check"]) == 0
    _tiny_table(table, [0.5, 0.6, 0.75])  # the results change; the typed figure is now stale
    assert render.main(["--check"]) == 1
    assert render.main([]) == 0 and "61.7 ± 12.6" in page.read_text()
    assert render.main(["--check"]) == 0


@pytest.mark.parametrize(
    "marker, message",
    [
        ("<!-- fig:nope mnist1d -->1<!-- /fig -->", "unknown figure kind 'nope'"),
        ("<!-- fig:acc mnist1d lt-50 standard -->1<!-- /fig -->", "no rows"),
        ("<!-- fig:acc mnist1d -->1<!-- /fig -->", "missing"),
        ("<!-- fig:acc mnist1d flip1-40 standard -->1", "without its"),
    ],
)
def test_a_bad_figure_marker_is_an_error(render, tmp_path, marker, message):
    kinds = render.figures(_tiny_table(tmp_path / "accuracy.jsonl", [0.5, 0.6, 0.7]))
    with pytest.raises(ValueError, match=message) as e:
        render.render_page(marker, {}, kinds)
    assert marker.partition("-->")[0] in str(e.value)  # the error names the marker
