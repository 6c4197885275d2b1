"""Training cost of the cached accuracy runs relative to Standard, and the accuracy-vs-cost chart.

The cost unit is the sample pass (``_alternatives.PassCounter``): one sample through the whole model in a
forward, a forward-mode (JVP) forward or a backward. A run's cost is the sum of the three; "relative to
Standard" divides it by the Standard run's of the same dataset, setting and seed. Standard cells cached before
the counter existed get their count by construction: every epoch is one forward and one backward of each
training sample (``tests/test_benchmark_accuracy.py`` checks the counter against that).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["passes", "standard_passes", "relative", "chart"]


def passes(result: dict) -> int | None:
    """Sample passes of a cached result (``None`` if it predates the counter)."""
    cost = result.get("cost")
    if cost is None:
        return None
    return int(cost["forwards"] + cost["jvps"] + cost["backwards"])


def standard_passes(run: dict) -> int | None:
    """Passes of a cached Standard or Fine-tune run: counted, or by construction (cells cached before the
    counter): one forward and one backward of every training sample per epoch, and for Fine-tune of every
    meta sample per fine-tuning epoch."""
    counted = passes(run["result"])
    if counted is not None:
        return counted
    n, cfg = run["result"].get("n_train"), run["key"]["config"]
    if n is None:
        return None
    total = 2 * cfg["epochs"] * int(n)
    if run["key"]["method"] == "finetune":
        per_class = cfg["meta_per_class_lt"] if run["key"]["setting"].startswith("lt") else cfg["meta_per_class_noise"]
        total += 2 * cfg["finetune_epochs"] * 10 * per_class
    return total


def relative(runs: list[dict], standard: dict[int, dict], fallback: dict[int, dict] | None = None) -> dict:
    """Per-seed cost of ``runs`` over Standard's (``standard``: seed -> Standard run): passes and seconds.

    ``fallback`` (seed -> a "+finetune" run) supplies the cost of a plain reweighting run cached before the
    counter: the "+finetune" run recorded it under ``before_finetune``.
    """
    ratio_p, ratio_t = [], []
    for r in runs:
        seed = r["key"]["seed"]
        res = r["result"]
        cost = res.get("cost")
        if cost is None and r["key"]["method"] in ("standard", "finetune") and standard_passes(r):
            cost = {"forwards": standard_passes(r), "jvps": 0, "backwards": 0, "seconds": None}
        if cost is None and fallback and seed in fallback:
            cost = fallback[seed]["result"].get("before_finetune", {}).get("cost")
        base = standard.get(seed)
        if cost is None or base is None:
            continue
        p0 = standard_passes(base)
        if p0:
            ratio_p.append((cost["forwards"] + cost["jvps"] + cost["backwards"]) / p0)
        t0 = (base["result"].get("cost") or {}).get("seconds")
        if t0 and cost["seconds"] is not None:
            ratio_t.append(cost["seconds"] / t0)
    return {"passes": ratio_p, "seconds": ratio_t}


_FAMILIES = ("standard", "finetune", "merged", "gce", "cleanlab", "l2rw", "lossnet", "logitnet", "metainfonet")
_MARKERS = {"standard": "o", "finetune": "s", "merged": "^", "gce": "D", "cleanlab": "v"}


def _style(method: str, cmap) -> dict:
    """Colour by method family; a pentagon for a reweighting method, a star once fine-tuned; hollow for a
    variant other than the library defaults."""
    base, _, variant = method.partition("~")
    family, _, then = base.partition("+")
    colour = cmap(_FAMILIES.index(family) % 10) if family in _FAMILIES else cmap(9)
    marker = "*" if then else _MARKERS.get(family, "p")
    hollow = variant not in ("", "exact")
    return {
        "marker": marker,
        "s": 110 if marker == "*" else 44,
        "facecolor": "white" if hollow else colour,
        "edgecolor": colour if hollow else "k",
        "linewidth": 1.3 if hollow else 0.4,
    }


def chart(points: dict[str, dict[str, list[tuple[str, float, float]]]], path: Path, names: dict[str, str]) -> Path:
    """Write the accuracy-vs-cost PNG: one panel per (protocol, setting), one point per method.

    Args:
        points: ``{protocol: {setting: [(method, cost relative to Standard, test accuracy %), ...]}}``.
        path: the PNG to write.
        names: display name of each method.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ds, s) for ds, by in points.items() for s in by]
    if not panels:
        raise ValueError("no cached run has both an accuracy and a cost: nothing to chart")
    methods = list(dict.fromkeys(m for by in points.values() for pts in by.values() for m, _, _ in pts))
    style = {m: _style(m, plt.get_cmap("tab10")) for m in methods}
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    legend_rows = math.ceil(len(methods) / 5)
    height = 3.1 * rows + 0.3 + 0.22 * legend_rows
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.6 * cols, 8.0), height), squeeze=False)
    ticks = matplotlib.ticker
    for ax, (ds, s) in zip(axes.flat, panels):
        pts = sorted(points[ds][s], key=lambda p: (p[1], -p[2]))
        front, best = [], -np.inf  # the frontier: no other method is both cheaper and more accurate
        for _, c, a in pts:
            if a > best:
                front.append((c, a))
                best = a
        ax.step([c for c, _ in front], [a for _, a in front], where="post", color="0.75", lw=1, zorder=1)
        for m, c, a in pts:
            ax.scatter(c, a, zorder=2, **style[m])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticks.FixedLocator([1, 1.5, 2, 3, 5, 8, 12, 20]))
        ax.xaxis.set_major_formatter(ticks.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(ticks.NullFormatter())
        ax.set_xlim(0.9, max(c for _, c, _ in pts) * 1.15)
        ax.set_title(f"{ds}  {s}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("training cost / Standard (sample passes)", fontsize=8)
    handles = [
        plt.Line2D(
            [], [], ls="", marker=style[m]["marker"], markersize=7 if style[m]["marker"] != "*" else 10,
            markerfacecolor=style[m]["facecolor"], markeredgecolor=style[m]["edgecolor"], label=names.get(m, m),
        )
        for m in methods
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle("Accuracy against training cost (mean over seeds; grey: the frontier)", fontsize=10)
    fig.tight_layout(rect=(0, (0.1 + 0.22 * legend_rows) / height, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
