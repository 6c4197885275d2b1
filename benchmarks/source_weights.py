"""Learned source weights (``net="groups"``) on two three-source mixtures, 5 seeds (examples/source_weights.py).

For each seed and mixture: the target metric of the uniform mixture, of the learned group weights (and, for the
classification mixture, of group weights times a per-sample LossNet, ``within="lossnet"``), and of the best fixed
mixture of a simplex grid (the oracle, chosen on the test metric), the learned weights at the end, and the seconds
per step. One JSON Lines row per (task, seed) in ``benchmarks/results/source_weights.jsonl`` with its provenance.

    python benchmarks/source_weights.py [--seeds 0 1 2 3 4] [--steps-cls 400] [--steps-lm 300] [--grid 2]
    python benchmarks/source_weights.py --choose       # the group net's meta-optimizer candidates (meta set)
    python benchmarks/source_weights.py --equal        # three equally clean sources: nothing to learn
    python benchmarks/source_weights.py --report       # the tables of docs/source_weighting.md, from the rows
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _store import RESULTS, append, canonical, find, latest, provenance, provenance_note  # noqa: E402
from _tradeoff import mean_se  # noqa: E402

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

# The group net's meta optimizer and warm-up, chosen on the meta set (the rows' "meta_metric"): the former
# defaults (AdamW with the per-sample nets' 300-step warm-up), AdamW without it, and SGD at three lrs.
CHOICE_TABLE = RESULTS / "source_weights_choice.jsonl"
CANDIDATES: dict[str, dict] = {
    "adamw, warm-up 300": {"optimizer": "adamw", "lr": 1e-3, "meta_warmup": 300},
    "adamw, no warm-up": {"optimizer": "adamw", "lr": 1e-3, "meta_warmup": 0},
    "sgd 1e-4": {"optimizer": "sgd", "lr": 1e-4, "meta_warmup": 0},
    "sgd 3e-4": {"optimizer": "sgd", "lr": 3e-4, "meta_warmup": 0},
    "sgd 1e-3": {"optimizer": "sgd", "lr": 1e-3, "meta_warmup": 0},
}


EQUAL_TABLE = RESULTS / "source_weights_equal.jsonl"


def equal_sources(seeds: list[int], steps: int, force: bool = False, table: Path = EQUAL_TABLE) -> None:
    """The learned group weights (library defaults) and the uniform mixture on three equally clean sources."""
    torch.set_num_threads(1)
    ex = _example()
    for seed in seeds:
        key = canonical({"task": "classification-equal", "seed": seed, "steps": steps, "reweight": {}})
        if not force and find(table, key) is not None:
            continue
        data = ex.TASKS["classification-equal"]["data"](seed)
        uniform = ex.train("classification-equal", data, seed, steps, "uniform")
        learned = ex.train("classification-equal", data, seed, steps, "learned")
        result = {"uniform": uniform["metric"], "learned": learned["metric"], "group_weights": learned["group_weights"],
                  "meta_uniform": uniform["meta_metric"], "meta_learned": learned["meta_metric"]}  # fmt: skip
        append(table, {"key": key, "result": result, "provenance": provenance()})
        print(f"equal sources seed {seed}: uniform {uniform['metric']:.4f} learned {learned['metric']:.4f}", flush=True)


def equal_report(table: Path = EQUAL_TABLE) -> str:
    """Per seed: test accuracy of the uniform mixture and of the learned weights, and the learned weights."""
    rows = sorted(latest(table), key=lambda r: r["key"]["seed"])
    names = _example().NAMES["classification-equal"]
    lines = ["| seed | uniform | learned | learned weights | largest / smallest |", "|" + " --- |" * 5]
    for r in rows:
        res = r["result"]
        w = [res["group_weights"][n] for n in names]
        cells = [str(r["key"]["seed"]), f"{res['uniform']:.3f}", f"{res['learned']:.3f}"]
        lines.append("| " + " | ".join([*cells, " / ".join(f"{v:.2f}" for v in w), f"{max(w) / min(w):.1f}"]) + " |")
    diff = [r["result"]["learned"] - r["result"]["uniform"] for r in rows]
    lines += ["", f"Learned minus uniform {mean_se(diff, 3)} (mean ± standard error over the {len(rows)} seeds).", ""]
    return "\n".join(lines) + "\n" + provenance_note(rows) + "\n"


def _candidate_kwargs(candidate: dict) -> dict:
    if candidate["optimizer"] == "adamw":
        factory = functools.partial(torch.optim.AdamW, lr=candidate["lr"], weight_decay=5e-4)
    else:
        factory = functools.partial(torch.optim.SGD, lr=candidate["lr"])
    return {"meta_optimizer": factory, "meta_warmup": candidate["meta_warmup"]}


def choose(seeds: list[int], steps: dict[str, int], force: bool = False, table: Path = CHOICE_TABLE) -> None:
    """The learned group weights of every candidate on both mixtures: test and meta metric, final weights."""
    torch.set_num_threads(1)
    ex = _example()
    for seed in seeds:
        for task in ("classification", "lm"):
            data = ex.TASKS[task]["data"](seed)
            for name, candidate in CANDIDATES.items():
                key = canonical({"task": task, "seed": seed, "steps": steps[task], "candidate": candidate})
                if not force and find(table, key) is not None:
                    continue
                r = ex.train(task, data, seed, steps[task], "learned", **_candidate_kwargs(candidate))
                result = {"metric": r["metric"], "meta_metric": r["meta_metric"], "group_weights": r["group_weights"]}
                append(table, {"key": key, "result": result, "provenance": provenance()})
                print(f"{task} seed {seed} {name}: test {r['metric']:.4f} meta {r['meta_metric']:.4f}", flush=True)


def choice_report(table: Path = CHOICE_TABLE) -> str:
    """Per mixture and candidate: the meta-set and test metric (mean ± sd over the seeds), and in how many seeds
    the source with no signal (random labels, random tokens) ends with the lowest weight."""
    rows = latest(table)
    lines = []
    for task, title in (("classification", "Classification (MNIST-1D), accuracy"), ("lm", "Causal LM, target loss")):
        names, noise = _example().NAMES[task], RANDOM[task]
        lines += [f"{title}:", "", f"| candidate | meta set | test set | *{noise}* lowest |", "|" + " --- |" * 4]
        for name, candidate in CANDIDATES.items():
            ours = canonical(candidate)
            seeds = [r["result"] for r in rows if r["key"]["task"] == task and r["key"]["candidate"] == ours]
            if seeds:
                meta, test = [v["meta_metric"] for v in seeds], [v["metric"] for v in seeds]
                last = sum(min(names, key=v["group_weights"].__getitem__) == noise for v in seeds)
                lines.append(f"| {name} | {_ms(meta)} | {_ms(test)} | {last} of {len(seeds)} |")
        lines.append("")
    return "\n".join(lines) + "\n" + provenance_note(rows) + "\n"


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
        weights = " / ".join(f"{res['group_weights'][name]:.3g}" for name in _example().NAMES[task])
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
        f"{mean_se(gap, 3)} (mean ± standard error over the seeds).",
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
    parser.add_argument("--choose", action="store_true", help="run the group net's meta-optimizer candidates")
    parser.add_argument("--equal", action="store_true", help="run the mixture of three equally clean sources")
    a = parser.parse_args()
    if a.report:
        print("\n".join(report(task) for task in ("classification", "lm")))
        print(choice_report())
        print(equal_report())
    elif a.equal:
        equal_sources(a.seeds, a.steps_cls, a.force)
    elif a.choose:
        choose(a.seeds, {"classification": a.steps_cls, "lm": a.steps_lm}, a.force)
    else:
        main(a.seeds, a.steps_cls, a.steps_lm, a.grid, a.force)
