"""Data-parallel reweighting with DistributedDataParallel: two CPU processes on the gloo backend.

    torchrun --nproc_per_node=2 examples/ddp_train.py [--epochs 20]

(``python examples/ddp_train.py`` runs the same script as a single process.) Each rank trains on its
shard of every batch (``DistributedSampler``) and draws meta batches from its own shard of the clean
meta set; the reweighter sees the DDP-wrapped model and does the rest: the look-ahead is that of the
global batch, weights are normalised over the global batch, and every rank keeps an identical weighting
net. Pass the same ``seed`` on every rank. Data: sklearn's handwritten digits, 40% of labels flipped.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from reweight import MetaReweighter

NOISE, BATCH, SEED = 0.4, 64, 0


def digits_with_noisy_labels() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train (noisy) / clean meta / test splits of sklearn's digits; the same on every rank."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(SEED)
    perm = torch.randperm(len(y), generator=g)
    test, meta, train = perm[:500], perm[500:600], perm[600:]
    noisy = y[train].clone()
    flip = torch.rand(len(train), generator=g) < NOISE
    noisy[flip] = (noisy[flip] + 1) % 10
    return TensorDataset(x[train], noisy), TensorDataset(x[meta], y[meta]), TensorDataset(x[test], y[test])


def main() -> None:
    parser = argparse.ArgumentParser(description="Data-parallel reweighting on digits with 40% noisy labels")
    parser.add_argument("--epochs", type=int, default=20)
    epochs = parser.parse_args().epochs
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    train_set, meta_set, test_set = digits_with_noisy_labels()
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=SEED, drop_last=True)
    train_loader = DataLoader(train_set, batch_size=BATCH // world, sampler=sampler, drop_last=True)
    # each rank draws from its own shard of the meta set; the reweighter reshuffles it every pass
    meta_loader = DataLoader(Subset(meta_set, range(rank, len(meta_set), world)), batch_size=50 // world, shuffle=True)

    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reweighter = MetaReweighter(model, optimizer, meta_loader, net="metainfonet", seed=SEED)  # the same seed everywhere

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            weights = reweighter.step(x, y, logits)
            loss = (weights * F.cross_entropy(logits, y, reduction="none")).mean()  # DDP averages the gradients
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    # every rank holds the same weighting net: compare a checksum of its parameters
    checksum = torch.stack([p.detach().double().sum() for p in reweighter.net.parameters()]).sum().reshape(1)
    if distributed:
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        assert all(torch.equal(g, checksum) for g in gathered), "weighting nets differ across ranks"
    if rank == 0:  # evaluate the bare module: a forward through DDP on one rank only could wait for the others
        x, y = test_set.tensors
        network = model.module if distributed else model
        with torch.no_grad():
            accuracy = (network(x.to(device)).argmax(1).cpu() == y).float().mean().item()
        print(f"world size {world}: test accuracy {accuracy:.3f} after {epochs} epochs with 40% noisy labels")
        print(f"weighting net identical on all ranks (checksum {checksum.item():.6f})")
    if distributed:
        del model, reweighter, optimizer  # release DDP's reducer before the group goes
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
