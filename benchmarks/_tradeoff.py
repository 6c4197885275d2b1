"""Reports on reweighter configurations: the gain a cheap variant keeps, late-collapse statistics, curves.

``cells`` is ``accuracy._cells``'s mapping ``(dataset, setting, method) -> [cached run, ...]`` where a
variant's runs are under ``method~variant``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["mean_se", "gain_table", "stability_table", "paired_table", "curves_png"]


def mean_se(diffs, digits: int = 2) -> str:
    """``mean ± standard error`` of paired differences (NaN error for a single one)."""
    se = np.std(diffs, ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return f"{np.mean(diffs):+.{digits}f} ± {se:.{digits}f}"


def _mean(runs: list[dict], which: str) -> float | None:
    values = [100 * r["result"][which] for r in runs]
    return float(np.mean(values)) if values else None


def _seeds(runs: list[dict]) -> set[int]:
    return {r["key"]["seed"] for r in runs}


def _name(method: str, variant: str) -> str:
    return method if variant == "default" else f"{method}~{variant}"


def _pick(runs: list[dict], seeds: set[int]) -> list[dict]:
    return [r for r in runs if r["key"]["seed"] in seeds]


def gain_table(
    cells: dict, dataset: str, settings: list[str], methods: list[str], base: str, variants: list[str]
) -> str:
    """Markdown: for each method and variant, accuracy and the share of ``base``'s gain over Standard it keeps.

    Gain = mean accuracy - Standard's mean accuracy over the seeds present for all three; the share is
    ``gain(variant) / gain(base)``, shown only where ``base`` gains at least 1 point (a share of a gain
    within the seed noise means nothing).
    """
    lines = [
        f"| method | variant | {' | '.join(f'{s} best / last (kept)' for s in settings)} |",
        "| --- | --- |" + " --- |" * len(settings),
    ]
    for m in methods:
        for v in [base, *variants]:
            row = []
            for s in settings:
                std = cells.get((dataset, s, "standard"), [])
                ref = cells.get((dataset, s, _name(m, base)), [])
                own = cells.get((dataset, s, _name(m, v)), [])
                seeds = _seeds(std) & _seeds(ref) & _seeds(own)
                if not seeds:
                    row.append("–")
                    continue
                parts = []
                for which in ("best", "last"):
                    a, b, s0 = (_mean(_pick(rs, seeds), which) for rs in (own, ref, std))
                    kept = ""
                    if v != base and b - s0 >= 1.0:
                        kept = f" ({100 * (a - s0) / (b - s0):.0f}%)"
                    parts.append(f"{a:.1f}{kept}")
                row.append(" / ".join(parts) + ("" if len(seeds) >= 5 else f" n={len(seeds)}"))
            lines.append(f"| {m} | {v} | " + " | ".join(row) + " |")
    lines += ["", f"Paired difference from {base} (same seeds), points, mean ± standard error, best / last:", ""]
    lines += [f"| method | variant | {' | '.join(settings)} |", "| --- | --- |" + " --- |" * len(settings)]
    for m in methods:
        for v in variants:
            row = []
            for s in settings:
                ref = {r["key"]["seed"]: r for r in cells.get((dataset, s, _name(m, base)), [])}
                own = {r["key"]["seed"]: r for r in cells.get((dataset, s, _name(m, v)), [])}
                seeds = sorted(set(ref) & set(own))
                if len(seeds) < 2:
                    row.append("–")
                    continue
                parts = []
                for which in ("best", "last"):
                    d = np.array([100 * (own[k]["result"][which] - ref[k]["result"][which]) for k in seeds])
                    parts.append(mean_se(d, 1))
                row.append(" / ".join(parts))
            lines.append(f"| {m} | {v} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _tail_mean(curve: list[float]) -> float:
    """Mean over the last 10% of epochs (the benchmark's "last")."""
    return float(np.mean(curve[-max(1, math.ceil(0.1 * len(curve))) :]))


def _max_drop(run: dict) -> float:
    """Points from the run's highest test accuracy (any epoch) to its final-10% mean."""
    return 100 * (max(run["result"]["test_acc"]) - run["result"]["last"])


def stability_table(cells: dict, dataset: str, settings: list[str], methods: list[str], fit: bool = False) -> str:
    """Markdown: per method and setting, the meta-set accuracy over the last 10% of epochs and its drop from
    the run's best (what a configuration is chosen by), the test accuracy best / last, mean (best - last) and
    the worst seed's drop from its own highest test accuracy to its last (late-collapse statistics); with
    ``fit``, also the final accuracy on the observed (noisy) training labels (how far the model memorises)."""
    lines = [
        "| method | setting | seeds | meta last | meta max - last | best | last | mean (best - last) "
        "| worst seed: max test - last |" + (" fit of the observed labels |" if fit else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if fit else ""),
    ]
    for m in methods:
        for s in settings:
            runs = cells.get((dataset, s, m), [])
            if not runs:
                continue
            diff = [100 * (r["result"]["best"] - r["result"]["last"]) for r in runs]
            worst = max(runs, key=_max_drop)
            meta_last = [100 * _tail_mean(r["result"]["meta_acc"]) for r in runs]
            meta_drop = [100 * max(r["result"]["meta_acc"]) - ml for r, ml in zip(runs, meta_last)]
            lines.append(
                f"| {m} | {s} | {len(runs)} | {np.mean(meta_last):.1f} | {np.mean(meta_drop):.1f} | "
                f"{_mean(runs, 'best'):.1f} | {_mean(runs, 'last'):.1f} | "
                f"{np.mean(diff):+.1f} | {_max_drop(worst):.1f} (seed {worst['key']['seed']}) |"
                + (f" {100 * np.mean([r['result']['train_acc_observed'] for r in runs]):.1f} |" if fit else "")
            )
    return "\n".join(lines) + "\n"


def paired_table(
    cells: dict, dataset: str, settings: list[str], pairs: list[tuple[str, str]], drop: float = 4.0
) -> str:
    """Markdown: each ``(row, base)`` pair over the seeds both ran, paired, per setting and over all of them
    ("all": every setting's seeds pooled): the meta set's figures a configuration is chosen by (accuracy over
    the last 10% of epochs, in points; the look-ahead's meta loss over the last four epochs; the lowest seed's
    meta-set accuracy, for both) and, beside them, the test set's (last; the seeds ending more than ``drop``
    points below their own highest test accuracy, and the worst seed's drop, for both)."""
    lines = [
        "| row | against | setting | seeds | meta last | meta loss (last 4 epochs) | lowest seed's meta last "
        f"| test last | seeds > {drop:g} below their best | worst seed's test drop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, base in pairs:
        pooled: list[tuple[dict, dict]] = []
        for s in [*settings, "all"]:
            if s == "all":
                pairs_s = pooled
            else:
                mine = {r["key"]["seed"]: r for r in cells.get((dataset, s, row), [])}
                theirs = {r["key"]["seed"]: r for r in cells.get((dataset, s, base), [])}
                pairs_s = [(mine[i], theirs[i]) for i in sorted(set(mine) & set(theirs))]
                pooled += pairs_s
            if not pairs_s or (s == "all" and len(settings) < 2):
                continue
            res = [(a["result"], b["result"]) for a, b in pairs_s]
            meta = [100 * (_tail_mean(a["meta_acc"]) - _tail_mean(b["meta_acc"])) for a, b in res]
            loss = [np.mean(a["curves"]["meta_loss"][-4:]) - np.mean(b["curves"]["meta_loss"][-4:]) for a, b in res]
            test = [100 * (a["last"] - b["last"]) for a, b in res]
            lowest = [min(100 * _tail_mean(p[k]["result"]["meta_acc"]) for p in pairs_s) for k in (0, 1)]
            falls = [sum(_max_drop(p[k]) > drop for p in pairs_s) for k in (0, 1)]
            worst = [max(_max_drop(p[k]) for p in pairs_s) for k in (0, 1)]
            lines.append(
                f"| {row} | {base} | {s} | {len(res)} | {mean_se(meta)} | {mean_se(loss)} | "
                f"{lowest[0]:.1f} ({lowest[1]:.1f}) | {mean_se(test)} | {falls[0]} ({falls[1]}) | "
                f"{worst[0]:.1f} ({worst[1]:.1f}) |"
            )
    return "\n".join(lines) + "\n"


def holdout_table(cells: dict, dataset: str, settings: list[str], rows: list[str], base: str) -> str:
    """Markdown: per row and setting, the accuracy on the clean samples held out beside the meta set (never
    shown to the reweighter: what a configuration is chosen by), over the last 10% of epochs, and its paired
    difference from ``base`` over the seeds both ran; beside it the meta set's (which the weights train toward)
    and the test set's last accuracy."""
    lines = [
        f"| row | setting | seeds | held-out last | against {base} | meta last | test last |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        pooled = []
        for s in [*settings, "all"]:
            runs = pooled if s == "all" else sorted(cells.get((dataset, s, row), []), key=lambda r: r["key"]["seed"])
            if s != "all":
                pooled += [(s, r) for r in runs]
            pairs = runs if s == "all" else [(s, r) for r in runs]
            if not pairs:
                continue
            held = [100 * _tail_mean(r["result"]["holdout_acc"]) for _, r in pairs]
            theirs = {(s_, r["key"]["seed"]): r for s_ in settings for r in cells.get((dataset, s_, base), [])}
            diff = [
                h - 100 * _tail_mean(theirs[(s_, r["key"]["seed"])]["result"]["holdout_acc"])
                for h, (s_, r) in zip(held, pairs)
                if (s_, r["key"]["seed"]) in theirs
            ]
            meta = np.mean([100 * _tail_mean(r["result"]["meta_acc"]) for _, r in pairs])
            test = np.mean([100 * r["result"]["last"] for _, r in pairs])
            against = mean_se(diff) if diff and row != base else "–"
            lines.append(
                f"| {row} | {s} | {len(pairs)} | {np.mean(held):.1f} ± {np.std(held):.1f} | {against} | "
                f"{meta:.1f} | {test:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _curve_facts(run: dict) -> tuple[float, float, float, float]:
    """(drop from the highest test accuracy to the last, the weights' largest per-epoch std, the rise of the
    meta loss after its minimum, the meta-set accuracy's drop from its highest to its last)."""
    res = run["result"]
    meta_loss = res["curves"]["meta_loss"]
    low = int(np.argmin(meta_loss))
    meta_drop = 100 * (max(res["meta_acc"]) - _tail_mean(res["meta_acc"]))
    return _max_drop(run), max(res["curves"]["w_std"]), max(meta_loss[low:]) - meta_loss[low], meta_drop


def curves_table(cells: dict, dataset: str, settings: list[str], methods: list[str], drop: float = 4.0) -> str:
    """Markdown: per method and setting, the seeds whose test accuracy ends more than ``drop`` points below
    their own highest, each with what the per-epoch curves show (the weights' largest std, the meta loss's rise
    after its minimum, the meta-set accuracy's drop), against the medians of the other seeds."""
    lines = [
        f"| method | setting | seeds ending > {drop:g} below their best: drop / largest weight std / meta-loss rise "
        "/ meta-acc drop | the other seeds (median): largest weight std / meta-loss rise / meta-acc drop |",
        "| --- | --- | --- | --- |",
    ]
    for m in methods:
        for s in settings:
            runs = sorted(cells.get((dataset, s, m), []), key=lambda r: r["key"]["seed"])
            if not runs or "curves" not in runs[0]["result"]:
                continue
            facts = {r["key"]["seed"]: _curve_facts(r) for r in runs}
            fell = [k for k, f in facts.items() if f[0] > drop]
            rest = [f for k, f in facts.items() if k not in fell]
            said = "; ".join(
                f"seed {k}: {facts[k][0]:.1f} / {facts[k][1]:.2f} / {facts[k][2]:.2f} / {facts[k][3]:.1f}" for k in fell
            )
            med = (
                " / ".join(f"{np.median([f[i] for f in rest]):.{d}f}" for i, d in ((1, 2), (2, 2), (3, 1)))
                if rest
                else "–"
            )
            lines.append(f"| {m} | {s} | {said or 'none'} | {med} |")
    return "\n".join(lines) + "\n"


def curves_png(cells: dict, dataset: str, setting: str, methods: list[str], path: Path) -> Path:
    """Per-epoch curves of each run of ``methods`` on one setting: test and meta accuracy, the mean weight of
    corrupted and clean samples, the weights' standard deviation and the meta loss (one row per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in methods if cells.get((dataset, setting, m))]
    if not methods:
        raise ValueError(f"no cached runs with curves for {dataset} {setting}")
    panels = ("accuracy (%)", "mean weight", "weight std", "meta loss")
    fig, axes = plt.subplots(len(methods), 4, figsize=(14, 2.6 * len(methods) + 0.6), squeeze=False)
    for row, m in zip(axes, methods):
        for r in sorted(cells[(dataset, setting, m)], key=lambda r: r["key"]["seed"]):
            res, seed = r["result"], r["key"]["seed"]
            colour = plt.get_cmap("tab10")(seed % 10)
            epochs = range(1, len(res["test_acc"]) + 1)
            row[0].plot(epochs, [100 * a for a in res["test_acc"]], color=colour, lw=1, label=f"seed {seed}")
            row[0].plot(epochs, [100 * a for a in res["meta_acc"]], color=colour, lw=0.8, ls=":")
            curves = res.get("curves")
            if not curves:  # not reweighted: no weights to show
                for ax in row[1:]:
                    ax.axis("off")
                continue
            row[1].plot(epochs, curves["w_corrupted"], color=colour, lw=1)
            row[1].plot(epochs, curves["w_clean"], color=colour, lw=0.8, ls=":")
            row[2].plot(epochs, curves["w_std"], color=colour, lw=1)
            row[3].plot(epochs, [x if not math.isnan(x) else None for x in curves["meta_loss"]], color=colour, lw=1)
        for ax, title in zip(row, panels):
            ax.set_title(f"{m}: {title}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, lw=0.4)
        row[0].legend(fontsize=6, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    fig.suptitle(
        f"{dataset} {setting}: solid test accuracy / corrupted samples' weight, dotted meta accuracy / clean weight",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
