"""What a user or a distributor gets: ``python -m build`` gives a wheel and an sdist with the package, its
``py.typed`` marker and licence, the declared metadata, and no tests, examples or benchmark results."""

import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import reweight

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("CI"):  # CI installs the test extra and must run these tests
    pytest.importorskip("build", reason="the test extra's `build` is not installed")

# copies of the checkout leave out what is not source (and what a build would write)
_NOT_SOURCE = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "_build", ".hypothesis", ".*_cache")


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """Wheel and sdist built offline (no isolation) from a copy of the checkout, so the tree stays untouched."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("*.whl")
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    return wheel, sdist


def _package_files() -> set[str]:
    """Every file the package ships, as in the checkout: its modules and the py.typed marker."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "reweight").rglob("*") if p.suffix in (".py", ".typed")}


def test_wheel_holds_the_package_its_marker_and_licence_only(dists):
    wheel, _ = dists
    version = reweight.__version__
    assert wheel.name == f"reweight-{version}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    info = f"reweight-{version}.dist-info"
    assert "reweight/py.typed" in names
    assert {n for n in names if not n.startswith(info + "/")} == _package_files()
    assert f"{info}/licenses/LICENSE" in names


def test_wheel_metadata_matches_the_project(dists):
    wheel, _ = dists
    version = reweight.__version__
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"reweight-{version}.dist-info/METADATA"))
    assert meta["Version"] == version  # the single source: reweight/__init__.py
    assert meta["License-Expression"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text().splitlines()[0]
    classifiers = set(meta.get_all("Classifier"))
    assert {"Typing :: Typed"} | {f"Programming Language :: Python :: 3.{m}" for m in (10, 11, 12)} <= classifiers
    import trove_classifiers as trove
    assert classifiers <= trove.classifiers, classifiers - trove.classifiers  # PyPI refuses unknown classifiers
    extras = set(meta.get_all("Provides-Extra"))
    assert {"docs", "test", "transformers", "timm", "lightning", "integrations"} <= extras


def test_sdist_has_no_tests_examples_or_results(dists):
    _, sdist = dists
    version = reweight.__version__
    prefix = f"reweight-{version}/"
    with tarfile.open(sdist) as tar:
        names = {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "reweight/py.typed"} <= names
    assert _package_files() <= names
    assert "docs/conf.py" in names and not any(n.startswith("docs/_build/") for n in names)
    for top in ("tests/", "examples/", "benchmarks/", ".ci/"):
        assert not any(n.startswith(top) for n in names), top
    assert not any(n.endswith(".json") for n in names)


def test_changelog_has_the_released_version_and_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(reweight.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M)
