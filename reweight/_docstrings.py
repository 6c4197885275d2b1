"""Argument documentation written once and reused, as ``torch.optim`` does with ``_params_doc``.

The trainer integrations forward arguments to :class:`~reweight.MetaReweighter`. Their docstrings hold
placeholders such as ``{loss_fn}`` or ``{reweight_kwargs}``, and :func:`fill_doc` replaces them with the text of
the reweighter's own ``Args:`` section (the single source) or with the list of its keyword arguments, read from
its signature, so a new reweighter argument or a reworded description reaches every integration.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable, Iterable
from typing import TypeVar

from .reweighter import MetaReweighter

__all__ = ["reweighter_arg", "reweighter_kwargs", "fill_doc"]

T = TypeVar("T")

_ENTRY = re.compile(r"^    (\*{0,2}\w+(?:, \*{0,2}\w+)*): (.*)$")
_WIDTH = 120


def _args_section(doc: str) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style docstring, each joined into one line, by argument name."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = lines.index("Args:") + 1
    except ValueError:
        return {}
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[start:]:
        if line and not line.startswith(" "):  # the next section
            break
        match = _ENTRY.match(line)
        if match:
            current = [match.group(2)]
            for name in match.group(1).split(", "):
                entries[name.lstrip("*")] = current
        elif current is not None and line.strip():
            current.append(line.strip())
    return {name: " ".join(text) for name, text in entries.items()}


def reweighter_arg(name: str) -> str:
    """The description of :class:`~reweight.MetaReweighter`'s argument ``name``, without its ``(default: ...)``.

    Example:
        >>> reweighter_arg("loss_fn")
        'per-sample training loss ``(logits, targets) -> (batch,)``'

    Raises:
        KeyError: if the reweighter's docstring documents no argument ``name``.
    """
    doc = MetaReweighter.__doc__
    if doc is None:  # python -OO strips docstrings
        return ""
    text = _args_section(doc)[name]
    cut = text.rfind("(default:")
    return (text[:cut] if cut >= 0 else text).rstrip(" .")


def reweighter_kwargs(supplied: Iterable[str], by: str) -> str:
    """The keyword arguments of :class:`~reweight.MetaReweighter` that an integration passes through.

    Args:
        supplied: the arguments the integration sets itself (they are left out of the list).
        by: who supplies them, for the sentence, e.g. ``"the Trainer"``.

    Example:
        >>> text = reweighter_kwargs(["model", "optimizer", "meta_loader"], "the callback")
        >>> text.startswith("keyword arguments of :class:`~reweight.MetaReweighter`: ``net``, ")
        True
        >>> text.endswith("the callback supplies ``model``, ``optimizer``, ``meta_loader``")
        True
    """
    supplied = list(supplied)
    names = [n for n in inspect.signature(MetaReweighter).parameters if n not in supplied]
    listed = ", ".join(f"``{n}``" for n in names)
    taken = ", ".join(f"``{n}``" for n in supplied)
    return f"keyword arguments of :class:`~reweight.MetaReweighter`: {listed}; {by} supplies {taken}"


def fill_doc(**fields: str) -> Callable[[T], T]:
    """Decorator replacing the ``{name}`` placeholders of a class's or function's docstring by ``fields[name]``.

    A line holding a placeholder is re-wrapped to 120 characters together with its continuation lines (those
    indented deeper, as in a Google-style ``Args:`` entry). Braces other than the placeholders are left alone.

    Example:
        >>> @fill_doc(lr="the learning rate")
        ... def f(lr):
        ...     '''Args:
        ...         lr: {lr} (default: ``0.1``).
        ...     '''
        >>> f.__doc__.splitlines()[1].strip()
        'lr: the learning rate (default: ``0.1``).'

    Raises:
        ValueError: if a field's placeholder is not in the docstring (a stale field).
    """

    def decorate(obj: T) -> T:
        doc = obj.__doc__
        if doc is None:  # python -OO
            return obj
        missing = [name for name in fields if "{" + name + "}" not in doc]
        if missing:
            raise ValueError(f"{getattr(obj, '__qualname__', obj)!r} has no placeholder for {missing}")
        lines: list[str] = []
        source = doc.splitlines()
        i = 0
        while i < len(source):
            line, i = source[i], i + 1
            if not any("{" + name + "}" in line for name in fields):
                lines.append(line)
                continue
            indent = line[: len(line) - len(line.lstrip())]
            entry = [line.strip()]
            while i < len(source) and source[i].strip() and source[i].startswith(indent + " "):
                entry.append(source[i].strip())  # the entry's continuation lines, re-wrapped with it
                i += 1
            text = " ".join(entry)
            for name, value in fields.items():
                text = text.replace("{" + name + "}", value)
            wrapped = textwrap.wrap(
                text,
                _WIDTH - len(indent),
                subsequent_indent="    ",
                break_long_words=False,
                break_on_hyphens=False,
            )
            lines.extend(indent + w for w in wrapped)
        obj.__doc__ = "\n".join(lines) + ("\n" if doc.endswith("\n") else "")
        return obj

    return decorate
