"""How a weighting net spreads the batch's weight over the classes, over one run of the accuracy benchmark.

With ``normalization="sum"`` a net that reads the logits can also move weight between classes. This script shows
where it moves it: per fifth of the run, for each observed class, the net's mean output over the batch mean at
weight time (the weights a ``"sum"`` run trains with, before the ``min_ess`` floor; under ``"class"`` every class's
weights average 1 by construction, so there the column shows what the net would do without it) and the share of
that class's training samples whose observed label the model predicts, and the rank correlation between the two
over the classes. A positive correlation means the net favours the classes the model already fits.

    python benchmarks/class_weights.py --method logitnet --variant ess20   # run (once) and print
    python benchmarks/class_weights.py --method logitnet --variant ess20 --report

The run is one cell of ``benchmarks/accuracy.py`` (the same data, model, schedule and options, so the same
test accuracies), repeated with a forward hook on the weighting net; its row is appended to
``benchmarks/results/class_weights.jsonl`` with its provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _one_cell  # noqa: E402
import accuracy  # noqa: E402

from reweight.nets import GatedNet, LogitNet, LossNet, MetaInfoNet, WeightingOutput  # noqa: E402

PARTS = 5
NETS = (GatedNet, LogitNet, LossNet, MetaInfoNet)
TABLE = Path(__file__).resolve().parent / "results" / "class_weights.jsonl"


def _hook(calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]], top: list[nn.Module]):
    """A forward hook recording, for each weight-time call of the run's net (eval mode), its outputs over their
    batch mean, the observed labels and whether the model predicts the observed label."""

    def hook(module: nn.Module, args, out) -> None:
        if type(module) not in NETS or module.training:
            return
        if not top:
            top.append(module)  # the run's net (not the gated net's parts)
        if module is not top[0]:
            return
        w = (out.weights if isinstance(out, WeightingOutput) else out).detach().double()
        _, logits, targets = args[:3]
        calls.append(((w / w.mean()).numpy(), targets.numpy(), (logits.argmax(-1) == targets).numpy()))

    return hook


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among per-class means)."""
    ra, rb = (np.argsort(np.argsort(np.asarray(v))).astype(float) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(args: argparse.Namespace) -> dict:
    """One run of the cell with the hook: per fifth of the run, each class's mean weight and fit."""
    cfg = dataclasses.replace(accuracy.CONFIGS[args.dataset], **accuracy.SCHEDULES[args.schedule])
    overrides = {"epochs": args.epochs, "num_samples": args.num_samples}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    handle = nn.modules.module.register_module_forward_hook(_hook(calls, []))
    try:
        out = accuracy.train_run(
            args.dataset, args.setting, args.method, args.seed, cfg, None, accuracy.VARIANTS[args.variant],
            accuracy._main_grid(args.dataset, args.schedule, args.variant, args.model), args.model,
        )
    finally:
        handle.remove()
    classes = int(max(c[1].max() for c in calls)) + 1
    weight, fit, rho = [], [], []
    for part in np.array_split(np.arange(len(calls)), PARTS):
        w, y, agree = (np.concatenate([calls[i][k] for i in part]) for k in range(3))
        weight.append([float(w[y == c].mean()) for c in range(classes)])
        fit.append([float(agree[y == c].mean()) for c in range(classes)])
        rho.append(rank_correlation(weight[-1], fit[-1]))
    return {"weight": weight, "fit": fit, "rho": rho, "test_acc": out["test_acc"], "last": out["last"]}


def table(row: dict) -> str:
    """The markdown table of one stored row."""
    k, r = row["key"], row["result"]
    classes = len(r["weight"][0])
    lines = [
        f"{k['dataset']} {k['setting']}, {k['method']}~{k['variant']}, seed {k['seed']} (test last "
        f"{100 * r['last']:.1f}): each class's mean of the net's outputs over their batch mean (the share of its "
        "samples whose observed label the model predicts)",
        "",
        "| fifth of the run | " + " | ".join(f"class {c}" for c in range(classes)) + " | rank correlation |",
        "| --- " * (classes + 2) + "|",
    ]
    for i, (w, f, rho) in enumerate(zip(r["weight"], r["fit"], r["rho"])):
        cells = " | ".join(f"{a:.2f} ({b:.2f})" for a, b in zip(w, f))
        lines.append(f"| {i + 1} | {cells} | {rho:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = _one_cell.parser(
        __doc__, TABLE, dataset="mnist1d-2pct", setting="uniform-40", seed=0, variant="ess20",
        model="plain", schedule="gentle"
    )
    p.add_argument("--method", default="logitnet", choices=("gated", "logitnet", "lossnet", "metainfonet"))
    names = ("dataset", "setting", "method", "seed", "variant", "model", "schedule", "epochs", "num_samples")
    return _one_cell.run(p.parse_args(argv), names, measure, table, argv)


if __name__ == "__main__":
    raise SystemExit(main())
