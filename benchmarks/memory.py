"""Memory over a long run: resident set size (and live tensors) every ``--every`` steps of reweighted training.

    python benchmarks/memory.py                      # 10,000 steps, MetaInfoNet, forward engine
    python benchmarks/memory.py --net lossnet --engine reverse --steps 10000

Trains an MLP (784-256-10, batch 128, meta batch 100) on random data with the reweighter in the loop
and prints RSS (from /proc, Linux) and the number of live tensors; on CUDA also the allocated memory.
A leak shows as RSS or the tensor count rising after the first report; the last line gives the
growth from the first report (taken after warm-up) to the end. Results: docs/robustness.md.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter


def rss_mib() -> float:
    """Resident set size of this process in MiB (``nan`` where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return float("nan")


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000)
    parser.add_argument("--net", default="metainfonet")
    parser.add_argument("--engine", default="forward")
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    meta = [(torch.randn(100, 784, generator=g), torch.randint(0, 10, (100,), generator=g)) for _ in range(10)]
    data = [(torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(50)]
    rw = MetaReweighter(model, opt, meta, net=args.net, engine=args.engine, interval=args.interval, seed=0)

    print(f"net={args.net} engine={args.engine} interval={args.interval} device={device} threads={args.threads}")
    header = f"{'step':>7} {'RSS MiB':>9} {'tensors':>8} {'ms/step':>8}"
    print(header + (f" {'CUDA MiB':>9}" if device.type == "cuda" else ""))
    first = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in data[step % len(data)])
        logits = model(x)
        weights = rw.step(x, y, logits)
        opt.zero_grad(set_to_none=True)
        (weights * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
        if step % args.every == 0:
            ms = 1000 * (time.perf_counter() - start) / args.every
            rss, count = rss_mib(), live_tensors()
            first = first or (step, rss, count)
            line = f"{step:>7} {rss:>9.1f} {count:>8} {ms:>8.2f}"
            if device.type == "cuda":
                line += f" {torch.cuda.memory_allocated(device) / 2**20:>9.1f}"
            print(line, flush=True)
            start = time.perf_counter()
    if first is not None:
        step0, rss0, count0 = first
        rss, count = rss_mib() - rss0, live_tensors() - count0
        print(f"growth from step {step0} to {args.steps}: RSS {rss:+.1f} MiB, tensors {count:+d}")


if __name__ == "__main__":
    main()
