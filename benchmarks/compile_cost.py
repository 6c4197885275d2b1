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
from _models import TextTransformer  # noqa: E402

from reweight import MetaReweighter  # noqa: E402

CLOCK: Callable[[], float] = time.process_time


def make_model(name: str, batch: int, seed: int = 0):
    """``(model, inputs, targets, meta inputs, meta targets, loss_fn)`` with synthetic data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loss_fn = None
    if name == "mlp":
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 10)
        )
        x, xm = torch.randn(batch, 32, generator=g), torch.randn(batch, 32, generator=g)
        k = 10
    elif name == "transformer":  # the step_cost.py benchmark transformer
        model, k = TextTransformer(), 4
        x, xm = (torch.randint(0, 1000, (batch, 32), generator=g) for _ in range(2))
    elif name == "vit":  # timm's ViT-Tiny (192 wide, 12 blocks) on 32x32 images, patch 4: 64 tokens
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
        x, xm = torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)
        k = 10
    elif name == "llama_lora":  # a 2-block random Llama (hidden 64) with LoRA r=8 on every projection
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        from reweight.integrations.transformers import per_sample_loss

        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=32,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=targets))
        ids, idm = (torch.randint(0, 256, (batch, 32), generator=g) for _ in range(2))
        lm_loss = per_sample_loss("causal_lm")
        return model, {"input_ids": ids}, ids, {"input_ids": idm}, idm, lm_loss
    else:
        raise ValueError(f"unknown model {name!r}")
    y, ym = torch.randint(0, k, (batch,), generator=g), torch.randint(0, k, (batch,), generator=g)
    return model, x, y, xm, ym, loss_fn


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
        rw = MetaReweighter(forward, opt, [(xm, ym)], seed=0, engine=engine, **kw) if reweight else None
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
