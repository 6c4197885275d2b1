"""The command line and the measure-once store of a benchmark that repeats one cell of the accuracy benchmark
with a hook on the net (``raw_weights.py``, ``class_weights.py``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import _store
import accuracy
import torch

CELL = ("dataset", "setting", "seed", "variant", "model", "schedule", "epochs", "num_samples")


def parser(doc: str | None, table: Path, **defaults) -> argparse.ArgumentParser:
    """The cell's arguments with this benchmark's ``defaults`` (dataset, setting, seed, variant, model,
    schedule), its table and its report flag."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=defaults["dataset"], choices=sorted(accuracy.CONFIGS))
    p.add_argument("--setting", default=defaults["setting"])
    p.add_argument("--seed", type=int, default=defaults["seed"])
    p.add_argument("--variant", default=defaults["variant"], choices=sorted(accuracy.VARIANTS))
    p.add_argument("--model", default=defaults["model"], choices=accuracy.MODELS)
    p.add_argument("--schedule", default=defaults["schedule"], choices=sorted(accuracy.SCHEDULES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=table, help=f"the table (default: results/{table.name})")
    p.add_argument("--report", action="store_true", help="print the stored row of this cell and exit")
    p.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs (smoke tests)")
    p.add_argument("--num-samples", type=int, default=None, help="override mnist1d's num_samples (smoke tests)")
    return p


def run(
    args: argparse.Namespace, key_names: tuple[str, ...], measure: Callable, render: Callable, argv: list[str] | None
) -> int:
    """Print the stored row of the cell named by ``key_names`` of ``args``, measuring and storing it first
    unless ``--report``; 1 when there is no row to print."""
    torch.set_num_threads(args.threads)
    key = {name: getattr(args, name) for name in key_names}
    row = _store.find(args.results, key)
    if row is None and not args.report:
        row = {"key": key, "result": measure(args), "provenance": _store.provenance(sys.argv if argv is None else argv)}
        _store.append(args.results, row)
    if row is None:
        print(f"no stored row for {key} in {args.results}", file=sys.stderr)
        return 1
    print(render(row))
    return 0
