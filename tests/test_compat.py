"""Each private torch name lives in reweight._compat with a public fallback; each fallback runs here."""

import ast
import pathlib

import pytest
import torch

from reweight import _compat


def test_profiler_flag_and_its_fallback(monkeypatch):
    assert _compat.profiler_enabled() is False
    with torch.profiler.profile():
        assert _compat.profiler_enabled() is True
    monkeypatch.delattr(torch.autograd, "_profiler_enabled")
    assert _compat.profiler_enabled() is True  # a range no profiler reads: slower, never wrong


def test_assert_async_and_its_fallback(monkeypatch):
    _compat.assert_async(torch.tensor(True), "never")
    with pytest.raises(RuntimeError, match="labels"):
        _compat.assert_async(torch.tensor(False), "labels")
    monkeypatch.delattr(torch, "_assert_async")
    _compat.assert_async(torch.tensor(True), "never")
    with pytest.raises(RuntimeError, match="labels"):
        _compat.assert_async(torch.tensor(False), "labels")


def test_jvp_decompositions_load_once_and_tolerate_their_absence(monkeypatch):
    import sys

    _compat.load_jvp_decompositions()
    assert "torch._decomp.decompositions_for_jvp" in sys.modules
    monkeypatch.delitem(sys.modules, "torch._decomp.decompositions_for_jvp")
    monkeypatch.setattr("importlib.import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    _compat.load_jvp_decompositions()  # no error: make_dual imports it itself then


def _private_names(path: pathlib.Path) -> list[str]:
    """``torch._x`` / ``F._x`` / ``nn.modules.x._Y`` attribute uses in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in {"torch", "F", "nn", "fwAD", "dist"}:
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
            parts = node.module.split(".")
            if any(p.startswith("_") for p in parts) or any(a.name.startswith("_") for a in node.names):
                found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
    return found


def test_no_module_but_compat_uses_a_private_torch_name():
    package = pathlib.Path(_compat.__file__).parent
    hits = [h for p in sorted(package.rglob("*.py")) if p.name != "_compat.py" for h in _private_names(p)]
    assert hits == []


def test_convolution_backward_and_its_fallback(monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 9, 9, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    args = (g, x, w, [6], [2, 2], [1, 1], [1, 1], 2, (True, True, True))
    native = _compat.convolution_backward(*args)
    monkeypatch.setattr(_compat, "_aten_convolution_backward", lambda: None)
    fallback = _compat.convolution_backward(*args)
    for a, b in zip(native, fallback):
        torch.testing.assert_close(a, b)


def test_tensor_version_and_its_fallback(monkeypatch):
    from reweight.losses import cross_entropy

    t = torch.zeros(2, dtype=torch.long)
    v = _compat.tensor_version(t)
    t.add_(1)
    assert _compat.tensor_version(t) == v + 1
    monkeypatch.setattr(_compat, "tensor_version", lambda t: None)
    monkeypatch.setattr("reweight.losses.tensor_version", lambda t: None)
    cross_entropy(torch.zeros(2, 3), t)
    t[0] = 5  # without a version the labels are checked every time
    with pytest.raises(ValueError, match="labels must lie"):
        cross_entropy(torch.zeros(2, 3), t)
