"""The documentation site: it builds offline with warnings as errors, and its getting-started program runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if not os.environ.get("CI"):  # CI installs the docs extra (through ".[test]") and must run these tests
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install -e '.[docs]'")


def test_sphinx_build_has_no_warning(tmp_path):
    """``sphinx-build -W`` (the README's command) into a temporary directory, with the frameworks mocked."""
    out = tmp_path / "html"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
         str(ROOT / "docs"), str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
    modules = ["reweight", "presets", "nets", "engines", "losses", "data", "diagnostics", "monitor"]
    modules += [f"integrations.{name}" for name in ("transformers", "timm", "lightning")]
    assert {f"api/{m}.html" for m in modules} <= pages
    assert {"getting_started.html", "design.html", "results.html", "benchmarks.html"} <= pages
    # autodoc really documented the objects (an import failure would leave the page without them)
    for page, name in [
        ("api/reweight.html", "reweight.MetaReweighter.step"),
        ("api/integrations.transformers.html", "reweight.integrations.transformers.ReweightTrainer"),
        ("api/integrations.timm.html", "reweight.integrations.timm.ReweightClassificationTask"),
        ("api/integrations.lightning.html", "reweight.integrations.lightning.MetaReweightCallback"),
    ]:
        assert f'id="{name}"' in (out / page).read_text(), f"{name} is not documented in {page}"
    # every top-level name is documented: on the reweight page or on its module's page
    import reweight

    ids = set()
    for page in out.rglob("*.html"):
        ids |= set(re.findall(r'id="(reweight[\w.]*)"', page.read_text()))
    for name in set(reweight.__all__) - {"__version__"}:
        entries = [i for i in ids if i.endswith(f".{name}") and i.removesuffix(f".{name}") in sys.modules]
        assert entries, f"reweight.{name} has no API entry"


def test_getting_started_program_runs(tmp_path):
    """The guide's complete program runs as printed, and the weights rank clean samples above corrupted ones."""
    text = (ROOT / "docs" / "getting_started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    script = tmp_path / "getting_started.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + blocks[0])
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = eval(proc.stdout.strip().splitlines()[-1])  # the dict the program prints
    assert summary["mean_weight_clean"] > summary["mean_weight_corrupted"]
    assert summary["auroc"] > 0.6


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_integrations_take_the_argument_text_from_the_reweighter_not_copies():
    """``loss_fn``, ``lookahead_lr``, ``meta_loss_fn`` and the keyword-argument lists are written once."""
    import inspect

    from reweight import MetaReweighter
    from reweight._docstrings import reweighter_arg

    transformers = pytest.importorskip("reweight.integrations.transformers")
    timm = pytest.importorskip("reweight.integrations.timm")
    lightning = pytest.importorskip("reweight.integrations.lightning")
    documented = {
        transformers.ReweightTrainerMixin: ("loss_fn", "lookahead_lr"),
        timm.ReweightClassificationTask: ("loss_fn", "meta_loss_fn"),
        lightning.MetaReweightCallback: (),
    }
    sources = {inspect.getsourcefile(m): Path(inspect.getsourcefile(m)).read_text() for m in (transformers, timm)}
    for cls, shared in documented.items():
        doc = _flat(cls.__doc__)
        assert not re.search(r"\{(loss_fn|lookahead_lr|meta_loss_fn|reweight_kwargs)\}", doc), cls
        for name in shared:
            text = reweighter_arg(name)
            assert len(text) > 20 and text in doc, (cls, name)
            for path, source in sources.items():  # the text itself is not copied into an integration
                assert text not in _flat(source), (path, name)
        # every reweighter argument is either passed through (listed) or supplied by the integration (named)
        for name in inspect.signature(MetaReweighter).parameters:
            assert f"``{name}``" in doc, (cls, name)


def test_fill_doc_refuses_a_stale_field_and_keeps_literal_braces():
    from reweight._docstrings import fill_doc

    def f():
        """Args:
        x: {x} and a dict ``{"a": 1}``.
        """

    assert "the x and a dict ``{\"a\": 1}``." in fill_doc(x="the x")(f).__doc__
    with pytest.raises(ValueError, match="no placeholder"):
        fill_doc(y="unused")(f)
