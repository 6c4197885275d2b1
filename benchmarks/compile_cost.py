"""Cost of a reweighted step over a plain one, eager and ``torch.compile``d, and the fixed cost of a small step.

For each model, each repeat times a plain training step and then a reweighted one (default options:
``engine="auto"``, ``lookahead="full"``, ``interval=1``) on identical copies, in eager mode and with the
model compiled (``torch.compile(model)``; the reweighter gets the compiled wrapper, the user's forward and
backward run compiled, the meta step runs its own eager passes on the bare module). Reported: the median
plain and reweighted step times, their ratio, and the difference (what reweighting adds to a step). CPU time
of this process by default (steadier on a shared machine).

    python benchmarks/compile_cost.py --model mlp transformer vit --batch 16 --repeats 15
    python benchmarks/compile_cost.py --model llama_lora --engines ghost forward --repeats 7
    python benchmarks/compile_cost.py --model llama_lora --modes eager --lookahead "*layers.1.*lora*"
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import make_problem, per_sample_loss  # noqa: E402

from reweight import MetaReweighter  # noqa: E402

CLOCK: Callable[[], float] = time.process_time


def make_model(name: str, batch: int, seed: int = 0):
    """``(model, inputs, targets, meta inputs, meta targets, loss_fn)`` with synthetic data (``_models``'s
    builders; the meta batch as large as the training batch); ``loss_fn`` is ``None`` for cross-entropy."""
    model, (x, y), (xm, ym), _ = make_problem(name, batch, batch, seed)
    return model, x, y, xm, ym, per_sample_loss(name) if name == "llama_lora" else None


def _loss(loss_fn, out, y):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits, y, reduction="none") if loss_fn is None else loss_fn(logits, y)


def make_steps(
    name: str, batch: int, compiled: bool, engine: str, lookahead: str | list[str] = "full"
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A plain and a reweighted training step, each on its own copy of the model."""
    base, x, y, xm, ym, loss_fn = make_model(name, batch)
    steps = []
    for reweight in (False, True):
        model = copy.deepcopy(base).train()
        forward = torch.compile(model) if compiled else model
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        kw: dict = {"lookahead": lookahead} if loss_fn is None else {"loss_fn": loss_fn, "lookahead": lookahead}
        rw = MetaReweighter(forward, opt, [(xm, ym)], net="lossnet", seed=0, engine=engine, **kw) if reweight else None
        call = (lambda f, i: f(**i)) if isinstance(x, dict) else (lambda f, i: f(i))

        def step(forward=forward, opt=opt, rw=rw, call=call) -> None:
            out = call(forward, x)
            losses = _loss(loss_fn, out, y)
            w = rw.step(x, y, out) if rw is not None else torch.ones_like(losses)
            opt.zero_grad(set_to_none=True)
            (w * losses).mean().backward()
            opt.step()

        steps.append(step)
    return steps[0], steps[1]


def measure(
    name: str, batch: int, compiled: bool, engine: str, repeats: int, lookahead: str | list[str] = "full"
) -> dict[str, float]:
    plain, reweighted = make_steps(name, batch, compiled, engine, lookahead)
    for _ in range(3):  # warm-up: compilation, allocator, lazy imports
        plain(), reweighted()
    p_times, r_times = [], []
    for _ in range(repeats):
        start = CLOCK()
        plain()
        p_times.append(CLOCK() - start)
        start = CLOCK()
        reweighted()
        r_times.append(CLOCK() - start)
    p, r = statistics.median(p_times), statistics.median(r_times)
    ratio = statistics.median(b / a for a, b in zip(p_times, r_times))
    return {"plain_ms": 1e3 * p, "reweighted_ms": 1e3 * r, "ratio": ratio, "added_ms": 1e3 * (r - p)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp", "transformer", "vit"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--engines", nargs="+", default=["auto"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--lookahead", nargs="+", default=["full"], help="'full' or parameter name patterns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    lookahead = "full" if args.lookahead == ["full"] else args.lookahead
    rows = []
    print(
        f"lookahead {lookahead}, batch {args.batch}, {args.threads} thread(s), {args.clock} clock, "
        f"median of {args.repeats}"
    )
    print("| model | engine | mode | plain step ms | reweighted step ms | ratio | added ms |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.model:
        for engine in args.engines:
            for mode in args.modes:
                row = measure(name, args.batch, mode == "compiled", engine, args.repeats, lookahead)
                rows.append({"model": name, "engine": engine, "mode": mode, **row})
                print(
                    f"| {name} | {engine} | {mode} | {row['plain_ms']:.2f} | {row['reweighted_ms']:.2f} | "
                    f"{row['ratio']:.2f} | {row['added_ms']:.2f} |",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
