"""Learned source weights (``net="groups"``) on two three-source mixtures, 5 seeds (examples/source_weights.py).

For each seed and mixture: the target metric of the uniform mixture, of the learned group weights (and, for the
classification mixture, of group weights times a per-sample LossNet, ``within="lossnet"``), and of the best fixed
mixture of a simplex grid (the oracle, chosen on the test metric), the learned weights at the end, and the seconds
per step. One JSON Lines row per (task, seed) in ``benchmarks/results/source_weights.jsonl`` with its provenance.

    python benchmarks/source_weights.py [--seeds 0 1 2 3 4] [--steps-cls 400] [--steps-lm 300] [--grid 2]
    python benchmarks/source_weights.py --report       # the tables of docs/source_weighting.md, from the rows
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _store import RESULTS, append, canonical, find, latest, provenance, provenance_note  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLE = RESULTS / "source_weights.jsonl"


def _example():
    spec = importlib.util.spec_from_file_location("_source_weights_example", ROOT / "examples" / "source_weights.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _key(ex, task: str, seed: int, steps: int, grid: int) -> dict:
    """A row's identity: the mixture, seed, run length, oracle grid, the per-sample net multiplied in, and the
    reweighter options the example passes (``{}``: the library defaults)."""
    within = "lossnet" if task == "classification" else None
    reweight = ex.TASKS[task]["reweight"]
    return canonical({"task": task, "seed": seed, "steps": steps, "grid": grid, "within": within, "reweight": reweight})


def run(task: str, seed: int, steps: int, grid: int, table: Path = TABLE, force: bool = False) -> dict:
    ex = _example()
    within = "lossnet" if task == "classification" else None
    key = _key(ex, task, seed, steps, grid)
    if not force and (row := find(table, key)) is not None:
        return row
    r = ex.compare(task, seed, steps, grid, within=within)
    result = {
        "metric": ex.TASKS[task]["metric"],
        "higher_is_better": ex.TASKS[task]["higher_is_better"],
        "uniform": r["uniform"]["metric"],
        "learned": r["learned"]["metric"],
        "oracle": r["oracle"]["metric"],
        "oracle_mixture": list(r["oracle"]["mixture"]),
        "grid": [[list(m), v] for m, v in r["oracle"]["grid"].items()],
        "group_weights": r["learned"]["group_weights"],
        "sec_per_step": {"uniform": r["uniform"]["sec_per_step"], "learned": r["learned"]["sec_per_step"]},
    }
    if within is not None:
        result[f"learned+{within}"] = r[f"learned+{within}"]["metric"]
        result[f"group_weights+{within}"] = r[f"learned+{within}"]["group_weights"]
        result["sec_per_step"][f"learned+{within}"] = r[f"learned+{within}"]["sec_per_step"]
    row = {"key": key, "result": result, "provenance": provenance(options={"per_source": ex.PER_SOURCE[task]})}
    append(table, row)
    return row


def main(seeds: list[int], steps_cls: int, steps_lm: int, grid: int, force: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for seed in seeds:
        for task, steps in (("classification", steps_cls), ("lm", steps_lm)):
            row = run(task, seed, steps, grid, force=force)
            res = row["result"]
            print(
                f"{task} seed {seed}: uniform {res['uniform']:.4f} learned {res['learned']:.4f} oracle "
                f"{res['oracle']:.4f} {res['oracle_mixture']} weights "
                f"{ {k: round(v, 3) for k, v in res['group_weights'].items()} }",
                flush=True,
            )
            rows.append(row)
    return rows


RANDOM = {"classification": "uniform_labels", "lm": "random"}  # the source with no signal at all


def _ms(values: list[float], digits: int = 3) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "–"


def report(task: str, table: Path = TABLE) -> str:
    """The per-seed table of one mixture (uniform, learned, learned + within, the oracle and its mixture, the
    learned weights, the cost per step), the mean ± sd row, and what every seed shows: which source the learned
    weights rank first and last, and the learned metric against the uniform mixture and the oracle."""
    reweight = canonical(_example().TASKS[task]["reweight"])  # the rows of the example's current options
    rows = [r for r in latest(table) if r["key"]["task"] == task and r["key"].get("reweight") == reweight]
    rows.sort(key=lambda r: r["key"]["seed"])
    if not rows:
        raise SystemExit(f"no rows of task {task!r} with reweighter options {reweight} in {table}")
    within = rows[0]["key"]["within"]
    extra = [f"learned + {within}"] if within else []
    head = ["seed", "uniform", "learned", *extra, "oracle (mixture)", "learned weights", "cost per step"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        res, sec = r["result"], r["result"]["sec_per_step"]
        cells = [str(r["key"]["seed"]), f"{res['uniform']:.3f}", f"{res['learned']:.3f}"]
        cells += [f"{res[f'learned+{within}']:.3f}"] if within else []
        mixture = ", ".join(f"{m:g}" for m in res["oracle_mixture"])
        weights = " / ".join(f"{res['group_weights'][name]:.2f}" for name in _example().NAMES[task])
        cost = f"{sec['learned'] * 1e3:.0f} / {sec['uniform'] * 1e3:.0f} ms = {sec['learned'] / sec['uniform']:.1f}x"
        lines.append("| " + " | ".join([*cells, f"{res['oracle']:.3f} ({mixture})", weights, cost]) + " |")
    col = lambda name: [r["result"][name] for r in rows]  # noqa: E731
    means = [_ms(col("uniform")), _ms(col("learned")), *([_ms(col(f"learned+{within}"))] if within else [])]
    lines.append("| mean ± sd | " + " | ".join([*means, _ms(col("oracle")), "", ""]) + " |")
    names = _example().NAMES[task]  # the target-like (clean) source first
    noise = RANDOM[task]
    better = (lambda a, b: a >= b) if rows[0]["result"]["higher_is_better"] else (lambda a, b: a <= b)
    order = [sorted(names, key=lambda n: -r["result"]["group_weights"][n]) for r in rows]
    gap = [r["result"]["learned"] - r["result"]["oracle"] for r in rows]
    n = len(rows)
    lines += [
        "",
        f"Learned weights in the order {' / '.join(names)}. Over the {n} seeds: *{names[0]}* ranked first in "
        f"{sum(o[0] == names[0] for o in order)}, *{noise}* ranked last in {sum(o[-1] == noise for o in order)}; "
        f"the learned {rows[0]['result']['metric']} no worse than the uniform mixture's in "
        f"{sum(better(r['result']['learned'], r['result']['uniform']) for r in rows)}, no worse than the oracle's in "
        f"{sum(better(r['result']['learned'], r['result']['oracle']) for r in rows)}; learned minus oracle "
        f"{_ms(gap)}.",
        "",
        provenance_note(rows),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps-cls", type=int, default=400)
    parser.add_argument("--steps-lm", type=int, default=300)
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="re-measure rows already in the table")
    parser.add_argument("--report", action="store_true", help="print the tables from the rows and exit")
    a = parser.parse_args()
    if a.report:
        print("\n".join(report(task) for task in ("classification", "lm")))
    else:
        main(a.seeds, a.steps_cls, a.steps_lm, a.grid, a.force)
