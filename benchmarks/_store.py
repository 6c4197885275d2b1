"""Benchmark result tables: one append-only JSON Lines file per benchmark, each row with its provenance.

A row is a JSON object on one line. Benchmarks write ``{"key": ..., "result": ..., "provenance": ...}``
(plus fields of their own): ``key`` is what identifies the measurement (a sweep skips a key already
present), ``result`` what was measured, ``provenance`` where and with what it was measured
(:func:`provenance`). Rows are only ever appended; a row whose key repeats an earlier one supersedes it in
:func:`latest`.

    from _store import append, rows, provenance, find
    table = Path("benchmarks/results/accuracy.jsonl")
    if find(table, key) is None:
        append(table, {"key": key, "result": measure(), "provenance": provenance()})

Concurrent writers (several sweep processes) are safe: each append takes an exclusive ``flock`` and writes
whole lines.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# Packages recorded when installed; the frameworks only when the benchmark imported them.
PACKAGES = ("torch", "numpy", "mnist1d", "scikit-learn", "cleanlab")
IF_IMPORTED = ("transformers", "timm", "peft", "lightning")
# What "uncommitted changes" covers: the code, not the result tables runs append to or the docs.
CODE = (".", ":(exclude)benchmarks/results", ":(exclude)docs", ":(exclude)*.md")

__all__ = ["append", "rows", "latest", "find", "canonical", "provenance", "code_versions", "provenance_note"]


def canonical(obj):
    """``obj`` as it reads back from the table (tuples become lists, keys sorted): compare keys with this."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _line(row: dict) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), allow_nan=True)


def append(path: Path, new_rows: dict | Iterable[dict]) -> None:
    """Append one row or several to the table at ``path`` (created with its folder if missing)."""
    new_rows = [new_rows] if isinstance(new_rows, dict) else list(new_rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(_line(r) + "\n" for r in new_rows)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    _read.cache_clear()


@functools.lru_cache(maxsize=8)
def _read(path: str, size: int, mtime: float) -> tuple[dict, ...]:
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def rows(path: Path) -> list[dict]:
    """Every row of the table, in the order written (empty if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    st = path.stat()
    return list(_read(str(path), st.st_size, st.st_mtime))


def latest(path: Path) -> list[dict]:
    """The rows with the last one of each key (a re-measured key supersedes its earlier rows)."""
    out: dict[str, dict] = {}
    for r in rows(path):
        k = _line(r["key"])
        out.pop(k, None)
        out[k] = r
    return list(out.values())


def find(path: Path, key: dict) -> dict | None:
    """The latest row with this key, or ``None``."""
    want = _line(canonical(key))
    hit = None
    for r in rows(path):
        if _line(r["key"]) == want:
            hit = r
    return hit


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _static() -> dict:
    """The parts of the provenance that do not change within a process."""
    import reweight

    commit = _git("rev-parse", "HEAD")
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no", "--", *CODE))
    return {
        "library": {"name": "reweight", "version": reweight.__version__, "commit": commit, "dirty": dirty},
        "python": platform.python_version(),
        "cpu": _cpu(),
        "machine": {"system": platform.system(), "arch": platform.machine(), "cores": os.cpu_count()},
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _packages() -> dict:
    out = {}
    for pkg in PACKAGES + tuple(p for p in IF_IMPORTED if p in sys.modules):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    if "torch" in sys.modules:  # the build actually imported (e.g. 2.13.0+cpu), not only the dist's version
        out["torch"] = sys.modules["torch"].__version__
    return out


def provenance(argv: list[str] | None = None, **extra) -> dict:
    """Where and with what a row is measured now: library version and commit (and whether the working tree
    had uncommitted changes to code, see :data:`CODE`), package versions, CPU model, torch threads, UTC date,
    the command line. ``extra`` entries are added as they are (e.g. ``clock="cpu"``)."""
    import torch

    argv = sys.argv if argv is None else argv
    out = dict(_static())
    out.update(
        packages=_packages(),
        threads=torch.get_num_threads(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=shlex.join(["python", *[_relative(a) for a in argv]]),
    )
    out.update(extra)
    return out


def _relative(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(ROOT)) if os.sep in arg else arg
    except ValueError:
        return arg


def code_versions(table_rows: Iterable[dict]) -> dict[str, int]:
    """Rows per code version: ``"<version> @ <commit>"`` (``+dirty`` if so) or, for rows that did not record
    their commit, ``"not recorded (torch <version>)"``."""
    out: dict[str, int] = {}
    for r in table_rows:
        p = r.get("provenance") or {}
        lib = p.get("library") or {}
        if lib.get("commit"):
            label = f"{lib.get('version')} @ {lib['commit'][:7]}"
            label += " (uncommitted changes)" if lib.get("dirty") else ""
        else:
            label = f"not recorded (torch {(p.get('packages') or {}).get('torch') or 'not recorded'})"
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items()))


def provenance_note(table_rows: Iterable[dict]) -> str:
    """One line naming the code versions behind a table and how many of its runs each gave; where its rows were
    made on more than one CPU, a second naming them (runs of one seed diverge across CPUs)."""
    table_rows = list(table_rows)
    counts = code_versions(table_rows)
    if not counts:
        return ""
    parts = ", ".join(f"{label}: {n}" for label, n in counts.items())
    note = f"Code versions of the {sum(counts.values())} rows behind this table: {parts}."
    cpus = Counter(r.get("provenance", {}).get("cpu") or "not recorded" for r in table_rows)
    if len(cpus) > 1:
        note += "\nCPUs that made them (a seed's runs differ across CPUs): " + ", ".join(
            f"{cpu}: {n}" for cpu, n in sorted(cpus.items())
        ) + "."
    return note
