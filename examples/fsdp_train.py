"""Reweighting a model sharded by FSDP2 (``fully_shard``): two CPU processes on the gloo backend.

    torchrun --nproc-per-node 2 examples/fsdp_train.py [--epochs 10]

Each rank holds half of every parameter (``DTensor`` shards); FSDP gathers one block at a time for its
forward and backward. The reweighter is given the sharded model and picks the ``ghost`` engine, the one
that declares FSDP2 support: its look-ahead writes ``theta_hat`` into the local shards and runs the meta
batch through the module itself, so the meta-gradient is exactly that of one process on the concatenated
batches (tests/test_fsdp.py). An engine without FSDP2 support is refused at construction; the script shows
that message too. Data: sklearn's handwritten digits, 40% of labels flipped.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, Subset

from reweight import MetaReweighter

try:  # the data of the DDP example
    from ddp_train import BATCH, SEED, digits_with_noisy_labels
except ImportError:  # pragma: no cover - run from elsewhere
    from examples.ddp_train import BATCH, SEED, digits_with_noisy_labels


def main() -> None:
    parser = argparse.ArgumentParser(description="FSDP2 reweighting on digits with 40% noisy labels")
    parser.add_argument("--epochs", type=int, default=10)
    epochs = parser.parse_args().epochs
    if "RANK" not in os.environ:
        raise SystemExit("launch with: torchrun --nproc-per-node 2 examples/fsdp_train.py")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    train_set, meta_set, test_set = digits_with_noisy_labels()
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=SEED, drop_last=True)
    train_loader = DataLoader(train_set, batch_size=BATCH // world, sampler=sampler, drop_last=True)
    meta_loader = DataLoader(Subset(meta_set, range(rank, len(meta_set), world)), batch_size=50 // world, shuffle=True)

    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 10))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # one unit per Linear, then the root (the LayerNorm)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    try:
        MetaReweighter(model, optimizer, meta_loader, engine="forward", seed=SEED)
    except ValueError as err:
        if rank == 0:
            print(f"engine='forward' is refused: {err}")
    reweighter = MetaReweighter(model, optimizer, meta_loader, net="metainfonet", seed=SEED)  # the same seed everywhere
    if rank == 0:
        print(f"engine {reweighter.engine_name!r}: {reweighter.engine_reason}")

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in train_loader:
            logits = model(x)
            weights = reweighter.step(x, y, logits)
            loss = (weights * F.cross_entropy(logits, y, reduction="none")).mean()  # FSDP averages the gradients
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    checksum = torch.stack([p.detach().double().sum() for p in reweighter.net.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    assert all(torch.equal(g, checksum) for g in gathered), "weighting nets differ across ranks"
    x, y = test_set.tensors
    with torch.no_grad():  # every rank runs the sharded forward (it gathers each block from all ranks)
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if rank == 0:
        print(f"world size {world} (FSDP2): test accuracy {accuracy:.3f} after {epochs} epochs with 40% noisy labels")
        print(f"weighting net identical on all ranks (checksum {checksum.item():.6f})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
