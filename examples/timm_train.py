"""Meta reweighting in a timm train.py-style loop: a randomly initialised timm model on noisy digits, offline.

The data are scikit-learn's bundled 8x8 digits (no download), upscaled to 3x16x16; a fraction of the
training labels is flipped and 10 clean images per class form the meta set. The loop is timm's
``train_one_epoch`` in miniature: optional Mixup / CutMix, ``task(input, target)``, backward, step, and a
``CheckpointSaver`` that stores the reweighter with the task state.

    python examples/timm_train.py --noise 0.4 --epochs 4 [--mixup] [--smoothing 0.1]
"""

from __future__ import annotations

import argparse
import tempfile

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from timm.data import Mixup
from timm.loss import create_classification_loss
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from reweight.integrations.timm import ReweightClassificationTask


def digits(noise: float, meta_per_class: int, seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset, Tensor]:
    """Train (noisy), meta (clean) and test sets, and the train set's clean mask."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    test, rest = order[:400], order[400:]
    meta = torch.cat([rest[y[rest] == c][:meta_per_class] for c in range(10)])
    train = rest[~torch.isin(rest, meta)]
    noisy = y[train].clone()
    flip = torch.rand(len(train), generator=g) < noise
    noisy[flip] = (noisy[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
    return (
        TensorDataset(x[train], noisy),
        TensorDataset(x[meta], y[meta]),
        TensorDataset(x[test], y[test]),
        ~flip,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="test_efficientnet", help="any timm model name (built with pretrained=False)"
    )
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--net", default="lossnet")
    parser.add_argument("--mixup", action="store_true", help="Mixup/CutMix with soft targets")
    parser.add_argument("--smoothing", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke tests)")
    args = parser.parse_args()

    torch.manual_seed(0)
    train, meta, test, clean = digits(args.noise, meta_per_class=10, seed=0)
    if args.limit is not None:
        train = TensorDataset(*(t[: args.limit] for t in train.tensors))
        clean = clean[: args.limit]
    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    mixup = None
    if args.mixup:
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=args.smoothing, num_classes=10)
    criterion = create_classification_loss(smoothing=args.smoothing, soft_targets=mixup is not None)
    meta_loader = DataLoader(meta, batch_size=50, shuffle=True)  # clean, never mixed
    task = ReweightClassificationTask(model, meta_loader, criterion=criterion, net=args.net, seed=0, verbose=False)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    task.bind_optimizer(optimizer)
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    with tempfile.TemporaryDirectory() as out:
        saver = CheckpointSaver(model, optimizer, task=task, checkpoint_dir=out, max_history=1)
        for epoch in range(args.epochs):
            task.train()
            for x, y in loader:
                if mixup is not None:
                    x, y = mixup(x, y)
                loss = task(x, y)["loss"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            accuracy = evaluate(model, test)
            saver.save_checkpoint(epoch, metric=accuracy)
            stats = task.pop_weight_stats()  # means over the epoch's training forwards
            spread = f"{stats['weight_min']:.2f}..{stats['weight_max']:.2f}, std {stats['weight_std']:.3f}"
            print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}, weights {spread}")
    print(f"checkpoint task state holds the reweighter at step {task.get_task_state()['reweighter']['step']}")
    print(f"{int((~clean).sum())} of {len(clean)} training labels were flipped")


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(-1) == y).float().mean())


if __name__ == "__main__":
    main()
