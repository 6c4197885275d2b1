"""The demo: a 1-D CNN on MNIST-1D with 40% Flip-1 label noise, with and without meta reweighting.

Trains Standard, LossNet (Meta-Weight-Net), MetaInfoNet, the gated net (the two blended by a gate the
meta set learns) and the gated net reading each sample's loss history (``loss_history=True``, the batch's
indices as ``sample_ids``) on ONE schedule (same model initialisation, data, batches, optimizer and
learning-rate schedule), prints a results table and writes into ``--out`` (default ``outputs/``):

- ``weights_clean_vs_corrupted.png``: per-sample weight distributions of clean and corrupted samples
  (the paper's Figure 1), averaged over the last epoch;
- ``test_accuracy.png``: test accuracy per epoch of the runs;
- ``weight_vs_loss.png`` and ``lowest_weights_<net>.csv``: the diagnostics API (the lowest-weight samples
  are the likely mislabelled ones).

Everything is generated offline (``mnist1d.data.make_dataset``); it takes a few minutes on a laptop CPU.
The schedule is the one of ``benchmarks/accuracy.py`` for mnist1d (see ``docs/results.md``).

    python examples/noisy_labels.py [--epochs 30] [--num-samples 4000] [--threads 1] [--out outputs]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from reweight import MetaReweighter  # noqa: E402
from reweight.data import flip1_noise, load_mnist1d, meta_split  # noqa: E402
from reweight.diagnostics import WeightRecorder, plot_weight_vs_loss, weight_auroc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _models import mnist1d_cnn  # noqa: E402  (the 1-D CNN of benchmarks/accuracy.py, defined once)

METHODS = {
    "Standard": None, "LossNet": "lossnet", "MetaInfoNet": "metainfonet", "Gated": "gated", "Gated + history": "gated"
}
HISTORY = {"Gated + history"}  # loss_history=True: step(..., sample_ids=idx)


def make_data(num_samples: int, noise: float, seed: int) -> dict:
    """mnist1d train/test, a clean balanced meta set (20 per class) and Flip-1 noise on the rest."""
    ds = load_mnist1d(num_samples)
    split = meta_split(ds.y_train, 20, num_classes=10, seed=seed)
    noisy = flip1_noise(ds.y_train[split.train], noise, num_classes=10, seed=seed)
    t = torch.from_numpy
    return {
        "x": t(ds.x_train[split.train]),
        "y": t(noisy.labels),
        "corrupted": noisy.corrupted,
        "meta": torch.utils.data.TensorDataset(t(ds.x_train[split.meta]), t(ds.y_train[split.meta])),
        "xt": t(ds.x_test),
        "yt": t(ds.y_test),
    }


def train(data: dict, net: str | None, epochs: int, seed: int, desc: str, history: bool = False) -> dict:
    """One run; the schedule is identical for every ``net`` (``None`` is standard training); ``history`` gives
    the net each sample's loss history."""
    torch.manual_seed(seed)
    model = mnist1d_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [round(0.6 * epochs), round(0.8 * epochs)], 0.1)
    g = torch.Generator().manual_seed(seed)
    meta_loader = torch.utils.data.DataLoader(data["meta"], batch_size=100, shuffle=True, generator=g)
    rw = MetaReweighter(model, opt, meta_loader, net=net, loss_history=history, seed=seed) if net else None
    rec = WeightRecorder()
    n, acc = len(data["y"]), []
    for epoch in tqdm(range(epochs), desc=f"{desc:<12}", leave=True):
        for idx in torch.randperm(n, generator=g).split(100):
            x, y = data["x"][idx], data["y"][idx]
            logits = model(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            ids = idx if history else None  # the samples' indices, for the loss history
            weights = rw.step(x, y, logits, sample_ids=ids) if rw else torch.ones_like(losses)  # the added line
            rec.record(idx, losses.detach(), weights, step=epoch)
            opt.zero_grad()
            (weights * losses).mean().backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            model.eval()
            acc.append((model(data["xt"]).argmax(1) == data["yt"]).float().mean().item())
            model.train()
    return {"acc": acc, "recorder": rec, "last_epoch": epochs - 1, "net": rw.net if rw is not None else None}


def plot_figure1(runs: dict, corrupted: np.ndarray, path: str) -> str:
    """Weight histograms of clean (green) vs corrupted (red) samples, one panel per reweighting method."""
    names = [m for m in runs if METHODS[m]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        s = runs[name]["recorder"].per_sample(since_step=runs[name]["last_epoch"])
        w, c = s["weight"], corrupted[s["index"]]
        edges = np.linspace(w.min(), w.max() + 1e-9, 41)
        ax.hist(w[~c], bins=edges, color="tab:green", alpha=0.6, label="clean")
        ax.hist(w[c], bins=edges, color="tab:red", alpha=0.6, label="corrupted")
        ax.set_title(f"{name} (AUROC {weight_auroc(w, c):.2f})")
        ax.set_xlabel("sample weight (last epoch)")
        ax.set_ylabel("training samples")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(runs: dict, path: str) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, r in runs.items():
        ax.plot(np.arange(1, len(r["acc"]) + 1), 100 * np.array(r["acc"]), label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST-1D, 40% Flip-1 noise, one schedule")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(
    epochs: int = 30, num_samples: int = 4000, noise: float = 0.4, seed: int = 0, out: str = "outputs"
) -> dict[str, dict[str, float]]:
    """Run the demo; returns ``{method: {"final", "last", "auroc"}}`` and writes the figures into ``out``."""
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    data = make_data(num_samples, noise, seed)
    c = data["corrupted"]
    print(
        f"MNIST-1D: {len(data['y'])} training samples, {c.mean():.1%} corrupted (Flip-1, p={noise}), "
        f"{len(data['meta'])} clean meta samples, {len(data['yt'])} test samples"
    )
    runs = {name: train(data, net, epochs, seed, name, name in HISTORY) for name, net in METHODS.items()}

    tail = max(1, round(0.1 * epochs))
    table: dict[str, dict[str, float]] = {}
    for name, r in runs.items():
        s = r["recorder"].per_sample(since_step=r["last_epoch"])
        table[name] = {
            "final": r["acc"][-1],
            "last": float(np.mean(r["acc"][-tail:])),
            "auroc": weight_auroc(s["weight"], c[s["index"]]) if METHODS[name] else float("nan"),
        }
    print(f"\n| method | final test acc | mean of last {tail} epochs | weight AUROC clean vs corrupted |")
    print("| --- | --- | --- | --- |")
    for name, row in table.items():
        auroc = "–" if np.isnan(row["auroc"]) else f"{row['auroc']:.3f}"
        print(f"| {name} | {100 * row['final']:.1f}% | {100 * row['last']:.1f}% | {auroc} |")

    g = float(runs["Gated"]["net"].trust_in_loss())
    print(f"Gated: the learned gate gives LossNet {g:.0%} of the weight and MetaInfoNet {1 - g:.0%}")

    files = [plot_figure1(runs, c, os.path.join(out, "weights_clean_vs_corrupted.png"))]
    files.append(plot_accuracy(runs, os.path.join(out, "test_accuracy.png")))
    s = runs["MetaInfoNet"]["recorder"].per_sample(since_step=runs["MetaInfoNet"]["last_epoch"])
    title = f"MetaInfoNet, last epoch ({noise:.0%} Flip-1)"
    path = os.path.join(out, "weight_vs_loss.png")
    files.append(plot_weight_vs_loss(s["loss"], s["weight"], path, c[s["index"]], title=title))
    for name in ("LossNet", "MetaInfoNet", "Gated", "Gated + history"):
        rec = runs[name]["recorder"]
        stem = name.lower().replace(" + ", "_")
        path = rec.export_lowest(os.path.join(out, f"lowest_weights_{stem}.csv"), 200, runs[name]["last_epoch"])
        files.append(path)
        low = rec.lowest_weight_ids(200, runs[name]["last_epoch"])
        print(f"{name}: {c[low].mean():.0%} of its 200 lowest-weight samples are corrupted (base rate {c.mean():.0%})")
    print("wrote " + ", ".join(files))
    print(f"done in {time.time() - t0:.0f} s")
    return table


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--num-samples", type=int, default=4000, help="mnist1d samples, 80%% train / 20%% test")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs")
    p.add_argument("--threads", type=int, default=1, help="torch threads; one is fastest for this tiny CNN")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    main(a.epochs, a.num_samples, a.noise, a.seed, a.out)
