"""Peak memory per rank of a reweighted FSDP2 step against a plain FSDP2 step (two gloo ranks on the CPU).

An MLP of ``--layers`` blocks (Linear ``--width`` x ``--width``, LayerNorm, Tanh), each block ``fully_shard``-ed,
then the root. One warm-up step of each kind, then, per rank, the peak of the bytes held by live tensors
(the profiler's allocation events, :func:`step_cost.live_by_phase`) over those held when the measured call
starts, for:

- ``plain``: the user's forward, backward and ``optimizer.step()`` of a plain FSDP2 training step;
- ``reweighted``: the same step with ``reweighter.step`` (``engine="ghost"``, every step a meta update)
  between the forward and the backward, and that call's own phases.

The model's full parameter size and one rank's shard are printed beside them. Run:

    python benchmarks/fsdp_memory.py --layers 8 --width 1024 --batch 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_cost import live_by_phase  # noqa: E402

from reweight import MetaReweighter  # noqa: E402

WORLD, CLASSES = 2, 10


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Tanh()) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Linear(width, CLASSES))


def _worker(rank: int, init_file: str, args: argparse.Namespace) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))  # fmt: skip
    model = _model(args.layers, args.width)
    full_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    for block in model:
        fully_shard(block)
    fully_shard(model)
    shard_mb = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 2**20
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randint(0, CLASSES, (args.batch,), generator=g)
    meta = [(torch.randn(args.batch, args.width, generator=g), torch.randint(0, CLASSES, (args.batch,), generator=g))]
    rw = MetaReweighter(model, opt, meta, net="lossnet", engine="ghost", seed=0, num_classes=CLASSES)

    def plain() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def reweighted() -> None:
        logits = model(x)
        w = rw.step(x, y, logits)
        loss = (w * F.cross_entropy(logits, y, reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    plain(), reweighted()  # warm-up: optimizer state, FSDP's lazy init, the weighting net
    results = {"plain": live_by_phase(plain), "reweighted": live_by_phase(reweighted)}
    lines = [f"rank {rank}: model {full_mb:.1f} MiB of parameters, this rank's shard {shard_mb:.1f} MiB"]
    lines.append(f"  plain step      peak {results['plain']['step'][1]:8.1f} MiB")
    lines.append(f"  reweighted step peak {results['reweighted']['step'][1]:8.1f} MiB")
    for phase, (start, peak) in results["reweighted"].items():
        if phase != "step":
            lines.append(f"    {phase:<22} at start {start:8.1f}  peak {peak:8.1f} MiB")
    for r in range(WORLD):
        dist.barrier()
        if r == rank:
            print("\n".join(lines), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {WORLD} gloo ranks, {args.layers} blocks of width {args.width}, "
          f"batch {args.batch} per rank; MiB of live tensors over the call's start")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), args), nprocs=WORLD, start_method="spawn")


if __name__ == "__main__":
    main()
