"""Learned source weights (``net="groups"``) on two three-source mixtures, 5 seeds (examples/source_weights.py).

For each seed and mixture: the target metric of the uniform mixture, of the learned group weights (and, for the
classification mixture, of group weights times a per-sample LossNet, ``within="lossnet"``), and of the best fixed
mixture of a simplex grid (the oracle, chosen on the test metric), the learned weights at the end, and the seconds
per step. One JSON Lines row per (task, seed) in ``benchmarks/results/source_weights.jsonl`` with its provenance.

    python benchmarks/source_weights.py [--seeds 0 1 2 3 4] [--steps-cls 400] [--steps-lm 300] [--grid 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _store import RESULTS, append, canonical, find, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLE = RESULTS / "source_weights.jsonl"


def _example():
    spec = importlib.util.spec_from_file_location("_source_weights_example", ROOT / "examples" / "source_weights.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(task: str, seed: int, steps: int, grid: int, table: Path = TABLE, force: bool = False) -> dict:
    ex = _example()
    within = "lossnet" if task == "classification" else None
    key = canonical({"task": task, "seed": seed, "steps": steps, "grid": grid, "within": within})
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps-cls", type=int, default=400)
    parser.add_argument("--steps-lm", type=int, default=300)
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="re-measure rows already in the table")
    a = parser.parse_args()
    main(a.seeds, a.steps_cls, a.steps_lm, a.grid, a.force)
