"""An AdamW-trained classifier needs no ``lookahead_lr``: the quickstart's digits with AdamW at lr 5e-3.

The meta-gradient is proportional to the look-ahead's lr, so at an Adam-sized lr it is small; the net's
update divides it by its scale (and its optimizer's decay is decoupled), so the net learns as it does under
SGD at 0.1. Trains once with the defaults and once with ``lookahead_lr=0.1`` (an expert's option that moves
where the look-ahead lands) and prints each run's test accuracy and whether ``WeakMetaGradientWarning`` fired.

    python examples/lookahead_lr.py [--epochs 30] [--net metainfonet]
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from quickstart import SEED, digits_with_noisy_labels
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reweight import MetaReweighter, weighted_loss
from reweight.monitor import WeakMetaGradientWarning


def train(net: str, lookahead_lr: float | None, epochs: int) -> tuple[float, bool]:
    """Test accuracy, and whether the weak-meta-gradient warning fired."""
    (x, y), (xm, ym), (xt, yt) = digits_with_noisy_labels()
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    meta_loader = DataLoader(TensorDataset(xm, ym), batch_size=50, shuffle=True)
    reweighter = MetaReweighter(model, optimizer, meta_loader, net=net, lookahead_lr=lookahead_lr, seed=SEED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeakMetaGradientWarning)
        for _ in range(epochs):
            for xb, yb in train_loader:
                logits = model(xb)
                weights = reweighter.step(xb, yb, logits)
                loss = weighted_loss(weights, F.cross_entropy(logits, yb, reduction="none"))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    return accuracy, any(issubclass(w.category, WeakMetaGradientWarning) for w in caught)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--net", default="metainfonet")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"digits, 40% flipped labels, AdamW lr 5e-3, net={args.net}, {args.epochs} epochs")
    for lookahead_lr in (None, 0.1):
        accuracy, warned = train(args.net, lookahead_lr, args.epochs)
        print(f"lookahead_lr={lookahead_lr}: test accuracy {accuracy:.3f}, WeakMetaGradientWarning: {warned}")
