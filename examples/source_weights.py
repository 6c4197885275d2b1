"""Learned source weights: how much should each data source count? (``net="groups"``)

Two mixtures of three sources each, trained with every batch holding the same number of samples from each
source, and a small clean meta set drawn from the target distribution only:

- **classification** (MNIST-1D, a 1-D CNN): a clean source, a source with 60% of its labels flipped to another
  class, and a source whose labels are uniformly relabelled (pure noise); metric: test accuracy.
- **causal LM** (a random-init tiny ``LlamaForCausalLM``, vocabulary 32): token sequences from the target pattern
  (arithmetic progressions with steps 1-3 over tokens 0-15), random tokens (0-31), and another pattern (a repeated
  3-token motif over tokens 16-31, like another language); metric: the held-out per-token loss on the target
  pattern.

For each mixture it trains the **uniform** mixture (every sample weight 1), the **learned** group weights
(``MetaReweighter(..., net="groups", net_kwargs={"num_groups": 3})`` and ``step(..., groups=g)``), and every fixed
mixture of a grid over the simplex (steps of 1/2, and the uniform mixture): the best of them on the test metric is
the **oracle**. It prints the metric of each and the cost per step, and writes ``group_weights_<task>.png`` (the
learned weights over training) into ``--out``. Offline; one to two minutes per mixture on one CPU thread.

    python examples/source_weights.py [--steps-cls 400] [--steps-lm 300] [--seed 0] [--out outputs]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter
from reweight.diagnostics import GroupWeightHistory
from reweight.losses import causal_lm_loss

NAMES = {
    "classification": ["clean", "flipped60", "uniform_labels"],
    "lm": ["target", "random", "other_pattern"],
    "classification-equal": ["clean_a", "clean_b", "clean_c"],  # three equally clean sources
}
PER_SOURCE = {"classification": 32, "lm": 16, "classification-equal": 32}  # samples of each source per batch
GRID = 2  # the oracle's simplex grid: mixtures (i/2, j/2, k/2) and the uniform one


# ---------------------------------------------------------------- data


def classification_data(
    seed: int, num_samples: int = 4000, meta_size: int = 100, corrupt: bool = True
) -> dict[str, Any]:
    """MNIST-1D split into three sources of equal size, a clean meta set and the test set; with ``corrupt=False``
    the three sources are equally clean (a mixture with nothing to learn)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, 42  # one dataset; the seed draws splits, noise and training
    d = make_dataset(args)
    x = torch.tensor(np.asarray(d["x"], np.float32))[:, None, :]
    y = torch.tensor(np.asarray(d["y"], np.int64))
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(y), generator=g)
    meta, rest = perm[:meta_size], perm[meta_size:]
    parts = rest[: len(rest) // 3 * 3].view(3, -1)
    sources = []
    for k, idx in enumerate(parts):
        labels = y[idx].clone()
        if corrupt and k == 1:  # 60% flipped to another class
            flip = torch.rand(len(idx), generator=g) < 0.6
            other = (labels + torch.randint(1, 10, (len(idx),), generator=g)) % 10
            labels = torch.where(flip, other, labels)
        elif corrupt and k == 2:  # uniformly relabelled
            labels = torch.randint(0, 10, (len(idx),), generator=g)
        sources.append((x[idx], labels))
    x_test = torch.tensor(np.asarray(d["x_test"], np.float32))[:, None, :]
    y_test = torch.tensor(np.asarray(d["y_test"], np.int64))
    return {"sources": sources, "meta": (x[meta], y[meta]), "test": (x_test, y_test)}


VOCAB, LENGTH = 32, 16
OTHER = "motifs"


def _progressions(n: int, g: torch.Generator, offset: int = 0) -> torch.Tensor:
    """Arithmetic progressions with steps 1-3 over half of the vocabulary (``offset + 0 .. 15``)."""
    half = VOCAB // 2
    start = torch.randint(0, half, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return offset + (start + step * torch.arange(LENGTH)) % half


def _motifs(n: int, g: torch.Generator) -> torch.Tensor:
    """Another pattern: a random 3-token motif repeated, over the upper half of the vocabulary."""
    motif = torch.randint(VOCAB // 2, VOCAB, (n, 3), generator=g)
    return motif.repeat(1, -(-LENGTH // 3))[:, :LENGTH]


def lm_data(seed: int, per_source: int = 1500, meta_size: int = 64, test_size: int = 512) -> dict[str, Any]:
    """Three token sources (target progressions, random tokens, motifs), meta and test sets from the target pattern
    only. Inputs and labels are the same sequences (the loss shifts them)."""
    g = torch.Generator().manual_seed(2000 + seed)
    target = _progressions(per_source, g)
    random = torch.randint(0, VOCAB, (per_source, LENGTH), generator=g)
    other = _progressions(per_source, g, offset=VOCAB // 2) if OTHER == "progressions" else _motifs(per_source, g)
    meta, test = _progressions(meta_size, g), _progressions(test_size, g)
    return {"sources": [(s, s) for s in (target, random, other)], "meta": (meta, meta), "test": (test, test)}


# ---------------------------------------------------------------- models


def classification_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 10, 10),
    )


class TinyLM(nn.Module):
    """A random-init tiny ``LlamaForCausalLM`` returning its logits ``(batch, length, vocab)``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=LENGTH, attn_implementation="sdpa",
        )  # fmt: skip
        self.llama = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llama(input_ids=input_ids).logits


TASKS: dict[str, dict[str, Any]] = {
    "classification": {
        "data": classification_data,
        "model": classification_model,
        "optimizer": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "loss": lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
        "reweight": {},
        "higher_is_better": True,
        "metric": "test accuracy",
    },
    "lm": {
        "data": lm_data,
        "model": TinyLM,
        "optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
        "loss": causal_lm_loss,
        "reweight": {},  # the library defaults, as for the classification mixture
        "higher_is_better": False,
        "metric": "target loss",
    },
}
# The classification mixture with three equally clean sources: what the learned weights do with nothing to learn.
TASKS["classification-equal"] = {
    **TASKS["classification"], "data": lambda seed: classification_data(seed, corrupt=False)
}


# ---------------------------------------------------------------- training


@torch.no_grad()
def evaluate(task: str, model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = test
    out = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    model.train()
    if task.startswith("classification"):  # accuracy; the LM: per-token loss
        return float((out.argmax(-1) == y).float().mean())
    return float(causal_lm_loss(out, y).mean())


def train(
    task: str, data: dict[str, Any], seed: int, steps: int, mode: str, mixture: tuple[float, ...] | None = None,
    history_every: int = 10, **reweight_kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """One run. ``mode``: ``"uniform"`` (all weights 1), ``"fixed"`` (the group weights ``3 * mixture``, normalised
    per batch as ``normalization="sum"``) or ``"learned"`` (``net="groups"``; ``reweight_kwargs`` go to
    :class:`~reweight.MetaReweighter`, e.g. ``net_kwargs``). Returns the metric, the learned weights over training
    and the seconds per step."""
    spec = TASKS[task]
    torch.manual_seed(seed)
    model = spec["model"]()
    opt = spec["optimizer"](model.parameters())
    g = torch.Generator().manual_seed(seed)
    b = PER_SOURCE[task]
    groups = torch.arange(3).repeat_interleave(b)
    history = GroupWeightHistory()
    rw = None
    if mode == "learned":
        kwargs = {"net": "groups", "net_kwargs": {"num_groups": 3, "group_names": NAMES[task]}, **spec["reweight"]}
        kwargs.update(reweight_kwargs)
        meta = [data["meta"]]  # the whole (small) clean meta set as one batch
        rw = MetaReweighter(model, opt, meta, loss_fn=spec["loss"], seed=seed, **kwargs)
        history.record(rw, 0)
    fixed = None
    if mode == "fixed":
        assert mixture is not None
        fixed = (3 * torch.tensor(mixture, dtype=torch.float32))[groups]
        fixed = fixed * len(fixed) / fixed.sum()
    start = time.perf_counter()
    for t in range(steps):
        idx = [torch.randint(0, len(s[1]), (b,), generator=g) for s in data["sources"]]
        x = torch.cat([s[0][i] for s, i in zip(data["sources"], idx, strict=True)])
        y = torch.cat([s[1][i] for s, i in zip(data["sources"], idx, strict=True)])
        logits = model(x)
        losses = spec["loss"](logits, y)
        if rw is not None:
            weights = rw.step(x, y, logits, groups=groups)
        elif fixed is not None:
            weights = fixed
        else:
            weights = torch.ones_like(losses)
        opt.zero_grad()
        (weights * losses).mean().backward()
        opt.step()
        if rw is not None and (t + 1) % history_every == 0:
            history.record(rw, t + 1)
    seconds = (time.perf_counter() - start) / steps
    out = {"metric": evaluate(task, model, data["test"]), "sec_per_step": seconds, "history": history}
    out["meta_metric"] = evaluate(task, model, data["meta"])  # the same metric on the meta set, to choose by
    if rw is not None:
        out["group_weights"] = history.rows[-1]
    return out


def simplex_grid(steps: int = GRID) -> list[tuple[float, ...]]:
    """Every mixture ``(i, j, k) / steps`` of three sources, and the uniform one."""
    grid = [
        (i / steps, j / steps, (steps - i - j) / steps) for i, j in itertools.product(range(steps + 1), repeat=2)
        if i + j <= steps
    ]  # fmt: skip
    return grid if steps % 3 == 0 else [*grid, (1 / 3, 1 / 3, 1 / 3)]


def oracle(task: str, data: dict[str, Any], seed: int, steps: int, grid: int = GRID) -> dict[str, Any]:
    """The best fixed mixture of the grid on the test metric (an oracle: it looks at the test set)."""
    better = max if TASKS[task]["higher_is_better"] else min
    runs = {m: train(task, data, seed, steps, "fixed", m)["metric"] for m in simplex_grid(grid)}  # uniform included
    best = better(runs, key=runs.get)
    return {"mixture": best, "metric": runs[best], "grid": runs}


def compare(task: str, seed: int, steps: int, grid: int = GRID, within: str | None = None) -> dict[str, Any]:
    """Uniform, learned (and learned with a per-sample ``within`` net), and the oracle, on one seed."""
    data = TASKS[task]["data"](seed)
    uniform = train(task, data, seed, steps, "uniform")
    learned = train(task, data, seed, steps, "learned")
    out = {"uniform": uniform, "learned": learned, "oracle": oracle(task, data, seed, steps, grid)}
    if within is not None:
        kwargs = {"num_groups": 3, "group_names": NAMES[task], "within": within}
        out[f"learned+{within}"] = train(task, data, seed, steps, "learned", net_kwargs=kwargs)
    return out


def main(
    steps_cls: int = 400, steps_lm: int = 300, seed: int = 0, out: str = "outputs", grid: int = GRID, threads: int = 1
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    Path(out).mkdir(parents=True, exist_ok=True)
    results = {}
    for task, steps in (("classification", steps_cls), ("lm", steps_lm)):
        r = compare(task, seed, steps, grid)
        r["learned"]["history"].plot(Path(out) / f"group_weights_{task}.png", title=f"learned group weights: {task}")
        results[task] = r
        metric = TASKS[task]["metric"]
        cost = r["learned"]["sec_per_step"] / r["uniform"]["sec_per_step"]
        print(f"\n{task} ({steps} steps, seed {seed}); {metric}:")
        print(f"| uniform | learned | oracle {r['oracle']['mixture']} | cost per step (learned / uniform) |")
        print("| --- | --- | --- | --- |")
        print(
            f"| {r['uniform']['metric']:.4f} | {r['learned']['metric']:.4f} | {r['oracle']['metric']:.4f} | "
            f"{r['learned']['sec_per_step'] * 1e3:.1f} ms / {r['uniform']['sec_per_step'] * 1e3:.1f} ms = {cost:.2f}x |"
        )
        print("learned group weights:", {k: round(v, 3) for k, v in r["learned"]["group_weights"].items()})
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps-cls", type=int, default=400)
    parser.add_argument("--steps-lm", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=GRID)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs")
    a = parser.parse_args()
    main(a.steps_cls, a.steps_lm, a.seed, a.out, a.grid, a.threads)
