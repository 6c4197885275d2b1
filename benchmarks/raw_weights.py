"""The weighting net's raw outputs over one run of the accuracy benchmark, before the batch normalisation.

With ``normalization="sum"`` the weights are the net's sigmoid outputs divided by their batch mean, so the
outputs' common scale is free: once most outputs sink into the sigmoid's lower tail, the normalised weights
behave like a softmax over the batch whose sharpness nothing bounds. This script shows that drift: per
twentieth of the run, the mean and the largest raw output over every call of the net (look-ahead and
weight-time calls alike), their ratio, the gated net's LossNet share ``g`` and its LossNet's mean output, and the
batches' effective sample size and test accuracy from the run's own curves.

    python benchmarks/raw_weights.py --setting flip1-40 --seed 2           # run (once) and print
    python benchmarks/raw_weights.py --setting flip1-40 --seed 2 --report  # print the stored row

The run is one cell of ``benchmarks/accuracy.py`` (the same data, model, schedule and options, so the same
test accuracies), repeated with forward hooks on the weighting net; its row is appended to
``benchmarks/results/raw_weights.jsonl`` with its provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _one_cell  # noqa: E402
import accuracy  # noqa: E402

from reweight.nets import GatedNet, LossNet, WeightingOutput  # noqa: E402

BUCKETS = 20
COLUMNS = ("raw mean", "raw max / mean", "g (LossNet share)", "LossNet mean", "batch ESS", "test acc")


def _hooks(log: dict[str, list[float]]):
    """Forward hooks recording the raw outputs of every weighting net call (and the gated net's parts)."""

    def hook(module: nn.Module, args, out) -> None:
        weights = out.weights if isinstance(out, WeightingOutput) else out
        if not isinstance(weights, torch.Tensor) or weights.numel() == 0:
            return
        w = weights.detach().float()
        if isinstance(module, GatedNet):
            log["mean"].append(float(w.mean()))
            log["max"].append(float(w.max()))
            log["gate"].append(float(module.trust_in_loss()))
        elif isinstance(module, LossNet):
            log["loss_net_mean"].append(float(w.mean()))

    return hook


def _buckets(values: list[float]) -> list[float]:
    """Means over ``BUCKETS`` consecutive, equal shares of the calls (NaN for an empty share)."""
    return [float(np.mean(part)) if len(part) else float("nan") for part in np.array_split(values, BUCKETS)]


TABLE = Path(__file__).resolve().parent / "results" / "raw_weights.jsonl"


def measure(args: argparse.Namespace) -> dict:
    """One run of the cell with hooks on the weighting net: the columns of the table, per share of the run."""
    cfg = dataclasses.replace(accuracy.CONFIGS[args.dataset], **accuracy.SCHEDULES[args.schedule])
    overrides = {"epochs": args.epochs, "num_samples": args.num_samples}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    log: dict[str, list[float]] = defaultdict(list)
    handle = nn.modules.module.register_module_forward_hook(_hooks(log))
    try:
        out = accuracy.train_run(
            args.dataset, args.setting, "gated", args.seed, cfg, None, accuracy.VARIANTS[args.variant],
            accuracy._main_grid(args.dataset, args.schedule, args.variant, args.model), args.model,
        )
    finally:
        handle.remove()
    curves, epochs = out["curves"], len(out["test_acc"])
    at = [min(epochs - 1, b * epochs // BUCKETS) for b in range(BUCKETS)]
    return {
        "epoch": at,
        "raw mean": _buckets(log["mean"]),
        "raw max / mean": [m / a for m, a in zip(_buckets(log["max"]), _buckets(log["mean"]))],
        "g (LossNet share)": _buckets(log["gate"]),
        "LossNet mean": _buckets(log["loss_net_mean"]),
        "batch ESS": [curves["ess_mean"][e] for e in at],
        "test acc": [out["test_acc"][e] for e in at],
    }


def table(row: dict) -> str:
    """The markdown table of one stored row."""
    k, columns = row["key"], row["result"]
    names = COLUMNS
    lines = [
        f"{k['dataset']} {k['setting']}, gated~{k['variant']}, model {k['model']}, schedule {k['schedule']}, "
        f"seed {k['seed']}:",
        "",
        "| epoch | " + " | ".join(names) + " |",
        "| --- " * (len(names) + 1) + "|",
    ]
    for b, epoch in enumerate(columns["epoch"]):
        lines.append(f"| {epoch} | " + " | ".join(f"{columns[c][b]:.3g}" for c in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = _one_cell.parser(
        __doc__, TABLE, dataset="mnist1d", setting="flip1-40", seed=2, variant="nokn",
        model="bn", schedule="paper"
    )
    return _one_cell.run(p.parse_args(argv), _one_cell.CELL, measure, table, argv)


if __name__ == "__main__":
    raise SystemExit(main())
