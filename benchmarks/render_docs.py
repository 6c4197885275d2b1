"""Regenerate the published tables and figures of the docs from the committed result tables.

Each generated block of a page sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; NAME is a
renderer below, which reads ``benchmarks/results/accuracy.jsonl`` or ``step_cost.jsonl`` through the
benchmarks' own ``--report`` code. A single figure inside prose sits between ``<!-- fig:KIND ARGS -->`` and
``<!-- /fig -->`` (see ``figures``). Text outside the markers is left alone.

    python benchmarks/render_docs.py           # rewrite the blocks in place
    python benchmarks/render_docs.py --check   # exit 1, naming the blocks, if a page differs from its rendering
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import _cost  # noqa: E402
import _store  # noqa: E402
import _tradeoff  # noqa: E402
import accuracy as acc  # noqa: E402
import class_weights  # noqa: E402
import defaults_matrix  # noqa: E402
import numpy as np  # noqa: E402
import own_loss  # noqa: E402
import raw_weights  # noqa: E402
import readme_loop  # noqa: E402
import source_weights  # noqa: E402
import step_cost  # noqa: E402

PAGES = (
    "docs/results.md", "docs/benchmarks.md", "docs/robustness.md", "docs/source_weighting.md",
    "docs/llm_finetuning.md", "README.md",
)
S3 = ["flip1-40", "flip2-40", "uniform-40"]
DEFAULT_VARIANT = "cls20v05cweq80f"  # the default of the nets that read the logits, as the accuracy variants spell it
WAIT = "waiting for competence"  # veto_competence=0.45 (variant cls20v05cweq80fk45), tried as the default
S4 = ["flip1-40", "flip2-40", "uniform-40", "lt-50"]
NOISE4 = ["flip1-40", "flip2-40", "uniform-40", "uniform-60"]
S6 = ["flip1-20", "flip1-40", "flip2-40", "uniform-40", "uniform-60", "lt-50"]
SEEDS5 = [0, 1, 2, 3, 4]
M = [
    "standard", "finetune", "merged", "gce", "cleanlab", "lossnet", "lossnet+finetune", "logitnet",
    "logitnet+finetune", "metainfonet", "metainfonet+finetune",
]
GATED_ROWS = ["standard", "lossnet", "metainfonet", "gated"]
FAST_METHODS = ["lossnet", "lossnet+finetune", "metainfonet", "metainfonet+finetune"]
P1_METHODS = [
    "standard", "finetune", "merged", "gce", "cleanlab", "lossnet", "lossnet+finetune", "logitnet", "metainfonet",
    "metainfonet+finetune",
]


def _acc(table: Path, datasets, settings, methods, seeds, variants=("default",), schedule="gentle", cost=False):
    text = acc.report(table, datasets, settings, methods, seeds, schedule, tuple(variants), "plain")
    if cost:
        text += "\n" + acc.cost_report(table, datasets, settings, methods, seeds, schedule, tuple(variants), "plain")
    return text


def _lambda(table: Path) -> str:
    settings = ["flip1-40", "flip2-40", "uniform-60"]
    parts = [acc.lambda_report(table, "mnist1d", s) for s in settings]
    return "\n".join([*parts, acc.lambda_choice(table, "mnist1d", settings)])


def _stability(table: Path, settings, methods, variants, seeds, schedule="gentle", model="plain") -> str:
    cells = acc._cells(table, seeds, schedule, tuple(dict.fromkeys(["default", *variants])), model)
    rows = acc._with_variants(methods, tuple(variants))
    text = _tradeoff.stability_table(cells, "mnist1d", settings, rows)
    return text + "\n" + acc._note(cells, "mnist1d", settings, rows)


def _stability_rows(table: Path, settings, rows, variants, seeds, model="bn", fit=False, holdout: int = 0) -> str:
    """The stability table of named rows (``method~variant``, or a method under ``"default"``), paper schedule (the
    runs with ``holdout`` samples per class held out, if given)."""
    cells = acc._cells(table, seeds, "paper", tuple(dict.fromkeys(["default", *variants])), model, holdout)
    text = _tradeoff.stability_table(cells, "mnist1d", settings, rows, fit=fit)
    return text + "\n" + acc._note(cells, "mnist1d", settings, rows)


def _matrix_against_default(config: str, metric: str = "held") -> str:
    """The 600-step matrix runs of a configuration tried as the default against the default's, paired by seed."""
    spelled = defaults_matrix.SPELLED[config]
    return defaults_matrix.compare(defaults_matrix.TABLE, 600, defaults_matrix.BEFORE_COMPETENCE, spelled, metric)


def _gentle_against_default(table: Path, label: str, variant: str, datasets=("mnist1d", "mnist1d-2pct")) -> str:
    """The gated net's held-out runs (seeds 80-89) of a variant tried as the default against the default's, per cell
    of the gentle protocol."""
    settings = ["uniform-0", "lt-10", "flip1-40", "flip2-40", "uniform-40", "uniform-60"]
    pair = (f"{label} - defaults", table, f"gated~{variant}", table, f"gated~{DEFAULT_VARIANT}")
    return _twin_spread([pair], list(datasets), settings, list(range(80, 90)), below=(3, 5))


def _bn_against_default(table: Path, label: str, variant: str) -> str:
    """The same on the BatchNorm CNN's paper schedule (held-out, seeds 60-69)."""
    pair = (f"{label} - defaults", table, f"gated~{variant}", table, f"gated~{DEFAULT_VARIANT}")
    return _twin_spread([pair], ["mnist1d"], S3, list(range(60, 70)), "paper", "bn", below=(3, 5))


def _bn_stability_against_default(table: Path, variant: str) -> str:
    """The stability table of the default and a variant on the same held-out BatchNorm runs."""
    rows = [f"gated~{DEFAULT_VARIANT}", f"gated~{variant}"]
    return _stability_rows(table, S3, rows, [DEFAULT_VARIANT, variant], list(range(60, 70)), holdout=10)


def _paired_rows(table: Path, settings, pairs, variants, seeds, model="bn") -> str:
    """The paired comparison of ``(row, base)`` pairs (paper schedule), with the provenance note."""
    cells = acc._cells(table, seeds, "paper", tuple(dict.fromkeys(["default", *variants])), model)
    text = _tradeoff.paired_table(cells, "mnist1d", settings, pairs)
    return text + "\n" + acc._note(cells, "mnist1d", settings, list(dict.fromkeys(m for p in pairs for m in p)))


def _paired_gentle(table: Path, datasets, settings, pairs, variants, seeds) -> str:
    """The paired comparison of ``(row, base)`` pairs on the gentle schedule's protocols, one table per dataset."""
    cells = acc._cells(table, seeds, "gentle", tuple(dict.fromkeys(["default", *variants])), "plain")
    rows = list(dict.fromkeys(m for p in pairs for m in p))
    parts = [f"{d}:\n\n" + _tradeoff.paired_table(cells, d, settings, pairs) for d in datasets]
    return "\n".join(parts) + "\n" + acc._note(cells, datasets, settings, rows)


def _curves(table: Path, settings, methods, variants, seeds, model: str) -> str:
    cells = acc._cells(table, seeds, "paper", tuple(dict.fromkeys(["default", *variants])), model)
    rows = acc._with_variants(methods, tuple(variants))
    return _tradeoff.curves_table(cells, "mnist1d", settings, rows) + "\n" + acc._note(cells, "mnist1d", settings, rows)


def _gain(table: Path) -> str:
    variants = ("default", "fast", "fast5")
    cells = acc._cells(table, SEEDS5, "gentle", variants, "plain")
    methods = ["metainfonet", "lossnet"]
    text = _tradeoff.gain_table(cells, "mnist1d", S4, methods, "default", ["fast", "fast5"])
    return text + "\n" + acc._note(cells, "mnist1d", S4, ["standard", *acc._with_variants(methods, variants)])


def _gain_current(
    table: Path, methods=("metainfonet", "gated", "lossnet"), fast=("fastnokn",), seeds=SEEDS5,
    datasets=("mnist1d", "mnist1d-2pct"), settings=("flip1-40", "flip2-40"), exact="nokn", holdout=0,
) -> str:  # fmt: skip
    """``preset="fast"`` (and other ``fast`` variants) against the exact step (``exact``: the defaults without the
    floor, ``nokn``, or with it, ``ess20``), both protocols, on the flips (``holdout``: the runs with that many
    clean samples per class held out beside the meta set)."""
    variants = (exact, *fast)
    methods = list(methods)
    cells = acc._cells(table, list(seeds), "gentle", variants, "plain", holdout)
    parts = []
    for ds in datasets:
        text = _tradeoff.gain_table(cells, ds, list(settings), methods, exact, list(fast))
        parts.append(f"{ds}:\n\n{text}")
    rows = ["standard", *acc._with_variants(methods, variants)]
    return "\n".join(parts) + "\n" + acc._note(cells, list(datasets), list(settings), rows)


def _steps(table: Path, runs: list[str]) -> str:
    return step_cost.report(table, runs)


def _ratio(rows, run, model, variant, field="ratio"):
    for r in rows:
        k = r["key"]
        if (k["run"], k["model"], k["variant"]) == (run, model, variant) and field in r["result"]:
            return r["result"][field]
    return None


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}x to {hi:.2f}x"


HEAD_FLOOR_RUNS = ("head-floor-resnet20-bn-system", "head-floor-resnet20-bn-retain")


def _head_floor(sc: Path) -> str:
    """The two ResNet-20 runs' tables and, per allocator, the head look-ahead against both floors."""
    rows = _store.latest(sc)
    lines = []
    for run in HEAD_FLOOR_RUNS:
        head = _ratio(rows, run, "resnet20", "linear_head/head/k=1")
        before = _ratio(rows, run, "resnet20", "head floor (plain + no-grad meta fwd), m=100")
        in_place = _ratio(rows, run, "resnet20", "head floor in place (fwd, no-grad meta fwd, bwd), m=100")
        lines.append(
            f"- `{run}`: `lookahead=\"head\"` {head:.2f}x a plain step; the floor in place {in_place:.2f}x "
            f"({head / in_place - 1:+.1%}); the floor with the meta forward after the step {before:.2f}x "
            f"({head / before - 1:+.1%})."
        )
    return step_cost.report(sc, list(HEAD_FLOOR_RUNS)) + "\n\n" + "\n".join(lines)


def _cost_summary(sc: Path) -> str:
    """The README's cost figures, read off the step-cost table's current runs."""
    rows = _store.latest(sc)
    ghost_runs = ["ghost-cpu-system", "ghost-cpu-retain", "ghost-cpu-system-slower-machine"]
    ghost = [_ratio(rows, r, m, "ghost/full/k=1") for r in ghost_runs for m in ("transformer", "resnet32gn")]
    models = ("transformer", "resnet32gn")
    ref = {m: [_ratio(rows, r, m, "reference flow (MW-Net code)") for r in ghost_runs] for m in models}
    fwd_bn = [_ratio(rows, "presets-cpu", "resnet32", v) for v in ("forward/full/k=1", "preset=exact")]
    k10 = [_ratio(rows, "ghost-cpu-system", m, "ghost/full/k=10") for m in ("transformer", "resnet32gn")]
    k10 += [_ratio(rows, "presets-cpu", m, "forward/full/k=10") for m in ("transformer", "resnet32")]
    fast = {m: _ratio(rows, "presets-cpu", m, "preset=fast") for m in ("transformer", "resnet32")}
    block = _ratio(rows, "ghost-cpu-block4-system", "resnet32gn", "ghost/full/k=1")
    block_retain = _ratio(rows, "ghost-cpu-block4-retain", "resnet32gn", "ghost/full/k=1")
    return (
        f"An exact meta step costs {_span([g for g in ghost if g])} a plain step with `ghost` (transformer and "
        f"GroupNorm ResNet-32; the reference flow: {_span(ref['transformer'])} and {_span(ref['resnet32gn'])}), "
        f"{_span(fwd_bn)} with `forward` (BatchNorm ResNet-32, which `auto` gives `forward`), "
        f"{_span(k10)} with `interval=10`; `preset=\"fast\"` {fast['transformer']:.2f}x (transformer) and "
        f"{fast['resnet32']:.2f}x (BatchNorm ResNet-32). On Linux CPUs, glibc's malloc hands freed memory back and "
        f"page-faults it in again every step: on the GroupNorm ResNet-32 with steps back to back `ghost` costs "
        f"{block:.2f}x with glibc's defaults and {block_retain:.2f}x with freed memory retained."
    )


def _cleanlab_cost(table: Path) -> str:
    values = []
    for ds in ("mnist1d", "mnist1d-2pct"):
        cells = acc._cells(table, SEEDS5, "gentle", ("default",), "plain")
        for s in S6:
            rel = acc._relative_cost(cells, ds, s, "cleanlab")
            if rel["passes"]:
                values.append(sum(rel["passes"]) / len(rel["passes"]))
    return _span(values)


GPU_CHECK = Path(__file__).resolve().parent / "results" / "gpu_check" / "h200-torch2.11.json"


def _gpu(path: Path = GPU_CHECK) -> str:
    """The GPU check's step-cost ratios (float32) at both batch sizes, and its machine line."""
    data = json.loads(path.read_text())
    gpu = data["machine"]["gpus"][0]["name"]
    lines = [
        f"{gpu}, torch {data['machine']['torch']}, commit {data['machine']['git_commit']} "
        f"(`{path.relative_to(path.parents[2])}`); float32, x a plain step timed beside it:",
        "",
    ]
    cells = [(b, m) for b in data["timing"] for m in data["timing"][b]["float32"]]
    lines.append("| variant | " + " | ".join(f"{m} b{b.split('=')[1]}" for b, m in cells) + " |")
    lines.append("| --- |" + " --- |" * len(cells))
    variants = list(data["timing"][cells[0][0]]["float32"][cells[0][1]])
    for v in variants:
        row = []
        for b, m in cells:
            item = data["timing"][b]["float32"][m].get(v, {})
            row.append(f"{item['ratio']:.2f}x" if "ratio" in item else "n/a")
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _class_weights() -> str:
    """benchmarks/class_weights.py's stored rows: LogitNet and MetaInfoNet, with "sum" and with "class"."""
    rows = _store.latest(class_weights.TABLE)
    order = [(m, v) for m in ("logitnet", "metainfonet") for v in ("ess20", "cls20")]
    full = [r for r in rows if not r["key"]["epochs"] and r["key"]["seed"] == 0]
    picked = [r for mv in order for r in full if (r["key"]["method"], r["key"]["variant"]) == mv]
    return "\n\n".join(class_weights.table(r) for r in picked) + "\n\n" + _store.provenance_note(picked)


def _raw_weights(seeds) -> str:
    """The stored raw-output tables of the gated net (Flip-1 40%, BN CNN, paper schedule) of ``seeds``."""
    rows = [r for r in _store.latest(raw_weights.TABLE) if r["key"]["seed"] in seeds and not r["key"]["epochs"]]
    rows.sort(key=lambda r: seeds.index(r["key"]["seed"]))
    return "\n\n".join([*map(raw_weights.table, rows), _store.provenance_note(rows)])


NETS4 = ("gated", "metainfonet", "logitnet", "lossnet")
LOGIT_NETS = ("gated", "metainfonet", "logitnet")  # the nets whose default normalisation is "class"
L2RW_SETTINGS = ["flip1-20", "flip1-40", "flip2-40", "uniform-40", "uniform-60", "lt-50"]
L2RW_VARIANTS = ["l2ess20", "l2cls20", "l2cls40", "l2cls60"]  # "sum" with L2RW's former floor, then "class" and floors
L2RW_PAIRS = [("l2rw~l2cls20", "l2rw~l2ess20"), ("l2rw~l2cls40", "l2rw~l2cls20"), ("l2rw~l2cls60", "l2rw~l2cls40")]
# a 3e-3 meta lr against the defaults (1e-3), each net at its own normalisation
M3_PAIRS = [*((f"{m}~cls20m3", f"{m}~cls20") for m in LOGIT_NETS), ("lossnet~ess20m3", "lossnet~ess20")]
M3_VARIANTS = ["cls20", "cls20m3", "ess20", "ess20m3"]
# each sample's loss history (loss_history=True) against the same net without it
HISTORY_ROWS = ("gated~cls20", "gated~cls20h", "lossnet~ess20", "lossnet~ess20h")
# the fast preset against what else costs at most 1.6x a plain step: its meta lr 3x and 12x (not 6x), the head
# look-ahead at every step and at interval 2
FAST_CHEAP = [
    "gated~fastcls20v05cw", "gated~fastm3cls20v05cw", "gated~fastm12cls20v05cw", "gated~headcls20v05cw",
    "gated~head2cls20v05cw",
]
# clean labels and light noise: each net's defaults, and the gated net without the veto
LIGHT = list(acc.LIGHT_SETTINGS)
LIGHT_ROWS = [
    "gated~cls20v05cw", "gated~cls20v05w", "gated~cls20", "metainfonet~cls20v05cw", "lossnet~ess20v05w", "finetune",
]
# long tails under the current defaults (clean labels, a balanced meta set of 10 per class): each net's defaults, the
# gated net without the veto, and normalization="sum" (the remedy ClassShareWarning names) with and without it
TAILS = ["lt-1", "lt-3", "lt-10", "lt-50"]
TAIL_ROWS = [
    "gated~cls20v05cw", "metainfonet~cls20v05cw", "logitnet~cls20v05cw", "lossnet~ess20v05w", "gated~cls20",
    "gated~ess20v05w", "metainfonet~ess20v05w", "gated~ess20",
]
EVIDENCE_ROWS = ["gated~cls20v05cw", "gated~cls20v05cwe"]  # the veto from the first update; the default, waiting
EVIDENCE_TEST = ["uniform-0", "uniform-5", "uniform-10", "flip1-10", "lt-1", "lt-3", "lt-10", "lt-50",
                 *acc.NOISY_TAIL_SETTINGS]  # fmt: skip
# the cells veto_evidence was judged on (held-out samples): both gentle protocols and the BN CNN's paper schedule
EVIDENCE_PROTOCOLS = [("gentle", "plain", ["mnist1d", "mnist1d-2pct"]), ("paper", "bn", ["mnist1d"])]
EVIDENCE_CELLS = {"gentle": ["uniform-0", "lt-3", "lt-10", *NOISE4, *acc.NOISY_TAIL_SETTINGS], "paper": S3}
HISTORY_PAIRS = [("gated~cls20h", "gated~cls20"), ("lossnet~ess20h", "lossnet~ess20")]
HISTORY_VARIANTS = ("cls20", "cls20h", "ess20", "ess20h")
# the veto as it is and against its class's (batch's) weighted mean (veto_center), every net, in pairs
CENTER_ROWS = (
    *(f"{m}~{v}{c}" for m, v in (*((n, "cls20v05") for n in LOGIT_NETS), ("lossnet", "ess20v05")) for c in ("", "c")),
    "lossnet~ess20v05", "lossnet~ess20v05k",  # LossNet within its classes (the ess20v05c rows: within the batch)
)  # fmt: skip
# the veto held off over the net's warm-up (veto_warmup=300) against it from the first step, each net's default veto
WARMUP_ROWS = (
    *(f"{m}~{v}" for n in LOGIT_NETS for m, v in ((n, "cls20v05c"), (n, "cls20v05cw"))),
    "lossnet~ess20v05", "lossnet~ess20v05w",
)  # fmt: skip
HISTORY_VETO_ROWS = ("gated~cls20v05", "gated~cls20hv05", "lossnet~ess20v05", "lossnet~ess20hv05")  # with the veto
FOLLOW_VARIANTS = ("cls20m3", "cls20m3f", "cls20f", "cls20r", "cls20p", "cls20q")
# the meta-gradient's veto at 0, 0.5, 1 and 2 times the batch's mean |c| against the same net without it
VETO_VARIANTS = ("cls20", "cls20v0", "cls20v05", "cls20v10", "ess20", "ess20v05", "ess20v10")
VETO_GATED = [f"gated~{v}" for v in VETO_VARIANTS[:4]]
VETO_LOSSNET = [f"lossnet~{v}" for v in VETO_VARIANTS[4:]]
VETO_PAIRS = [
    *((row, "gated~cls20") for row in VETO_GATED[1:]), *((row, "lossnet~ess20") for row in VETO_LOSSNET[1:]),
    *((f"{m}~cls20v05", f"{m}~cls20") for m in ("metainfonet", "logitnet")),
]
HOLDOUT = 10  # clean samples per class held out beside the meta set (accuracy.py --holdout-per-class)
# runs with the veto's evidence read at the current parameters for every net, LossNet's included (tried at 9793689,
# not adopted): the gated net's held-out cells of seeds 20-29, the BatchNorm CNN's stability cells
CURRENT_READING = acc.TABLE.parent / "evidence_current.jsonl"
README_LOOP_CURRENT = acc.TABLE.parent / "readme_loop_current.jsonl"
# the logit nets' runs with their defaults when the evidence read the meta losses at the look-ahead, as LossNet's
# does (the store's keys, now read at the current parameters), and the placebo of that library (cls20v05cweR)
LOOKAHEAD_READING = acc.TABLE.parent / "evidence_lookahead.jsonl"
# PlainTwinGuard (a plain twin beside the reweighted run, falling back to it on held-back clean samples): tried, not
# adopted. Its runs (branch twin-guard: 2819d77, 3000004; the epoch-end probe at f4ab31e), and the library default's
# and plain training's runs of the fresh seeds 50-69 made beside them
TWIN_GUARD = acc.TABLE.parent / "twin_guard.jsonl"
GUARD_SEEDS = [*range(10, 20), *range(50, 60)]  # the guard's first rule: seeds 10-19 and fresh 50-59
GUARD_STAND_DOWN_SEEDS = list(range(60, 70))  # the guard that stands down on the evidence: fresh seeds
# min_ess_until_evidence=0.8 (the floor at 0.8 of a batch until the evidence of label noise shows; tried as the
# default, kept as an option): its rule's runs are in the store (the gentle cells' fresh seeds 60-69, read against
# the default's and plain training's runs of those seeds in TWIN_GUARD; the BN CNN's seeds 10-19 and 40-49); the
# README's loop with it and with the defaults, on one machine (seeds 10-19), in two records of their own
QUIET_SEEDS = list(range(60, 70))
QUIET_GROUPS = {"clean": ["uniform-0", "lt-3", "lt-10"], "noisy": [*NOISE4, *acc.NOISY_TAIL_SETTINGS]}
README_LOOP_QUIET = acc.TABLE.parent / "readme_loop_quiet.jsonl"
README_LOOP_QUIET_DEFAULTS = acc.TABLE.parent / "readme_loop_quiet_defaults.jsonl"
# the floor fading as the evidence's level rises (a probe on branch quiet-fade, b0d880f, variant cls20v05cweq80f):
# its runs, the default's BN runs of seeds 20-29 made beside them, and its README's loop
QUIET_FADE = acc.TABLE.parent / "quiet_fade.jsonl"
README_LOOP_QUIET_FADE = acc.TABLE.parent / "readme_loop_quiet_fade.jsonl"
# LossNet's evidence latched only after the veto's warm-up (built at 9b116b7, reverted): the README's loop with it
# and, on the same machine, with the defaults (4d1f4d7), LossNet and plain training only
README_LOOP_LATCH = acc.TABLE.parent / "readme_loop_latch.jsonl"
README_LOOP_LATCH_BEFORE = acc.TABLE.parent / "readme_loop_latch_before.jsonl"
# LossNet with a floor of 0.4 / 0.5 of the batch (variants ess40v05we, ess50v05we): the README's loop with 0.4
README_LOOP_LOSSNET_FLOOR = acc.TABLE.parent / "readme_loop_lossnet_floor.jsonl"
LOSSNET_FLOOR_SEEDS = list(range(10, 20))
# the floor of 0.5 continued on an AMD EPYC (rows of another CPU do not reproduce here): its 2% cells, the defaults
# beside it, and the README's loop of both
LOSSNET_FLOOR_AMD = acc.TABLE.parent / "lossnet_floor_amd.jsonl"
README_LOOP_LOSSNET_FLOOR50 = acc.TABLE.parent / "readme_loop_lossnet_floor50.jsonl"
README_LOOP_LOSSNET_DEFAULTS_AMD = acc.TABLE.parent / "readme_loop_lossnet_defaults_amd.jsonl"
# the fading floor as the default, its rule's runs: the gentle cells' seeds 50-59 (the default and plain training
# there in TWIN_GUARD), the BN CNN's seeds 30-49 (uniform-0: 30-39), then fresh BN seeds 50-69 for the held-out
# fall measured less noisily (an addendum written after the rule's outcome)
FADE = "gated~cls20v05cweq80f"
FADE_RULE_SEEDS = list(range(50, 60))
FADE_RULE_SEEDS_BN = list(range(30, 50))
FADE_FRESH_SEEDS_BN = list(range(50, 70))
# its third rule (non-inferiority within a margin): fresh gentle seeds 80-89, the BN CNN's clean seeds 70-79
FADE_THIRD_SEEDS = list(range(80, 90))
FADE_THIRD_SEEDS_BN = list(range(70, 80))
# runs made again on the machine of the fading floor's runs, for pairs of one machine (runs of a seed diverge across
# CPUs, and the store's rows of these keys were made on another one): the defaults without the floor (the gated net,
# MetaInfoNet, LogitNet, the fast preset), plain training, fine-tuning, LossNet and L2RW; read after the store's,
# replacing them
SAME_MACHINE = acc.TABLE.parent / "defaults_same_machine.jsonl"
Tables = Path | tuple[Path, ...]  # one result table, or several read as one (accuracy._cells)


def _holdout(table: Path, settings, groups: list[tuple[list[str], str]], variants, seeds, model="bn") -> str:
    """The held-out set's table (paper schedule) of each ``(rows, base)`` group, with the provenance note."""
    cells = acc._cells(table, seeds, "paper", tuple(dict.fromkeys(["default", *variants])), model, HOLDOUT)
    text = "\n".join(_tradeoff.holdout_table(cells, "mnist1d", settings, rows, base) for rows, base in groups)
    return text + "\n" + acc._note(cells, "mnist1d", settings, [r for rows, _ in groups for r in rows])


def _against_plain(table: Path, protocols, rows: list[str]) -> str:
    """Every stored run of each row (``method~variant``) against plain training of the same seed and cell, per
    protocol ``(label, schedule, model, datasets, settings, seeds, holdout)``: how many pairs, how many end below
    plain training (test accuracy over the last 10% of epochs) and the smallest margin with its cell and seed."""
    variants = tuple(dict.fromkeys(r.split("~")[1] for r in rows))
    lines = [
        "| protocol | row | pairs | below plain training | smallest margin (points) |",
        "| --- | --- | --- | --- | --- |",
    ]
    used = []
    for label, schedule, model, datasets, settings, seeds, holdout in protocols:
        cells = acc._cells(table, seeds, schedule, variants, model, holdout)
        for row in rows:
            margins = []
            for d in datasets:
                for st in settings:
                    plain = {r["key"]["seed"]: r for r in cells.get((d, st, "standard"), [])}
                    for r in cells.get((d, st, row), []):
                        if r["key"]["seed"] in plain:
                            base = plain[r["key"]["seed"]]
                            used += [r, base]
                            gap = 100 * (r["result"]["last"] - base["result"]["last"])
                            margins.append((gap, f"{d} {st} seed {r['key']['seed']}"))
            if margins:
                low = min(margins)
                below = sum(g < 0 for g, _ in margins)
                lines.append(f"| {label} | {row} | {len(margins)} | {below} | {low[0]:+.1f} ({low[1]}) |")
    unique = list({id(r): r for r in used}.values())
    return "\n".join(lines) + "\n\n" + _store.provenance_note(unique)


def _paired_plain(
    table: Path, datasets, settings, rows: list[str], seeds, holdout: int = 0, schedule="gentle", model="plain"
) -> str:
    """Each row (``method~variant``) against plain training of the same seed, per dataset and setting: both
    means, the paired difference of the test accuracy over the last 10% of epochs (with ``holdout``: of the
    held-out accuracy) with its standard error, the seeds below plain training and the worst."""
    variants = tuple(dict.fromkeys(r.split("~")[1] for r in rows if "~" in r))
    cells = acc._cells(table, seeds, schedule, variants, model, holdout)

    def last(r: dict) -> float:  # the run's "last" (after fine-tuning, for Fine-tune), or the held-out set's
        if not holdout:
            return 100 * r["result"]["last"]
        return 100 * _tradeoff._tail_mean(r["result"]["holdout_acc"])

    lines = [
        "| dataset | setting | row | seeds | plain training | row | difference | seeds below | worst seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in datasets:
        for st in settings:
            plain = {r["key"]["seed"]: r for r in cells.get((d, st, "standard"), [])}
            for row in rows:
                pairs = [(last(r), last(plain[r["key"]["seed"]])) for r in cells.get((d, st, row), [])
                         if r["key"]["seed"] in plain]  # fmt: skip
                if not pairs:
                    continue
                gap = np.array([a - b for a, b in pairs])
                se = gap.std(ddof=1) / math.sqrt(len(gap)) if len(gap) > 1 else float("nan")
                lines.append(
                    f"| {d} | {st} | {row} | {len(gap)} | {np.mean([b for _, b in pairs]):.1f} | "
                    f"{np.mean([a for a, _ in pairs]):.1f} | {gap.mean():+.2f} ± {se:.2f} | {int((gap < 0).sum())} | "
                    f"{gap.min():+.1f} |"
                )
    return "\n".join(lines) + "\n\n" + acc._note(cells, list(datasets), list(settings), ["standard", *rows])


def _holdout_pooled(table: Path, protocols, settings, groups: list[tuple[list[str], str]], variants, seeds) -> str:
    """The held-out set's table over several protocols at once (``(schedule, model, datasets)`` each), every
    (protocol, dataset, setting) a row of the table and "all" pooling them, with the provenance note."""
    merged: dict[tuple, list[dict]] = {}
    labels, notes = [], []
    for schedule, model, datasets in protocols:
        cells = acc._cells(table, seeds, schedule, tuple(dict.fromkeys(["default", *variants])), model, HOLDOUT)
        tag = "" if schedule == "gentle" else f" ({model}, {schedule})"
        for ds in datasets:
            for s in settings[schedule]:
                label = f"{ds}{tag} {s}"
                labels.append(label)
                for rows, _ in groups:
                    for row in rows:
                        merged[("all", label, row)] = cells.get((ds, s, row), [])
        named = [r for rows, _ in groups for r in rows]
        notes.append(acc._note(cells, list(datasets), list(settings[schedule]), named))
    text = "\n".join(_tradeoff.holdout_table(merged, "all", labels, rows, base) for rows, base in groups)
    return text + "\n" + "\n".join(notes)


def _final_accuracy(run: dict, holdout: int) -> float:
    """A run's accuracy (%) over the last 10% of epochs: on its held-out samples with ``holdout``, else the test's."""
    return 100 * (_tradeoff._tail_mean(run["result"]["holdout_acc"]) if holdout else run["result"]["last"])


def _twin_spread(
    pairs: list[tuple[str, Tables, str, Tables, str]], datasets, settings, seeds, schedule="gentle", model="plain",
    holdout: int = HOLDOUT, below: tuple[int, int] = (4, 5), pooled: dict[str, list[str]] | None = None,
) -> str:  # fmt: skip
    """How far paired runs of the same seeds end apart, per cell and per pair ``(label, table, row, base_table,
    base_row)``: the mean paired difference (accuracy over the last 10% of epochs, held-out with ``holdout``, else
    test) with its standard error (``*``: below by more than two), the differences' standard deviation, the lowest
    seed's, and the seeds more than ``below`` points below their twins; then each pair over the cells of each
    ``pooled`` group of settings (``{"clean": [...]}``), and over all its cells."""
    lo, hi = below
    lines = [
        "| dataset | setting | pair | seeds | difference | sd of the differences | lowest seed | seeds > "
        f"{lo} below | seeds > {hi} below |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def variants(row: str) -> tuple[str, ...]:
        return (row.split("~")[1],) if "~" in row else ()

    loaded = [
        (label, acc._cells(t, seeds, schedule, variants(row), model, holdout), row,
         acc._cells(bt, seeds, schedule, variants(base_row), model, holdout), base_row)
        for label, t, row, bt, base_row in pairs
    ]  # fmt: skip
    every: dict[str, list[np.ndarray]] = {}
    grouped: dict[tuple[str, str], list[np.ndarray]] = {}
    used, across = [], {}
    for d in datasets:
        for st in settings:
            for label, cells, row, base_cells, base_row in loaded:
                a = {r["key"]["seed"]: r for r in cells.get((d, st, row), [])}
                b = {r["key"]["seed"]: r for r in base_cells.get((d, st, base_row), [])}
                both = sorted(a.keys() & b.keys())
                if len(both) < 2:
                    continue
                used += [a[k] for k in both] + [b[k] for k in both]
                cpus = [(a[k]["provenance"].get("cpu"), b[k]["provenance"].get("cpu")) for k in both]
                across[label] = across.get(label, 0) + sum(x is not None and y is not None and x != y for x, y in cpus)
                gap = np.array([_final_accuracy(a[k], holdout) - _final_accuracy(b[k], holdout) for k in both])
                every.setdefault(label, []).append(gap)
                for group, members in (pooled or {}).items():
                    if st in members:
                        grouped.setdefault((group, label), []).append(gap)
                se = gap.std(ddof=1) / math.sqrt(len(gap))
                lines.append(
                    f"| {d} | {st} | {label} | {len(both)} | {gap.mean():+.2f} ± {se:.2f}"
                    f"{'*' if gap.mean() < -2 * se else ''} | {gap.std(ddof=1):.2f} | "
                    f"{gap.min():+.1f} (seed {both[gap.argmin()]}) | {(gap < -lo).sum()} | {(gap < -hi).sum()} |"
                )
    for (group, label), gaps in [*grouped.items(), *((("all", label), gaps) for label, gaps in every.items())]:
        flat = np.concatenate(gaps)
        low = sum(g.mean() < -2 * g.std(ddof=1) / math.sqrt(len(g)) for g in gaps)
        lines.append(
            f"| {group} | {len(gaps)} cells ({low} below by 2 SE) | {label} | {len(flat)} runs | {flat.mean():+.2f} | "
            f"{np.sqrt(np.mean([g.var(ddof=1) for g in gaps])):.2f} | {flat.min():+.1f} | {(flat < -lo).sum()} | "
            f"{(flat < -hi).sum()} |"
        )
    crossed = [f"{label}: {n}" for label, n in across.items() if n]
    note = _store.provenance_note(used)
    if crossed:  # runs of one seed diverge across CPUs: such a pair measures the machines too
        note += "\nPairs whose two runs were made on different CPUs: " + ", ".join(crossed) + "."
    return "\n".join(lines) + "\n\n" + note


def _held_pairs(
    row: str, table: Tables, base: str, base_table: Tables, plain_table: Tables, name: str = "held"
) -> list:
    """:func:`_twin_spread`'s pairs for ``min_ess_until_evidence``: ``row`` (the floor, called ``name``) and ``base``
    (the same defaults without it) each against plain training, and ``row`` against ``base``."""
    return [
        (f"{name} - plain training", table, row, plain_table, "standard"),
        ("before - plain training", base_table, base, plain_table, "standard"),
        (f"{name} - before", table, row, base_table, base),
    ]


def _holdout_drops(tables: Tables, settings, rows: list[str], seeds, smooth: tuple[int, ...] = (1, 3)) -> str:
    """The late fall on held-out samples (BN CNN, paper schedule) per cell and row: the best of the held-out curve
    (its ``k``-epoch moving average for each ``k`` in ``smooth``) less the mean of its last 10% of epochs, as the
    mean over seeds, the seeds more than 4 below their best and the largest fall. The held-out set is 10 samples
    per class, so a one-epoch best carries its sampling noise; a moving average carries less of it."""
    cells = acc._cells(tables, seeds, "paper", tuple(dict.fromkeys(r.split("~")[1] for r in rows)), "bn", HOLDOUT)
    heads = "".join(f" best of {k} epoch{'s' if k > 1 else ''} - last: mean | > 4 | largest |" for k in smooth)
    lines = [f"| setting | row | seeds |{heads}", "| --- | --- | --- |" + " --- | --- | --- |" * len(smooth)]
    used = []
    for st in settings:
        for row in rows:
            runs = cells.get(("mnist1d", st, row), [])
            if not runs:
                continue
            used += runs
            parts = []
            for k in smooth:
                falls = []
                for r in runs:
                    h = 100 * np.asarray(r["result"]["holdout_acc"], dtype=float)
                    tail = max(1, math.ceil(0.1 * len(h)))
                    falls.append(np.convolve(h, np.ones(k) / k, mode="valid").max() - h[-tail:].mean())
                f = np.array(falls)
                parts.append(f"{f.mean():.2f} | {int((f > 4).sum())} | {f.max():.1f}")
            lines.append(f"| {st} | {row} | {len(runs)} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n\n" + _store.provenance_note(used)


def _ess_without_evidence(table: Path, protocols, row: str, seeds) -> str:
    """Per clean cell of ``protocols`` (``(schedule, model, datasets, settings)``), the runs of ``row`` whose
    evidence of label noise never showed and the lowest epoch mean of their batches' effective sample size (share
    of the batch): its median over those runs and its lowest."""
    lines = [
        "| dataset | setting | model, schedule | runs | evidence never shown | lowest epoch-mean ESS: median "
        "| lowest |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    used = []
    for schedule, model, datasets, settings in protocols:
        cells = acc._cells(table, seeds, schedule, (row.split("~")[1],), model, 0)
        for d in datasets:
            for st in settings:
                runs = cells.get((d, st, row), [])
                used += runs
                quiet = [r for r in runs if not any(r["result"]["curves"]["veto_acts"])]
                lowest = [min(r["result"]["curves"]["ess_mean"]) for r in quiet]
                if lowest:
                    lines.append(
                        f"| {d} | {st} | {model}, {schedule} | {len(runs)} | {len(quiet)} | "
                        f"{float(np.median(lowest)):.2f} | {min(lowest):.2f} |"
                    )
    return "\n".join(lines) + "\n\n" + _store.provenance_note(used)


def _readme_loop_quiet(
    columns: list[tuple[str, Path]], seeds: list[int] | None = None, nets: tuple[str, ...] = readme_loop.NETS,
    by_evidence: bool = False,
) -> str:  # fmt: skip
    """The README's loop (``benchmarks/readme_loop.py``, lr 0.1) of each ``(label, record)`` in ``columns`` (each
    net's defaults, ``min_ess_until_evidence``, ...), the same seeds on one machine: per labels and net (of
    ``nets``), the mean difference from plain training of the same seed (points of test accuracy), the lowest, the
    runs below it and the runs that showed the evidence of label noise, with ``by_evidence`` also the mean over the
    runs that showed it and over those that did not; the seeds every record holds (of ``seeds``, if given)."""
    runs = {}
    for name, path in columns:
        for r in _store.latest(path):
            k = r["key"]
            runs[(name, k["noise"], k["seed"], k["net"])] = r
    shared = set.intersection(*({k[2] for k in runs if k[0] == name} for name, _ in columns))
    seeds = sorted(shared if seeds is None else shared & set(seeds))
    split = " shown: against plain | not shown: against plain |" if by_evidence else ""
    head = "".join(f" {name}: against plain (lowest) | below plain | evidence shown |{split}" for name, _ in columns)
    width = 5 if by_evidence else 3
    lines = [f"| labels | net | seeds |{head}", "| --- | --- | --- |" + " --- |" * width * len(columns)]
    used = []
    for noise in sorted({k[1] for k in runs}):
        for net in nets:
            cells = []
            for name, _ in columns:
                pairs = [(runs[(name, noise, s, net)], runs[(name, noise, s, "plain")]) for s in seeds]
                used += [r for pair in pairs for r in pair]
                d = np.array([100 * (a["result"]["test"] - b["result"]["test"]) for a, b in pairs])
                shown = np.array([a["result"]["shown"] for a, _ in pairs], dtype=bool)
                cell = f"{d.mean():+.2f} ({d.min():+.1f}) | {(d < 0).sum()} | {shown.sum()}"
                if by_evidence:
                    cell += "".join(f" | {d[m].mean():+.2f}" if m.any() else " | –" for m in (shown, ~shown))
                cells.append(cell)
            label = "clean" if noise == 0 else f"{noise:.0%} random"
            lines.append(f"| {label} | {net} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _store.provenance_note(used)


def _guard_fallbacks(tables: Tables, datasets, settings, row: str, seeds, holdout: int = HOLDOUT) -> str:
    """The guard's runs (``row``, a ``PlainTwinGuard`` variant) per cell: how many fell back to the plain twin and
    at which steps and how they ended against plain training of the same seed (a fallen-back run trains plainly, on
    another order of the batches), how many stood down on the evidence of label noise, and the runs' sample passes
    (:func:`_cost.passes`) over plain training's of the same seeds."""
    cells = acc._cells(tables, seeds, "gentle", (row.split("~")[1],), "plain", holdout)
    lines = [
        "| dataset | setting | runs | fell back | at steps (median, range) | fallen back - plain training | stood down "
        "| sample passes over plain training's |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    used, totals, fallen = [], [0, 0, 0, 0.0], []
    for d in datasets:
        for st in settings:
            runs = cells.get((d, st, row), [])
            plain = {r["key"]["seed"]: r for r in cells.get((d, st, "standard"), [])}
            if not runs:
                continue
            used += runs
            steps = [s for s in (r["result"]["guard"]["fell_back_at"] for r in runs) if s is not None]
            gaps = [_final_accuracy(r, holdout) - _final_accuracy(plain[r["key"]["seed"]], holdout) for r in runs
                    if r["result"]["guard"]["fell_back_at"] is not None and r["key"]["seed"] in plain]  # fmt: skip
            fallen += gaps
            down = sum(r["result"]["guard"].get("stood_down_at") is not None for r in runs)
            ratios = [_cost.passes(r["result"]) / _cost.passes(plain[r["key"]["seed"]]["result"]) for r in runs
                      if r["key"]["seed"] in plain]  # fmt: skip
            at = f"{int(np.median(steps))} ({min(steps)}-{max(steps)})" if steps else "-"
            ratio = f"{np.mean(ratios):.2f}x" if ratios else "-"
            totals = [totals[0] + len(runs), totals[1] + len(steps), totals[2] + down, totals[3] + sum(ratios)]
            gap = f"{np.mean(gaps):+.1f} (lowest {min(gaps):+.1f})" if gaps else "-"
            lines.append(f"| {d} | {st} | {len(runs)} | {len(steps)} | {at} | {gap} | {down} | {ratio} |")
    spread = f"{np.mean(fallen):+.2f}, sd {np.std(fallen, ddof=1):.2f}" if len(fallen) > 1 else "-"
    lines.append(
        f"| all | | {totals[0]} | {totals[1]} | | {spread} | {totals[2]} | {totals[3] / max(totals[0], 1):.2f}x |"
    )
    return "\n".join(lines) + "\n\n" + _store.provenance_note(used)


def _reading_pairs(
    now_table: Tables, then_table: Tables, datasets, settings, rows: list[str], seeds, schedule="gentle",
    model="plain", holdout: int = HOLDOUT, clean=("uniform-0", "lt-3", "lt-10"),
) -> str:  # fmt: skip
    """Each row (``method~variant``) with the veto's evidence read at the current parameters (``now_table``'s runs)
    against the same keys read at the look-ahead (``then_table``'s): per cell the accuracy over the last 10% of
    epochs (held-out with ``holdout``, else test), the paired difference with its standard error (``*``: below by
    more than two) and the lowest seed's, the runs where the veto started in each, and the largest drop from a
    run's best epoch (test accuracy); then the cells' mean differences pooled, clean and noisy."""
    variants = tuple(dict.fromkeys(r.split("~")[1] for r in rows))
    now, then = (acc._cells(t, seeds, schedule, variants, model, holdout) for t in (now_table, then_table))

    def started(runs: list[dict]) -> int:
        return sum(1.0 in r["result"]["curves"].get("veto_acts", []) for r in runs)

    def drop(runs: list[dict]) -> float:
        return max(100 * (max(r["result"]["test_acc"]) - r["result"]["last"]) for r in runs)

    lines = [
        "| dataset | setting | row | seeds | at the look-ahead | at the current parameters | difference | lowest seed "
        "| veto started | largest drop from the best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    pooled: dict[tuple[str, str], list[float]] = {}
    used = []
    for d in datasets:
        for st in settings:
            for row in rows:
                a = {r["key"]["seed"]: r for r in now.get((d, st, row), [])}
                b = {r["key"]["seed"]: r for r in then.get((d, st, row), [])}
                both = sorted(a.keys() & b.keys())
                if not both:
                    continue
                ra, rb = [a[k] for k in both], [b[k] for k in both]
                used += ra + rb
                gap = np.array([_final_accuracy(x, holdout) - _final_accuracy(y, holdout) for x, y in zip(ra, rb)])
                se = gap.std(ddof=1) / math.sqrt(len(gap)) if len(gap) > 1 else float("nan")
                pooled.setdefault((row, "clean" if st in clean else "noisy"), []).append(gap.mean())
                lines.append(
                    f"| {d} | {st} | {row} | {len(both)} | {np.mean([_final_accuracy(y, holdout) for y in rb]):.1f} | "
                    f"{np.mean([_final_accuracy(x, holdout) for x in ra]):.1f} | {gap.mean():+.2f} ± {se:.2f}"
                    f"{'*' if gap.mean() < -2 * se else ''} | {gap.min():+.1f} (seed {both[gap.argmin()]}) | "
                    f"{started(ra)} of {len(both)} (was {started(rb)}) | "
                    f"{drop(ra):.1f} (was {drop(rb):.1f}) |"
                )
    for (row, kind), means in pooled.items():
        lines.append(f"| pooled | {kind} ({len(means)} cells) | {row} | | | | {np.mean(means):+.2f} | | | |")
    return "\n".join(lines) + "\n\n" + _store.provenance_note(used)


def _veto_onset(table: Path, protocols, rows: list[str]) -> str:
    """When the veto started acting in each run of ``rows`` (``veto_evidence``: the epoch at whose end the evidence
    of label noise was first shown, from the runs' ``veto_acts`` curve), per protocol ``(label, schedule, model,
    datasets, settings, seeds, holdout)`` and setting: runs, runs where it acted, and the first, median and last
    epoch it started at (of the schedule's epochs)."""
    variants = tuple(dict.fromkeys(r.split("~")[1] for r in rows))
    lines = ["| protocol | dataset | setting | row | runs | veto acted | started (epoch: first / median / last) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    used = []
    for label, schedule, model, datasets, settings, seeds, holdout in protocols:
        cells = acc._cells(table, seeds, schedule, variants, model, holdout)
        for d in datasets:
            for st in settings:
                for row in rows:
                    runs = cells.get((d, st, row), [])
                    if not runs:
                        continue
                    used += runs
                    acts = [r["result"]["curves"].get("veto_acts", []) for r in runs]
                    starts = [1 + a.index(1.0) for a in acts if 1.0 in a]
                    epochs = len(runs[0]["result"]["test_acc"])
                    when = f"{min(starts)} / {int(np.median(starts))} / {max(starts)} (of {epochs})" if starts else "–"
                    lines.append(f"| {label} | {d} | {st} | {row} | {len(runs)} | {len(starts)} | {when} |")
    return "\n".join(lines) + "\n\n" + _store.provenance_note(list({id(r): r for r in used}.values()))


def renderers(table: Path = acc.TABLE, sc: Path = step_cost.TABLE) -> dict[str, Callable[[], str]]:
    both = ["mnist1d", "mnist1d-2pct"]
    return {
        # docs/results.md
        "guide": lambda: acc.guide_report(table, both, S6, M, SEEDS5, "gentle", ("default", "exact", "fast"), "plain"),
        "grid": lambda: _acc(table, ["mnist1d", "digits"], acc.SETTINGS, acc.METHODS, [0, 1, 2]),
        "lambda": lambda: _lambda(table),
        "grid-5-seeds": lambda: _acc(table, ["mnist1d", "digits"], acc.SETTINGS, acc.METHODS, SEEDS5),
        "protocol2": lambda: _acc(table, ["mnist1d-2pct"], S6, M, SEEDS5, ("exact",), cost=True),
        "protocol2-fast": lambda: _acc(table, ["mnist1d-2pct"], S4, FAST_METHODS, SEEDS5, ("fast",), cost=True),
        "protocol1-alternatives": lambda: _acc(table, ["mnist1d"], S6, P1_METHODS, SEEDS5, cost=True),
        "protocol1-fast": lambda: _acc(table, ["mnist1d"], S4, FAST_METHODS, SEEDS5, ("fast",), cost=True),
        "gce-paper": lambda: _acc(table, ["mnist1d"], S4, ["standard", "finetune", "gce"], SEEDS5, schedule="paper"),
        "cleanlab-cost": lambda: (
            f"cleanlab's cost, over the cells of both protocols: {_cleanlab_cost(table)} Standard's sample passes "
            "(five fold models and the retraining)."
        ),
        "fast-screen": lambda: _stability(
            table, ["flip1-40", "flip2-40"], ["metainfonet"], ["kl0", "k3m", "k5", "k5m", "k10m", "head", "headm"],
            [0, 1, 2],
        ),
        "fast-rescreen": lambda: _stability(
            table, ["flip1-40", "flip2-40"], ["metainfonet"], ["default", "fast5", "k5m10", "k6m"], [0, 1, 2]
        ),
        "fast-keeps": lambda: _gain(table),
        "fast-keeps-current": lambda: _gain_current(table),
        "fast-screen-gated": lambda: _gain_current(table, ["gated"], ("fastnokn", "f6m3", "f6m9")),
        "fast-gated-ten-seeds": lambda: _gain_current(
            table, ["gated"], ("fastnokn",), range(10), ("mnist1d-2pct",), ("flip2-40",)
        ),
        "fast-gated-floor": lambda: _gain_current(table, ["gated"], ("fastess20",), exact="ess20")
        + "\n\n"
        + _gain_current(table, ["gated"], ("fastess20",), range(10), ("mnist1d-2pct",), ("flip2-40",), exact="ess20"),
        "fast-gated-class": lambda: _gain_current(
            table, ["gated"], ("fastcls20",), settings=("flip1-40", "flip2-40", "uniform-40"), exact="cls20"
        )
        + "\n\n"
        + _gain_current(table, ["gated"], ("fastcls20",), range(10), ("mnist1d-2pct",), ("flip2-40",), exact="cls20"),
        "fast-screen-class": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40"],
            [("gated~f6m9cls20", "gated~fastcls20"), ("gated~f6m7cls20", "gated~fastcls20")],
            ["fastcls20", "f6m9cls20", "f6m7cls20"], SEEDS5,
        )
        + "\n\n"
        + _gain_current(table, ["gated"], ("fastcls20", "f6m9cls20"), range(10), ("mnist1d-2pct",), ("flip2-40",),
                        exact="cls20"),
        "preset-cost": lambda: _steps(sc, ["presets-cpu"]),
        "preset-passes": lambda: acc.cost_report(
            table, ["mnist1d"], S4, ["standard", "finetune", "metainfonet", "lossnet"], SEEDS5, "gentle",
            ("default", "fast"), "plain",
        ),
        "collapse-plain": lambda: _stability(
            table, ["flip1-40", "flip2-40"], ["standard", "l2rw", "lossnet", "logitnet", "metainfonet"],
            ["default", "kl0"], SEEDS5, "paper",
        ),
        "stability-defaults": lambda: _stability_rows(
            table, S3,
            [f"{m}~{v}" for v in ("ess20", "nokn") for m in ("gated", "metainfonet", "logitnet", "lossnet")]
            + ["l2rw~l2ess20", "l2rw"],
            ["nokn", "ess20", "l2ess20"], list(range(10)),
        ),
        "guide-current": lambda: acc.guide_report(
            (table, SAME_MACHINE), both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            ["standard", "finetune", "lossnet~ess20v05we",
             *(f"{m}~cls20v05cweq80f" for m in ("logitnet", "metainfonet", "gated")), "l2rw~l2cls40"],
            SEEDS5, "gentle", ("cls20v05cweq80f", "ess20v05we", "l2cls40"), "plain", default=FADE,
        ),
        "competence-guide-pairs": lambda: _twin_spread(
            [(f"{m}: waiting for competence - defaults", table, f"{m}~{v}k45", (table, SAME_MACHINE), f"{m}~{v}")
             for m, v in (*((m, "cls20v05cweq80f") for m in LOGIT_NETS), ("lossnet", "ess20v05we"))],
            both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"], SEEDS5, holdout=0, below=(3, 5),
        ),
        "guide-before-fade": lambda: acc.guide_report(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            ["standard", "finetune", "lossnet~ess20v05we",
             *(f"{m}~cls20v05cwe" for m in ("logitnet", "metainfonet", "gated")), "l2rw~l2cls40"],
            SEEDS5, "gentle", ("cls20v05cwe", "ess20v05we", "l2cls40"), "plain", default="gated~cls20v05cwe",
        ),
        "fade-default-guide-pairs": lambda: _twin_spread(
            [(f"{m}: fading - before", table, f"{m}~cls20v05cweq80f", (table, SAME_MACHINE), f"{m}~cls20v05cwe")
             for m in LOGIT_NETS],
            both, NOISE4, SEEDS5, holdout=0, below=(3, 5),
        ),
        "fade-default-fast-pairs": lambda: _twin_spread(
            [("fast: fading - before", table, "gated~fastcls20v05cweq80f", (table, SAME_MACHINE),
              "gated~fastcls20v05cwe")],
            both, NOISE4, list(range(10, 20)), below=(3, 5),
        ),  # fmt: skip
        "fade-default-clean-test": lambda: _twin_spread(
            [("fading - plain training", table, FADE, (table, SAME_MACHINE), "standard"),
             ("before - plain training", (table, SAME_MACHINE), "gated~cls20v05cwe", (table, SAME_MACHINE), "standard"),
             ("fading - before", table, FADE, (table, SAME_MACHINE), "gated~cls20v05cwe")],
            both, ["uniform-0", "lt-1", "lt-3"], list(range(10)), holdout=0, below=(3, 5),
        ),  # fmt: skip
        "fade-default-clean-test-nets": lambda: _twin_spread(
            [pair for m in ("metainfonet", "logitnet") for pair in (
                (f"{m}: fading - plain training", table, f"{m}~cls20v05cweq80f", (table, SAME_MACHINE), "standard"),
                (f"{m}: before - plain training", (table, SAME_MACHINE), f"{m}~cls20v05cwe", (table, SAME_MACHINE),
                 "standard"))],
            both, ["uniform-0", "lt-1", "lt-3"], list(range(10)), holdout=0, below=(3, 5),
        ),  # fmt: skip
        "fade-default-stability-pairs": lambda: _twin_spread(
            [(f"{m}: fading - before", table, f"{m}~cls20v05cweq80f", (table, SAME_MACHINE), f"{m}~cls20v05cwe")
             for m in LOGIT_NETS],
            ["mnist1d"], S3, list(range(10)), "paper", "bn", holdout=0, below=(3, 5),
        ),
        "guide-before-evidence": lambda: acc.guide_report(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            ["standard", "finetune", "lossnet~ess20v05w",
             *(f"{m}~cls20v05cw" for m in ("logitnet", "metainfonet", "gated")), "l2rw~l2cls40"],
            SEEDS5, "gentle", ("cls20v05cw", "ess20v05w", "l2cls40"), "plain", default="gated~cls20v05cw",
        ),
        "guide-before-warmup": lambda: acc.guide_report(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            ["standard", "finetune", "lossnet~ess20v05",
             *(f"{m}~cls20v05c" for m in ("logitnet", "metainfonet", "gated")), "l2rw~l2cls40"],
            SEEDS5, "gentle", ("cls20v05c", "ess20v05", "l2cls40"), "plain", default="gated~cls20v05c",
        ),
        "guide-before-center": lambda: acc.guide_report(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            ["standard", "finetune", "lossnet~ess20v05",
             *(f"{m}~cls20v05" for m in ("logitnet", "metainfonet", "gated")), "l2rw~l2cls40"],
            SEEDS5, "gentle", ("cls20v05", "ess20v05", "l2cls40"), "plain", default="gated~cls20v05",
        ),
        "guide-before-veto": lambda: acc.guide_report(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            ["standard", "finetune", "lossnet~ess20", *(f"{m}~cls20" for m in ("logitnet", "metainfonet", "gated")),
             "l2rw~l2cls40"],
            SEEDS5, "gentle", ("cls20", "ess20", "l2cls40"), "plain", default="gated~cls20",
        ),
        "class-paired": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            [(f"{m}~cls20", f"{m}~ess20") for m in NETS4], ["ess20", "cls20"], SEEDS5,
        ),
        "class-long-tail": lambda: _acc(
            table, ["mnist1d-2pct"], ["lt-50"], ["standard", *NETS4], SEEDS5, ("ess20", "cls20")
        ),
        "stability-class": lambda: _stability_rows(
            table, S3,
            [*(f"{m}~cls20v05cweq80f" for m in LOGIT_NETS), "lossnet~ess20v05we", "l2rw~l2cls40",
             *(f"{m}~cls20v05cwe" for m in LOGIT_NETS),
             *(f"{m}~cls20v05cw" for m in LOGIT_NETS), "lossnet~ess20v05w", *(f"{m}~cls20v05c" for m in LOGIT_NETS),
             "lossnet~ess20v05", *(f"{m}~cls20" for m in LOGIT_NETS), "lossnet~ess20"],
            ["cls20v05cweq80f", "cls20v05cwe", "ess20v05we", "cls20v05cw", "cls20v05c", "ess20v05w", "ess20v05",
             "l2cls40", "cls20", "ess20"],
            list(range(10)),
        ),  # fmt: skip
        "veto-warmup-bn": lambda: _stability_rows(
            table, S3, [*(f"{m}~cls20v05w" for m in LOGIT_NETS), "lossnet~ess20v05w"], ["cls20v05w", "ess20v05w"],
            list(range(10)),
        ),
        "veto-warmup-bn-paired": lambda: _paired_rows(
            table, S3,
            [*((f"{m}~cls20v05w", f"{m}~cls20v05") for m in LOGIT_NETS), ("lossnet~ess20v05w", "lossnet~ess20v05")],
            ["cls20v05", "cls20v05w", "ess20v05", "ess20v05w"], list(range(10)),
        ),
        "veto-warmup-gentle-paired": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            [*((f"{m}~cls20v05w", f"{m}~cls20v05") for m in LOGIT_NETS), ("lossnet~ess20v05w", "lossnet~ess20v05")],
            ["cls20v05", "cls20v05w", "ess20v05", "ess20v05w"], SEEDS5,
        ),
        "l2rw-class-bn": lambda: _stability_rows(
            table, S3, ["standard", *(f"l2rw~{v}" for v in L2RW_VARIANTS)], L2RW_VARIANTS, list(range(10))
        ),
        "l2rw-class-bn-paired": lambda: _paired_rows(table, S3, L2RW_PAIRS, L2RW_VARIANTS, list(range(10))),
        "gated-floor40-bn": lambda: _paired_rows(
            table, S3, [("gated~cls40", "gated~cls20")], ["cls20", "cls40"], list(range(10))
        ),
        "l2rw-class-wide": lambda: _stability_rows(
            table, ["flip1-40", "uniform-40"], ["standard", "gated~cls20", "l2rw~l2cls40"], ["cls20", "l2cls40"],
            SEEDS5, "bnwide", fit=True,
        ),
        "l2rw-class-gentle": lambda: _acc(table, both, L2RW_SETTINGS, ["standard", "l2rw"], SEEDS5, L2RW_VARIANTS),
        "l2rw-class-gentle-paired": lambda: _paired_gentle(
            table, both, L2RW_SETTINGS, L2RW_PAIRS, L2RW_VARIANTS, SEEDS5
        ),
        "class-paired-bn": lambda: _paired_rows(
            table, S3, [(f"{m}~cls20", f"{m}~ess20") for m in LOGIT_NETS], ["ess20", "cls20"], list(range(20))
        ),
        "meta-lr-bn": lambda: _stability_rows(
            table, S3, [row for row, _ in M3_PAIRS], ["cls20m3", "ess20m3"], list(range(10))
        ),
        "meta-lr-bn-paired": lambda: _paired_rows(table, S3, M3_PAIRS, M3_VARIANTS, list(range(10))),
        "meta-lr-gentle-paired": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"], M3_PAIRS, M3_VARIANTS, SEEDS5
        ),
        "defaults-matrix-meta3": lambda: defaults_matrix.report(defaults_matrix.TABLE, "meta3"),
        "follow-bn": lambda: _stability_rows(
            table, S3, [f"gated~{v}" for v in ("cls20", *FOLLOW_VARIANTS)], ["cls20", *FOLLOW_VARIANTS], list(range(10))
        ),
        "follow-bn-paired": lambda: _paired_rows(
            table, S3, [(f"gated~{v}", "gated~cls20") for v in FOLLOW_VARIANTS], ["cls20", *FOLLOW_VARIANTS],
            list(range(10)),
        ),
        "follow-gentle-paired": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            [(f"metainfonet~{v}", "metainfonet~cls20") for v in ("cls20m3", "cls20m3f", "cls20r", "cls20p", "cls20q")]
            + [("gated~cls20m3f", "gated~cls20")],
            ["cls20", "cls20m3", "cls20m3f", "cls20r", "cls20p", "cls20q"], SEEDS5,
        ),
        "follow-wide": lambda: _stability_rows(
            table, ["flip1-40", "uniform-40"], ["standard", "gated~cls20", "gated~cls20m3", "gated~cls20m3f"],
            ["cls20", "cls20m3", "cls20m3f"], SEEDS5, "bnwide", fit=True,
        ),
        "defaults-matrix-600": lambda: defaults_matrix.report(defaults_matrix.TABLE, "defaults", 600),
        "veto-holdout": lambda: _holdout(
            table, S3, [(VETO_GATED, "gated~cls20"), (VETO_LOSSNET, "lossnet~ess20")], VETO_VARIANTS, list(range(10))
        ),
        "veto-holdout-chosen": lambda: _holdout(
            table, S3,
            [(["gated~cls20v0", "gated~cls20v10", "gated~cls20v20"], "gated~cls20v05"),
             (["lossnet~ess20v10"], "lossnet~ess20v05")],
            [*VETO_VARIANTS, "cls20v20"], list(range(10)),
        ),
        "veto-holdout-gentle": lambda: _holdout_pooled(
            table, [("gentle", "plain", both)], {"gentle": NOISE4},
            [(["gated~cls20", "gated~cls20v05", "gated~cls20v10", "gated~cls20v20"], "gated~cls20v05")],
            ["cls20", "cls20v05", "cls20v10", "cls20v20"], list(range(10)),
        ),
        "veto-warmup-holdout": lambda: _holdout_pooled(
            table, [("gentle", "plain", both), ("paper", "bn", ["mnist1d"])], {"gentle": NOISE4, "paper": S3},
            [(["gated~cls20v05", "gated~cls20v05w"], "gated~cls20v05")], ["cls20v05", "cls20v05w"], list(range(10, 20)),
        ),
        "veto-bn": lambda: _stability_rows(
            table, S3, ["standard", *VETO_GATED, *VETO_LOSSNET], VETO_VARIANTS, list(range(10))
        ),
        "veto-bn-paired": lambda: _paired_rows(table, S3, VETO_PAIRS, VETO_VARIANTS, list(range(10))),
        "veto-gentle-paired": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            [*((f"{m}~cls20v05", f"{m}~cls20") for m in LOGIT_NETS), ("lossnet~ess20v05", "lossnet~ess20")],
            ["cls20", "cls20v05", "ess20", "ess20v05"], SEEDS5,
        ),
        "veto10-gentle-paired": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            [("gated~cls20v10", "gated~cls20"), ("gated~cls20v10", "gated~cls20v05")],
            ["cls20", "cls20v05", "cls20v10"], SEEDS5,
        ),
        "veto-wide": lambda: _stability_rows(
            table, ["flip1-40", "uniform-40"], ["standard", "gated~cls20", "gated~cls20v05", "l2rw~l2cls40"],
            ["cls20", "cls20v05", "l2cls40"], SEEDS5, "bnwide", fit=True,
        ),
        "veto-fast-10": lambda: _gain_current(
            table, ["gated"], ("fastcls20v05",), seeds=list(range(10)), exact="cls20v05"
        ),
        "veto-center-holdout": lambda: _holdout_pooled(
            table, [("gentle", "plain", both), ("paper", "bn", ["mnist1d"])], {"gentle": NOISE4, "paper": S3},
            [(["gated~cls20v05", "gated~cls20v05c"], "gated~cls20v05")], ["cls20v05", "cls20v05c"], list(range(10, 20)),
        ),
        "veto-center-bn": lambda: _stability_rows(
            table, S3, ["standard", *CENTER_ROWS], [v.split("~")[1] for v in CENTER_ROWS], list(range(10))
        ),
        "veto-center-bn-paired": lambda: _paired_rows(
            table, S3, list(zip(CENTER_ROWS[1::2], CENTER_ROWS[::2])), [v.split("~")[1] for v in CENTER_ROWS],
            list(range(10)),
        ),
        "veto-center-gentle-paired": lambda: _paired_gentle(
            table, both, NOISE4, list(zip(CENTER_ROWS[1::2], CENTER_ROWS[::2])), [v.split("~")[1] for v in CENTER_ROWS],
            SEEDS5,
        ),
        "veto-center-screen": lambda: _paired_gentle(
            table, ["mnist1d-2pct"], ["flip2-40"],
            [("gated~cls20v05c", "gated~cls20v05"), ("gated~cls20", "gated~cls20v05")],
            ["cls20", "cls20v05", "cls20v05c"], list(range(10)),
        ),
        "veto-warmup-center-holdout": lambda: _holdout_pooled(
            table, [("gentle", "plain", both), ("paper", "bn", ["mnist1d"])], {"gentle": NOISE4, "paper": S3},
            [(["gated~cls20v05c", "gated~cls20v05cw"], "gated~cls20v05c")], ["cls20v05c", "cls20v05cw"],
            list(range(10, 20)),
        ),
        "veto-warmup-center-bn": lambda: _stability_rows(
            table, S3, ["standard", *WARMUP_ROWS], [v.split("~")[1] for v in WARMUP_ROWS], list(range(10))
        ),
        "veto-warmup-center-bn-paired": lambda: _paired_rows(
            table, S3, list(zip(WARMUP_ROWS[1::2], WARMUP_ROWS[::2])), [v.split("~")[1] for v in WARMUP_ROWS],
            list(range(10)),
        ),
        "veto-warmup-wide": lambda: _stability_rows(
            table, ["flip1-40", "uniform-40"],
            ["standard", "gated~cls20v05cw", "lossnet~ess20v05w", "gated~cls20v05c", "gated~cls20v05"],
            ["cls20v05cw", "ess20v05w", "cls20v05c", "cls20v05"], SEEDS5, "bnwide", fit=True,
        ),
        "veto-warmup-wide-paired": lambda: _paired_rows(
            table, ["flip1-40", "uniform-40"],
            [("gated~cls20v05cw", "gated~cls20v05c"), ("gated~cls20v05c", "gated~cls20v05")],
            ["cls20v05cw", "cls20v05c", "cls20v05"], SEEDS5, "bnwide",
        ),
        "veto-warmup-wide-uniform10": lambda: _stability_rows(
            table, ["uniform-40"], ["standard", "gated~cls20v05cw", "gated~cls20v05c", "gated~cls20v05"],
            ["cls20v05cw", "cls20v05c", "cls20v05"], list(range(10)), "bnwide", fit=True,
        )
        + "\n"
        + _paired_rows(
            table, ["uniform-40"],
            [("gated~cls20v05cw", "gated~cls20v05c"), ("gated~cls20v05c", "gated~cls20v05"),
             ("gated~cls20v05cw", "gated~cls20v05")],
            ["cls20v05cw", "cls20v05c", "cls20v05"], list(range(10)), "bnwide",
        ),  # fmt: skip
        "defaults-against-plain": lambda: _against_plain(
            table,
            [("gentle, seeds 0-4", "gentle", "plain", both, NOISE4, SEEDS5, 0),
             ("gentle held-out runs, seeds 10-19", "gentle", "plain", both, NOISE4, list(range(10, 20)), HOLDOUT),
             ("BN CNN, paper schedule, seeds 0-9", "paper", "bn", ["mnist1d"], S3, list(range(10)), 0),
             ("BN CNN held-out runs, seeds 10-19", "paper", "bn", ["mnist1d"], S3, list(range(10, 20)), HOLDOUT)],
            [*(f"{m}~cls20v05cwe" for m in LOGIT_NETS), "lossnet~ess20v05we", "gated~fastcls20v05cwe"],
        ),  # fmt: skip
        "light-noise": lambda: _paired_plain(table, both, LIGHT, LIGHT_ROWS, list(range(10))),
        "light-noise-bn": lambda: _paired_plain(
            table, ["mnist1d"], LIGHT, ["gated~cls20v05cw", "gated~cls20", "lossnet~ess20v05w"], list(range(10)),
            schedule="paper", model="bn",
        ),
        "long-tail-current": lambda: _paired_plain(table, [*both, "digits"], TAILS, TAIL_ROWS, list(range(10))),
        "noisy-tail": lambda: _paired_plain(
            table, both, list(acc.NOISY_TAIL_SETTINGS),
            ["gated~cls20v05cw", "gated~cls20", "gated~ess20v05w", "gated~ess20", "lossnet~ess20v05w"], list(range(10)),
        ),
        "small-meta-digits": lambda: _paired_plain(
            table, ["digits"], ["uniform-0", "flip1-40", "flip2-40", "uniform-40"], ["gated~cls20v05cw", "gated~cls20"],
            list(range(10)),
        ),
        "veto-evidence-holdout": lambda: _holdout_pooled(
            table, EVIDENCE_PROTOCOLS, EVIDENCE_CELLS,
            [(["standard", "gated~cls20v05cw", "gated~cls20v05cwe"], "gated~cls20v05cw"),
             (["lossnet~ess20v05w", "lossnet~ess20v05we"], "lossnet~ess20v05w")],
            ["cls20v05cw", "cls20v05cwe", "ess20v05w", "ess20v05we"], list(range(10, 20)),
        ),
        "veto-evidence-test": lambda: _paired_plain(
            table, both, EVIDENCE_TEST, EVIDENCE_ROWS, list(range(10)),
        ),
        "veto-evidence-test-digits": lambda: _paired_plain(
            table, ["digits"], ["uniform-0", "lt-3", "lt-10", "flip1-40", "uniform-40"], EVIDENCE_ROWS, list(range(10))
        ),
        "veto-evidence-test-lossnet": lambda: _paired_plain(
            table, both, EVIDENCE_TEST, ["lossnet~ess20v05w", "lossnet~ess20v05we"], list(range(10)),
        ),
        "veto-evidence-test-nets": lambda: _paired_plain(
            table, both, ["uniform-0", "lt-1", "lt-3"],
            [f"{m}~{v}" for m in ("metainfonet", "logitnet") for v in ("cls20v05cw", "cls20v05cwe")], list(range(10)),
        ),
        "veto-evidence-test-bn": lambda: _paired_plain(
            table, ["mnist1d"], [*LIGHT, *S3], [*EVIDENCE_ROWS, "lossnet~ess20v05w", "lossnet~ess20v05we"],
            list(range(10)), schedule="paper", model="bn",
        ),
        "evidence-reading": lambda: _reading_pairs(
            CURRENT_READING, (table, LOOKAHEAD_READING), both, EVIDENCE_CELLS["gentle"], ["gated~cls20v05cwe"],
            list(range(20, 30)),
        ),
        "evidence-reading-bn": lambda: _reading_pairs(
            CURRENT_READING, (table, LOOKAHEAD_READING), ["mnist1d"], ["uniform-0", *S3],
            ["gated~cls20v05cwe", "logitnet~cls20v05cwe", "metainfonet~cls20v05cwe", "lossnet~ess20v05we"],
            list(range(10)), "paper", "bn", 0,
        ),  # fmt: skip
        "twin-spread": lambda: _twin_spread(
            [("placebo", LOOKAHEAD_READING, "gated~cls20v05cweR", LOOKAHEAD_READING, "gated~cls20v05cwe"),
             ("current parameters", table, "gated~cls20v05cwe", LOOKAHEAD_READING, "gated~cls20v05cwe")],
            both, EVIDENCE_CELLS["gentle"], list(range(30, 40)),
        ),  # fmt: skip
        "twin-spread-bn": lambda: _twin_spread(
            [("placebo", LOOKAHEAD_READING, "gated~cls20v05cweR", LOOKAHEAD_READING, "gated~cls20v05cwe"),
             ("current parameters", table, "gated~cls20v05cwe", LOOKAHEAD_READING, "gated~cls20v05cwe")],
            ["mnist1d"], ["uniform-0", *S3], list(range(30, 40)), "paper", "bn",
        ),  # fmt: skip
        "twin-spread-40": lambda: _twin_spread(
            [("current parameters", table, "gated~cls20v05cwe", LOOKAHEAD_READING, "gated~cls20v05cwe")],
            both, EVIDENCE_CELLS["gentle"], list(range(40, 50)),
        ),  # fmt: skip
        "twin-spread-40-bn": lambda: _twin_spread(
            [("current parameters", table, "gated~cls20v05cwe", LOOKAHEAD_READING, "gated~cls20v05cwe")],
            ["mnist1d"], ["uniform-0", *S3], list(range(40, 50)), "paper", "bn",
        ),  # fmt: skip
        "guard-probe": lambda: _twin_spread(
            [("probe - plain training", TWIN_GUARD, "gated~cls20v05cweG3", table, "standard"),
             ("default - plain training", table, "gated~cls20v05cwe", table, "standard")],
            ["mnist1d-2pct"], EVIDENCE_CELLS["gentle"], list(range(10, 18)),
        ),  # fmt: skip
        "guard-pairs": lambda: _twin_spread(
            [("guard - plain training", TWIN_GUARD, "gated~cls20v05cweG", (table, TWIN_GUARD), "standard"),
             ("default - plain training", (table, TWIN_GUARD), "gated~cls20v05cwe", (table, TWIN_GUARD), "standard"),
             ("guard - default", TWIN_GUARD, "gated~cls20v05cweG", (table, TWIN_GUARD), "gated~cls20v05cwe")],
            both, EVIDENCE_CELLS["gentle"], GUARD_SEEDS,
        ),  # fmt: skip
        "guard-fallbacks": lambda: _guard_fallbacks(
            (table, TWIN_GUARD), both, EVIDENCE_CELLS["gentle"], "gated~cls20v05cweG", GUARD_SEEDS
        ),
        "guard-stand-down-pairs": lambda: _twin_spread(
            [("guard - plain training", TWIN_GUARD, "gated~cls20v05cweGE", TWIN_GUARD, "standard"),
             ("default - plain training", TWIN_GUARD, "gated~cls20v05cwe", TWIN_GUARD, "standard"),
             ("guard - default", TWIN_GUARD, "gated~cls20v05cweGE", TWIN_GUARD, "gated~cls20v05cwe")],
            both, EVIDENCE_CELLS["gentle"], GUARD_STAND_DOWN_SEEDS,
        ),  # fmt: skip
        "guard-stand-down-fallbacks": lambda: _guard_fallbacks(
            TWIN_GUARD, both, EVIDENCE_CELLS["gentle"], "gated~cls20v05cweGE", GUARD_STAND_DOWN_SEEDS
        ),
        "floor-40-pairs": lambda: _twin_spread(
            [("floor 0.4 - plain training", table, "gated~cls40v05cwe", TWIN_GUARD, "standard"),
             ("floor 0.4 - default", table, "gated~cls40v05cwe", TWIN_GUARD, "gated~cls20v05cwe")],
            both, EVIDENCE_CELLS["gentle"], GUARD_STAND_DOWN_SEEDS,
        ),  # fmt: skip
        "quiet-ess": lambda: _ess_without_evidence(
            table,
            [("gentle", "plain", both, ["uniform-0", "lt-3", "lt-10"]), ("paper", "bn", ["mnist1d"], ["uniform-0"])],
            "gated~cls20v05cwe", list(range(10)),
        ),
        "quiet-pairs": lambda: _twin_spread(
            _held_pairs("gated~cls20v05cweq80", table, "gated~cls20v05cwe", TWIN_GUARD, TWIN_GUARD),
            both, EVIDENCE_CELLS["gentle"], QUIET_SEEDS, below=(3, 5), pooled=QUIET_GROUPS,
        ),  # fmt: skip
        "quiet-pairs-bn": lambda: _twin_spread(
            _held_pairs("gated~cls20v05cweq80", table, "gated~cls20v05cwe", (table, SAME_MACHINE), table),
            ["mnist1d"], ["uniform-0", *S3], [*range(10, 20), *range(40, 50)], "paper", "bn", below=(3, 5),
        ),  # fmt: skip
        "quiet-light": lambda: _twin_spread(
            _held_pairs("gated~cls20v05cweq80", table, "gated~cls20v05cwe", (table, SAME_MACHINE), table),
            both, ["uniform-5", "uniform-10", "flip1-10"], list(range(10)), holdout=0, below=(3, 5),
        ),  # fmt: skip
        "quiet-light-bn": lambda: _twin_spread(
            _held_pairs("gated~cls20v05cweq80", table, "gated~cls20v05cwe", (table, SAME_MACHINE), table),
            ["mnist1d"], ["uniform-5", "uniform-10", "flip1-10"], list(range(10)), "paper", "bn", holdout=0,
            below=(3, 5),
        ),  # fmt: skip
        "quiet-fade-pairs": lambda: _twin_spread(
            [("fading - plain training", QUIET_FADE, "gated~cls20v05cweq80f", TWIN_GUARD, "standard"),
             ("fading - before", QUIET_FADE, "gated~cls20v05cweq80f", TWIN_GUARD, "gated~cls20v05cwe"),
             ("fading - held", QUIET_FADE, "gated~cls20v05cweq80f", table, "gated~cls20v05cweq80")],
            both, EVIDENCE_CELLS["gentle"], QUIET_SEEDS, below=(3, 5), pooled=QUIET_GROUPS,
        ),  # fmt: skip
        "quiet-fade-pairs-bn": lambda: _twin_spread(
            [("fading - before", QUIET_FADE, FADE, (table, QUIET_FADE, SAME_MACHINE), "gated~cls20v05cwe"),
             ("fading - held", QUIET_FADE, FADE, table, "gated~cls20v05cweq80")],
            ["mnist1d"], ["uniform-0", *S3], [*range(10, 30), *range(40, 50)], "paper", "bn", below=(3, 5),
        ),  # fmt: skip
        "quiet-fade-light": lambda: _twin_spread(
            [("fading - plain training", table, "gated~cls20v05cweq80f", table, "standard"),
             ("fading - before", table, FADE, (table, SAME_MACHINE), "gated~cls20v05cwe"),
             ("fading - held", table, "gated~cls20v05cweq80f", table, "gated~cls20v05cweq80")],
            both, ["uniform-5", "uniform-10", "flip1-10"], list(range(10)), holdout=0, below=(3, 5),
        ),  # fmt: skip
        "quiet-fade-light-bn": lambda: _twin_spread(
            [("fading - plain training", table, "gated~cls20v05cweq80f", table, "standard"),
             ("fading - before", table, FADE, (table, SAME_MACHINE), "gated~cls20v05cwe"),
             ("fading - held", table, "gated~cls20v05cweq80f", table, "gated~cls20v05cweq80")],
            ["mnist1d"], ["uniform-5", "uniform-10", "flip1-10"], list(range(10)), "paper", "bn", holdout=0,
            below=(3, 5),
        ),  # fmt: skip
        "readme-loop-quiet-fade": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_QUIET_DEFAULTS), ("held", README_LOOP_QUIET), ("fading", README_LOOP_QUIET_FADE)]
        ),
        "quiet-lossnet-pairs": lambda: _twin_spread(
            _held_pairs("lossnet~ess20v05weq80", table, "lossnet~ess20v05we", table, TWIN_GUARD),
            both, EVIDENCE_CELLS["gentle"], QUIET_SEEDS, below=(3, 5), pooled=QUIET_GROUPS,
        ),  # fmt: skip
        "fade-rule-pairs": lambda: _twin_spread(
            _held_pairs(FADE, table, "gated~cls20v05cwe", TWIN_GUARD, TWIN_GUARD, "fading"),
            both, EVIDENCE_CELLS["gentle"], FADE_RULE_SEEDS, below=(3, 5), pooled=QUIET_GROUPS,
        ),  # fmt: skip
        "fade-rule-pairs-bn": lambda: _twin_spread(
            [("fading - before", table, FADE, (table, SAME_MACHINE), "gated~cls20v05cwe"),
             ("fading - plain training", table, FADE, table, "standard"),
             ("before - plain training", (table, SAME_MACHINE), "gated~cls20v05cwe", table, "standard")],
            ["mnist1d"], ["uniform-0", *S3], FADE_RULE_SEEDS_BN, "paper", "bn", below=(3, 5),
        ),  # fmt: skip
        "fade-rule-drops-bn": lambda: _holdout_drops(
            (table, SAME_MACHINE), S3, [FADE, "gated~cls20v05cwe"], FADE_RULE_SEEDS_BN
        ),
        "fade-rule-pairs-bn-fresh": lambda: _twin_spread(
            [("fading - before", table, FADE, table, "gated~cls20v05cwe")],
            ["mnist1d"], S3, FADE_FRESH_SEEDS_BN, "paper", "bn", below=(3, 5),
        ),  # fmt: skip
        "fade-rule-drops-bn-fresh": lambda: _holdout_drops(
            table, S3, [FADE, "gated~cls20v05cwe"], FADE_FRESH_SEEDS_BN
        ),
        "fade-rule-lossnet-pairs": lambda: _twin_spread(
            _held_pairs("lossnet~ess20v05weq80f", table, "lossnet~ess20v05we", table, TWIN_GUARD, "fading"),
            both, EVIDENCE_CELLS["gentle"], QUIET_SEEDS, below=(3, 5), pooled=QUIET_GROUPS,
        ),  # fmt: skip
        "readme-loop-fade-rule": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_QUIET_DEFAULTS), ("fading", README_LOOP_QUIET_FADE)], seeds=list(range(20, 30))
        ),
        "fade-next-pairs": lambda: _twin_spread(
            _held_pairs(FADE, table, "gated~cls20v05cwe", table, table, "fading"),
            both, EVIDENCE_CELLS["gentle"], list(range(70, 80)), below=(3, 5), pooled=QUIET_GROUPS,
        ),  # fmt: skip
        "readme-loop-fade-next": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_QUIET_DEFAULTS), ("fading", README_LOOP_QUIET_FADE)], seeds=list(range(30, 50))
        ),
        "fade-third-pairs": lambda: _twin_spread(
            _held_pairs(FADE, table, "gated~cls20v05cwe", table, table, "fading"),
            both, EVIDENCE_CELLS["gentle"], FADE_THIRD_SEEDS, below=(3, 5), pooled=QUIET_GROUPS,
        ),  # fmt: skip
        "fade-third-pairs-bn": lambda: _twin_spread(
            [("fading - before", table, FADE, table, "gated~cls20v05cwe"),
             ("fading - plain training", table, FADE, table, "standard"),
             ("before - plain training", table, "gated~cls20v05cwe", table, "standard")],
            ["mnist1d"], ["uniform-0"], FADE_THIRD_SEEDS_BN, "paper", "bn", below=(3, 5),
        ),  # fmt: skip
        "fade-rules-pooled": lambda: _twin_spread(
            [("fading - before", table, FADE, (table, TWIN_GUARD), "gated~cls20v05cwe")],
            both, EVIDENCE_CELLS["gentle"], [*FADE_RULE_SEEDS, *range(70, 90)], below=(3, 5), pooled=QUIET_GROUPS,
        ),  # fmt: skip
        "fade-default-clean": lambda: _twin_spread(
            [("fading - plain training", table, FADE, (table, TWIN_GUARD), "standard"),
             ("before - plain training", (table, TWIN_GUARD), "gated~cls20v05cwe", (table, TWIN_GUARD), "standard")],
            both, ["uniform-0", "lt-3", "lt-10"], [*FADE_RULE_SEEDS, *range(70, 90)], below=(3, 5),
            pooled={"clean": ["uniform-0", "lt-3", "lt-10"]},
        ),  # fmt: skip
        "fade-default-clean-bn": lambda: _twin_spread(
            [("fading - plain training", (table, QUIET_FADE), FADE, table, "standard"),
             ("before - plain training", (table, SAME_MACHINE), "gated~cls20v05cwe", table, "standard")],
            ["mnist1d"], ["uniform-0"], [*range(30, 50), *FADE_THIRD_SEEDS_BN], "paper", "bn", below=(3, 5),
        ),  # fmt: skip
        "readme-loop-fade-third": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_QUIET_DEFAULTS), ("fading", README_LOOP_QUIET_FADE)], seeds=list(range(50, 70))
        ),
        "readme-loop-latch": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_LATCH_BEFORE), ("latched after the warm-up", README_LOOP_LATCH)],
            nets=("lossnet",), by_evidence=True,
        ),
        "lossnet-floor-pairs": lambda: _twin_spread(
            [(f"{v} - defaults", table, f"lossnet~{v}", table, "lossnet~ess20v05we")
             for v in ("ess40v05we", "ess50v05we")],
            both, EVIDENCE_CELLS["gentle"], LOSSNET_FLOOR_SEEDS, below=(3, 5), pooled=QUIET_GROUPS,
        ),
        "lossnet-floor-pairs-bn": lambda: _twin_spread(
            [("ess40v05we - defaults", table, "lossnet~ess40v05we", table, "lossnet~ess20v05we")],
            ["mnist1d"], S3, LOSSNET_FLOOR_SEEDS, "paper", "bn", below=(3, 5),
        ),
        "readme-loop-lossnet-floor": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_LATCH_BEFORE), ("min_ess 0.4", README_LOOP_LOSSNET_FLOOR)], nets=("lossnet",),
            by_evidence=True,
        ),
        "lossnet-floor50-pairs-amd": lambda: _twin_spread(
            [("ess50v05we - defaults", LOSSNET_FLOOR_AMD, "lossnet~ess50v05we",
              LOSSNET_FLOOR_AMD, "lossnet~ess20v05we")],
            ["mnist1d-2pct"], ["uniform-60"], LOSSNET_FLOOR_SEEDS, below=(3, 5),
        ),
        "readme-loop-lossnet-floor50": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_LOSSNET_DEFAULTS_AMD), ("min_ess 0.5", README_LOOP_LOSSNET_FLOOR50)],
            nets=("lossnet",), by_evidence=True,
        ),
        "readme-loop-fade-all": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_QUIET_DEFAULTS), ("fading", README_LOOP_QUIET_FADE)]
        ),
        "evidence-logit-now": lambda: _reading_pairs(
            table, LOOKAHEAD_READING, both, EVIDENCE_CELLS["gentle"], ["gated~cls20v05cwe"], list(range(30, 40))
        ),
        "evidence-logit-now-bn": lambda: _reading_pairs(
            table, LOOKAHEAD_READING, ["mnist1d"], ["uniform-0", *S3], ["gated~cls20v05cwe"], list(range(30, 40)),
            "paper", "bn",
        ),  # fmt: skip
        "veto-evidence-onset": lambda: _veto_onset(
            table,
            [(f"{label} held-out runs, seeds {seeds[0]}-{seeds[-1]}", schedule, model, datasets,
              EVIDENCE_CELLS[schedule], seeds, HOLDOUT)
             for seeds in (list(range(10, 20)),)
             for (schedule, model, datasets), label in zip(EVIDENCE_PROTOCOLS, ("gentle", "BN CNN"))],
            ["gated~cls20v05cwe", "lossnet~ess20v05we"],
        ),  # fmt: skip
        "light-noise-holdout": lambda: _paired_plain(
            table, both, ["uniform-0"], ["gated~cls20v05cw"], list(range(10, 20)), HOLDOUT
        ),
        "fast-evidence-keeps": lambda: _gain_current(
            table, ["gated"], ("fastcls20v05cwe",), list(range(10, 20)), settings=NOISE4, exact="cls20v05cwe",
            holdout=HOLDOUT,
        ),
        "fast-warmup-keeps-fresh": lambda: _gain_current(
            table, ["gated"], ("fastcls20v05cw",), list(range(10, 20)), settings=NOISE4, exact="cls20v05cw",
            holdout=HOLDOUT,
        ),
        "fast-veto-holdout": lambda: _holdout_pooled(
            table, [("gentle", "plain", both)], {"gentle": NOISE4},
            [(["gated~fastcls20v05", "gated~fastcls20"], "gated~fastcls20v05")], ["fastcls20v05", "fastcls20"],
            list(range(10, 20)),
        ),
        "fast-cheap-holdout": lambda: _holdout_pooled(
            table, [("gentle", "plain", both)], {"gentle": NOISE4}, [(FAST_CHEAP, FAST_CHEAP[0])],
            [r.split("~")[1] for r in FAST_CHEAP], list(range(10, 20)),
        ),
        "fast-veto-keeps-fresh": lambda: _gain_current(
            table, ["gated"], ("fastcls20v05", "fastcls20"), list(range(10, 20)), settings=NOISE4, exact="cls20v05",
            holdout=HOLDOUT,
        ),
        "fast-center-keeps-fresh": lambda: _gain_current(
            table, ["gated"], ("fastcls20v05c",), list(range(10, 20)), settings=NOISE4, exact="cls20v05c",
            holdout=HOLDOUT,
        ),
        "history-veto-bn": lambda: _stability_rows(
            table, S3, ["standard", *HISTORY_VETO_ROWS], [v.split("~")[1] for v in HISTORY_VETO_ROWS], list(range(10))
        ),
        "history-veto-bn-paired": lambda: _paired_rows(
            table, S3, [("gated~cls20hv05", "gated~cls20v05"), ("lossnet~ess20hv05", "lossnet~ess20v05")],
            [v.split("~")[1] for v in HISTORY_VETO_ROWS], list(range(10)),
        ),
        "veto-fast": lambda: _gain_current(
            table, ["gated"], ("fastcls20v05",), settings=("flip1-40", "flip2-40", "uniform-40"), exact="cls20v05"
        ),
        "defaults-matrix-mirror": lambda: defaults_matrix.compare(
            defaults_matrix.TABLE, 600, defaults_matrix.SPELLED["defaults"], defaults_matrix.SPELLED["mirror"]
        ),
        "defaults-matrix-mirror-rest": lambda: defaults_matrix.compare(
            defaults_matrix.TABLE, 600, defaults_matrix.SPELLED["defaults"], defaults_matrix.SPELLED["mirror"], "rest"
        ),
        "defaults-matrix-placebo": lambda: defaults_matrix.placebo_spread(defaults_matrix.TABLE, 600),
        "defaults-matrix-competence": lambda: _matrix_against_default("competence"),
        "defaults-matrix-competence-rest": lambda: _matrix_against_default("competence", "rest"),
        "competence-gentle-pairs": lambda: _gentle_against_default(table, WAIT, "cls20v05cweq80fk45"),
        "competence-bn-pairs": lambda: _bn_against_default(table, WAIT, "cls20v05cweq80fk45"),
        "competence-bn-stability": lambda: _bn_stability_against_default(table, "cls20v05cweq80fk45"),
        "defaults-matrix-share": lambda: _matrix_against_default("share"),
        "defaults-matrix-share-rest": lambda: _matrix_against_default("share", "rest"),
        "share-gentle-pairs": lambda: _gentle_against_default(table, "refill 1", "cls20v05cweq80fb", ["mnist1d"]),
        "defaults-matrix-refill2": lambda: _matrix_against_default("refill2"),
        "defaults-matrix-refill2-rest": lambda: _matrix_against_default("refill2", "rest"),
        "defaults-matrix-refill2-test": lambda: _matrix_against_default("refill2", "test"),
        "refill2-gentle-pairs": lambda: _gentle_against_default(table, "refill 2", "cls20v05cweq80fr2"),
        "refill2-bn-pairs": lambda: _bn_against_default(table, "refill 2", "cls20v05cweq80fr2"),
        "refill2-bn-stability": lambda: _bn_stability_against_default(table, "cls20v05cweq80fr2"),
        "hf-short-run-refill": lambda: (HERE / "results" / "hf_short_run_refill.md").read_text().strip(),
        "hf-short-run-competence": lambda: (HERE / "results" / "hf_short_run_competence.md").read_text().strip(),
        "hf-short-run-mirror": lambda: (HERE / "results" / "hf_short_run_mirror.md").read_text().strip(),
        "defaults-matrix-vit-workarounds": lambda: defaults_matrix.report(defaults_matrix.TABLE, "sum", 600)
        + "\n"
        + defaults_matrix.report(defaults_matrix.TABLE, "noveto", 600),
        "defaults-matrix-veto10": lambda: defaults_matrix.report(defaults_matrix.TABLE, "veto10")
        + "\n"
        + defaults_matrix.report(defaults_matrix.TABLE, "veto10", 600),
        "defaults-matrix-veto-warmup": lambda: defaults_matrix.report(defaults_matrix.TABLE, "veto-warmup")
        + "\n"
        + defaults_matrix.report(defaults_matrix.TABLE, "veto-warmup", 600),
        "defaults-matrix-veto-center": lambda: defaults_matrix.report(defaults_matrix.TABLE, "veto-center")
        + "\n"
        + defaults_matrix.report(defaults_matrix.TABLE, "veto-center", 600),
        "defaults-matrix-before-veto": lambda: defaults_matrix.report(
            defaults_matrix.TABLE, "defaults", options=defaults_matrix.BEFORE_VETO
        ),
        "defaults-matrix-600-before-veto": lambda: defaults_matrix.report(
            defaults_matrix.TABLE, "defaults", 600, options=defaults_matrix.BEFORE_VETO
        ),
        "defaults-matrix-meta3-600": lambda: defaults_matrix.report(defaults_matrix.TABLE, "meta3", 600),
        "fast-follow": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40"], [("gated~fastcls20f", "gated~fastcls20")],
            ["fastcls20", "fastcls20f"], SEEDS5,
        ),
        "history-bn": lambda: _stability_rows(
            table, S3, ["standard", *HISTORY_ROWS], HISTORY_VARIANTS, list(range(10))
        ),
        "history-bn-paired": lambda: _paired_rows(table, S3, HISTORY_PAIRS, HISTORY_VARIANTS, list(range(10))),
        "history-bn-20": lambda: _stability_rows(
            table, S3, ["gated~cls20", "gated~cls20h"], ["cls20", "cls20h"], list(range(20))
        )
        + "\n"
        + _paired_rows(table, S3, HISTORY_PAIRS[:1], ["cls20", "cls20h"], list(range(20))),
        "history-gentle-paired": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            [*HISTORY_PAIRS, ("lossnet~cls20h", "lossnet~ess20")], HISTORY_VARIANTS, SEEDS5,
        ),
        "history-gentle-current-paired": lambda: _paired_gentle(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"],
            [("lossnet~ess20hv05w", "lossnet~ess20v05w")], ("ess20v05w", "ess20hv05w"), SEEDS5,
        ),
        "history-gentle": lambda: _acc(
            table, both, ["flip1-40", "flip2-40", "uniform-40", "uniform-60"], ["standard", *HISTORY_ROWS], SEEDS5,
            HISTORY_VARIANTS,
        ),
        "history-wide": lambda: _stability_rows(
            table, ["flip1-40", "uniform-40"], ["standard", "gated~cls20", "gated~cls20h"], ["cls20", "cls20h"], SEEDS5,
            "bnwide", fit=True,
        ),
        "history-fast": lambda: _gain_current(
            table, ("gated",), ("fastcls20h",), SEEDS5, exact="cls20h"
        ) + "\n" + _gain_current(
            table, ("gated",), ("fastcls20h",), list(range(10)), ("mnist1d-2pct",), ("flip2-40",), exact="cls20h"
        ),
        "history-fast-10": lambda: _gain_current(
            table, ("gated",), ("fastcls20h",), list(range(10)), ("mnist1d",), ("flip1-40", "flip2-40"), exact="cls20h"
        ),
        "history-cost": lambda: _steps(sc, ["presets-history-cpu"]),
        "veto-fast-cost": lambda: _steps(sc, ["presets-veto-cpu", "presets-veto-cpu-2"]),
        "defaults-matrix-history-600": lambda: defaults_matrix.report(defaults_matrix.TABLE, "history", 600),
        "defaults-matrix-history": lambda: defaults_matrix.report(defaults_matrix.TABLE, "history", 300),
        "class-weights": lambda: _class_weights(),
        "raw-weights": lambda: _raw_weights([2, 4]),
        "stability-ess-floor": lambda: _stability_rows(
            table, S3, ["gated~nokn", "gated~ess10", "gated~ess20", "gated~sampledw"],
            ["nokn", "ess10", "ess20", "sampledw"], list(range(10)),
        ),
        "stability-ess-floor-20": lambda: _stability_rows(
            table, S3, ["gated~nokn", "gated~ess20"], ["nokn", "ess20"], list(range(20))
        ),
        "ess-floor-paired": lambda: _paired_rows(
            table, S3, [(f"gated~{v}", "gated~nokn") for v in ("ess20", "ess10", "sampledw")],
            ["nokn", "ess10", "ess20", "sampledw"], list(range(20)),
        ),
        "stability-nets-floor": lambda: _stability_rows(
            table, S3, [f"{m}~{v}" for m in ("metainfonet", "logitnet", "lossnet") for v in ("nokn", "ess20")],
            ["nokn", "ess20"], list(range(20)),
        ),
        "nets-floor-paired": lambda: _paired_rows(
            table, S3, [(f"{m}~ess20", f"{m}~nokn") for m in ("metainfonet", "logitnet", "lossnet")],
            ["nokn", "ess20"], list(range(20)),
        ),
        "stability-wide": lambda: _stability_rows(
            table, ["flip1-40", "uniform-40"],
            ["standard", "gated~nokn", "gated~cls20", "lossnet~nokn", "metainfonet~nokn"], ["nokn", "cls20"],
            SEEDS5, "bnwide", fit=True,
        ),
        "stability-curves": lambda: _curves(
            table, ["flip1-40", "flip2-40", "uniform-40"], ["gated", "metainfonet", "logitnet", "lossnet"], ["nokn"],
            list(range(10)), "bn",
        ),
        "gated-protocol1": lambda: _acc(table, ["mnist1d"], S3, GATED_ROWS, SEEDS5, ("nokn",)),
        "gated-protocol2": lambda: _acc(table, ["mnist1d-2pct"], S3, GATED_ROWS, SEEDS5, ("nokn",)),
        "protocol2-uniform-current": lambda: _acc(
            table, ["mnist1d-2pct"], ["uniform-40"], ["standard", "lossnet", "logitnet", "metainfonet"], SEEDS5,
            ("exact", "nokn"),
        ),
        "stability-standard-bn": lambda: _stability(
            table, ["flip1-40", "flip2-40", "uniform-40"], ["standard"], ["default"], list(range(10)), "paper", "bn"
        ),
        "collapse-bn": lambda: _stability(
            table, ["flip1-40", "flip2-40"], ["standard", "metainfonet"],
            ["default", "kl0", "kl01", "sampled", "nowd", "la01"], SEEDS5, "paper", "bn",
        ),
        # docs/benchmarks.md
        "ghost-timing": lambda: _steps(sc, ["ghost-cpu-system", "ghost-cpu-retain"]),
        "ghost-timing-block4": lambda: _steps(sc, ["ghost-cpu-block4-system", "ghost-cpu-block4-retain"]),
        "ghost-timing-slower-machine": lambda: _steps(
            sc,
            [
                "ghost-cpu-system-slower-machine", "ghost-transformer-r15-system-slower-machine",
                "ghost-transformer-r15-retain-slower-machine",
            ],
        ),
        "ghost-memory": lambda: _steps(sc, ["ghost-memory"]),
        "ghost-memory-rss": lambda: _steps(sc, ["ghost-memory-rss-1", "ghost-memory-rss-2", "ghost-memory-rss-3"]),
        "ghost-phases": lambda: _steps(sc, ["phases"]),
        "ghost-components": lambda: _steps(sc, ["components-ghost"]),
        "bn-resnet32": lambda: _steps(sc, ["presets-cpu"]),
        "head-floor": lambda: _head_floor(sc),
        "gpu-h200": lambda: _gpu(),
        "compile-cost": lambda: step_cost.compile_report(sc, ["compile-ghost", "compile-llama-lora"]),
        "compile-accounting": lambda: step_cost.compile_accounting(sc, "compile-accounting"),
        "compile-accounting-retain": lambda: step_cost.compile_accounting(sc, "compile-accounting-retain"),
        # docs/robustness.md
        "defaults-matrix": lambda: defaults_matrix.report(defaults_matrix.TABLE, "defaults"),
        "defaults-matrix-before-center": lambda: defaults_matrix.report(
            defaults_matrix.TABLE, "defaults", options=defaults_matrix.BEFORE_CENTER
        ),
        "defaults-matrix-before-evidence": lambda: defaults_matrix.report(
            defaults_matrix.TABLE, "defaults", options=defaults_matrix.BEFORE_EVIDENCE
        ),
        "defaults-matrix-600-before-evidence": lambda: defaults_matrix.report(
            defaults_matrix.TABLE, "defaults", 600, options=defaults_matrix.BEFORE_EVIDENCE
        ),
        "defaults-matrix-before-warmup": lambda: defaults_matrix.report(
            defaults_matrix.TABLE, "defaults", options=defaults_matrix.BEFORE_WARMUP
        ),
        "defaults-matrix-earlier": lambda: defaults_matrix.report(defaults_matrix.TABLE, "earlier"),
        "defaults-matrix-l2rw-floor40": lambda: defaults_matrix.report(defaults_matrix.TABLE, "l2rw-floor40"),
        "own-loss": lambda: own_loss.report(own_loss.TABLE),
        "readme-loop": lambda: readme_loop.report(readme_loop.TABLE),
        "readme-loop-quiet": lambda: _readme_loop_quiet(
            [("defaults", README_LOOP_QUIET_DEFAULTS), ("`min_ess_until_evidence=0.8`", README_LOOP_QUIET)]
        ),
        "readme-loop-current": lambda: readme_loop.report(README_LOOP_CURRENT),
        "own-loss-before-veto": lambda: own_loss.report(own_loss.TABLE, veto=float("inf")),
        # docs/llm_finetuning.md
        "llm-cost": lambda: step_cost.compile_report(sc, ["compile-llama-lora", "llama-lora-last-block"]),
        # docs/source_weighting.md
        "sources-classification": lambda: source_weights.report("classification"),
        "sources-lm": lambda: source_weights.report("lm"),
        "sources-choice": lambda: source_weights.choice_report(),
        "sources-equal": lambda: source_weights.equal_report(),
        # README.md
        "readme-cost": lambda: _cost_summary(sc),
    }


def _seeds(text: str) -> list[int]:
    """``0-4`` or ``0,1,2``."""
    lo, dash, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if dash else [int(k) for k in text.split(",")]


FIELDS = {  # a figure's field: the value of one run, and how _ms formats it (scale, digits)
    "best": (lambda r: r["result"]["best"], 100.0, 1),
    "last": (lambda r: r["result"]["last"], 100.0, 1),
    "auroc": (lambda r: r["result"].get("auroc"), 1.0, 3),
    "before": (lambda r: r["result"]["before_finetune"]["best"], 100.0, 1),  # a "+finetune" run before it
    "precision": (lambda r: r["result"]["cleanlab"]["precision"], 100.0, 1),  # cleanlab's flagged set
    "recall": (lambda r: r["result"]["cleanlab"]["recall"], 100.0, 1),
    "flagged": (lambda r: r["result"]["cleanlab"]["flagged"], 1.0, 0),
}


def figures(table: Path = acc.TABLE, sc: Path = step_cost.TABLE) -> dict[str, Callable[..., str]]:
    """Single figures for prose, by kind; each takes the marker's positional arguments and its options.

    - ``acc DATASET SETTING METHOD[~VARIANT]`` [schedule=gentle] [model=plain] [seeds=0-4] [field=best]:
      mean ± std over the seeds, as the accuracy tables print it (field best, last, auroc, before: a
      ``+finetune`` run's best before fine-tuning, or cleanlab's precision, recall, flagged);
    - ``cost DATASET SETTING METHOD[~VARIANT]`` [schedule] [model] [seeds]: training passes relative to
      Standard, as the cost tables print it;
    - ``meta DATASET SETTING METHOD[~VARIANT] OTHER[~VARIANT]`` [schedule=paper] [model=bn] [seeds=0-9]: the
      difference of their mean meta-set accuracy over the last 10% of epochs ("meta last"), in points;
    - ``step RUN MODEL VARIANT`` [field=ratio]: a ratio of ``step_cost.jsonl``, as its tables print it
      (quote a variant with spaces).
    """
    cache: dict[tuple, dict] = {}

    def cells(seeds="0-4", schedule="gentle", model="plain", variant="default"):
        k = (seeds, schedule, model, variant)
        if k not in cache:
            cache[k] = acc._cells(table, _seeds(seeds), schedule, (variant,), model)
        return cache[k]

    def runs(ds, setting, method, **opts):
        rs = cells(variant=method.partition("~")[2] or "default", **opts).get((ds, setting, method), [])
        if not rs:
            raise LookupError("no rows")
        return rs

    def accuracy(ds, setting, method, field="best", **opts):
        value, scale, digits = FIELDS[field]
        return acc._ms([value(r) for r in runs(ds, setting, method, **opts)], scale, digits)

    def cost(ds, setting, method, **opts):
        runs(ds, setting, method, **opts)
        rel = acc._relative_cost(cells(variant=method.partition("~")[2] or "default", **opts), ds, setting, method)
        if not rel["passes"]:
            raise LookupError("no cost recorded")
        return f"{np.mean(rel['passes']):.2f}x"

    def meta(ds, setting, method, against, schedule="paper", model="bn", seeds="0-9"):
        opts = {"schedule": schedule, "model": model, "seeds": seeds}
        last = lambda m: np.mean([_tradeoff._tail_mean(r["result"]["meta_acc"]) for r in runs(ds, setting, m, **opts)])  # noqa: E731
        return f"{100 * (last(method) - last(against)):+.1f}"

    def step(run, model, variant, field="ratio"):
        value = _ratio(_store.latest(sc), run, model, variant, field)
        if value is None:
            raise LookupError("no rows")
        return f"{value:.2f}x"

    return {"acc": accuracy, "cost": cost, "meta": meta, "step": step}


BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)
FIG = re.compile(r"(<!-- fig:([\w-]+)((?: [^>]*?)?) -->)(.*?)(<!-- /fig -->)")  # on one line


def render_figure(m: re.Match, kinds: dict[str, Callable[..., str]]) -> str:
    """The figure a ``fig`` marker asks for; a ValueError naming the marker if it cannot be rendered."""
    kind, words = m.group(2), shlex.split(m.group(3))
    args = [w for w in words if "=" not in w or w.partition("=")[0] not in ("schedule", "model", "seeds", "field")]
    opts = dict(w.split("=", 1) for w in words if w not in args)
    try:
        if kind not in kinds:
            raise LookupError(f"unknown figure kind {kind!r} (known: {', '.join(kinds)})")
        return kinds[kind](*args, **opts)
    except (LookupError, TypeError, ValueError) as e:
        raise ValueError(f"{m.group(1)}: {e}") from None


def render_page(
    text: str, table_renderers: dict[str, Callable[[], str]], kinds: dict[str, Callable[..., str]] | None = None
) -> str:
    """``text`` with every marked block replaced by its renderer's output and every figure by its value."""

    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in table_renderers:
            raise KeyError(f"no renderer for table {name!r}")
        body = table_renderers[name]().strip("\n")
        return f"{m.group(1)}{body}\n{m.group(4)}"

    text = BLOCK.sub(sub, text)
    if text.count("<!-- fig:") != len(FIG.findall(text)):
        bad = [line for line in text.splitlines() if line.count("<!-- fig:") != len(FIG.findall(line))]
        raise ValueError(f"a fig marker without its <!-- /fig --> on the same line: {bad[0]!r}")
    if kinds is None and FIG.search(text):
        kinds = figures()
    return FIG.sub(lambda m: m.group(1) + render_figure(m, kinds) + m.group(5), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare only; exit 1 if a page differs")
    args = p.parse_args(argv)
    table_renderers, kinds = renderers(), figures()
    stale = []
    for page in PAGES:
        path = ROOT / page
        old = path.read_text()
        new = render_page(old, table_renderers, kinds)
        if new != old:
            stale.append(page)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("out of date (run python benchmarks/render_docs.py): " + ", ".join(stale))
        return 1
    print(("rewrote: " + ", ".join(stale)) if stale else "every page matches its tables")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
