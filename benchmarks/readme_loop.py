"""The README's three lines as a user runs them: scikit-learn's digits, the README's MLP, SGD (momentum 0.9) at
``--lr``, batches of 64, 30 epochs, 10 clean samples per class as the meta set (meta batch 50), each net with its
defaults against plain training of the same seed, on clean labels and under 40% random labels. Each cell is the
test accuracy's difference to plain training (500 test samples); ``*``: the evidence of label noise was shown (the
veto acted). Rows go to ``results/readme_loop.jsonl`` (a key already there is skipped); ``--report`` prints the
stored table. Offline, a few minutes on a CPU.

    python benchmarks/readme_loop.py --lr 0.1 --seeds 0 1 2 3 4 5 6 7 8 9
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _store  # noqa: E402

from reweight import MetaReweighter, weighted_loss  # noqa: E402
from reweight.options import MIN_ESS_UNTIL_EVIDENCE  # noqa: E402

TABLE = Path(__file__).resolve().parent / "results" / "readme_loop.jsonl"
NETS = ("auto", "lossnet", "metainfonet")
EPOCHS, META_PER_CLASS = 30, 10


def splits(seed: int, noise: float):
    """Training (with a share ``noise`` of random labels), meta (10 clean per class) and test (500) splits."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=500, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    meta = np.concatenate([rng.choice(np.flatnonzero(y_train == k), META_PER_CLASS, replace=False) for k in range(10)])
    rest = np.setdiff1d(np.arange(len(y_train)), meta)
    labels = y_train[rest].copy()
    flip = rng.random(len(labels)) < noise
    labels[flip] = rng.integers(0, 10, flip.sum())

    def tensors(a, b):
        return torch.tensor(a), torch.tensor(b, dtype=torch.long)

    return tensors(x_train[rest], labels), tensors(x_train[meta], y_train[meta]), tensors(x_test, y_test)


def run(seed: int, noise: float, lr: float, net: str | None, **options) -> tuple[float, bool]:
    """Test accuracy after training, and whether the veto's evidence was shown (``net=None``: plain training);
    ``options``: reweighter options besides the defaults."""
    (x, y), (xm, ym), (xt, yt) = splits(seed, noise)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    meta_loader = DataLoader(TensorDataset(xm, ym), batch_size=50, shuffle=True)
    # without the wait for the model's competence on the meta set, named (it was tried as the default)
    options = {"veto_competence": 0, **options}
    reweighter = None if net is None else MetaReweighter(model, optimizer, meta_loader, net=net, **options)
    for _ in range(EPOCHS):
        for xb, yb in train_loader:
            logits = model(xb)
            losses = F.cross_entropy(logits, yb, reduction="none")
            loss = losses.mean() if reweighter is None else weighted_loss(reweighter.step(xb, yb, logits), losses)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    evidence = None if reweighter is None else reweighter.noise_evidence
    return accuracy, bool(evidence is not None and evidence.shown is not None and evidence.shown)


def _key(noise: float, lr: float, seed: int, net: str | None, options: dict | None = None) -> dict:
    """A run's identity: ``options`` given, or else those the defaults set that earlier defaults did not (the nets
    that read the logits weight within each class, where ``min_ess_until_evidence`` acts), so that the defaults'
    rows name what they ran: a row of the defaults before it names no options."""
    key = {"noise": noise, "lr": lr, "seed": seed, "net": net or "plain"}
    if not options and net in ("auto", "metainfonet") and MIN_ESS_UNTIL_EVIDENCE:
        options = {"min_ess_until_evidence": MIN_ESS_UNTIL_EVIDENCE}
    return {**key, "options": options} if options and net else key


def report(table: Path = TABLE, seeds: list[int] | None = None, nets: tuple[str, ...] = NETS) -> str:
    """Markdown: one row per stored labels, lr and seed (of ``seeds``, all when ``None``) with plain training's
    accuracy and each net's difference to it, then per labels and net the mean difference, the runs below plain
    training and those that showed the evidence; ``nets``: the columns."""
    found = {
        (r["key"]["noise"], r["key"]["lr"], r["key"]["seed"], r["key"]["net"]): r
        for r in _store.latest(table)
        if seeds is None or r["key"]["seed"] in seeds
    }
    cells = sorted({k[:3] for k in found if k[3] == "plain" and all(k[:3] + (n,) in found for n in nets)})
    lines = ["| labels | lr | seed | plain | " + " | ".join(nets) + " |"]
    lines.append("| --- | --- | --- | --- |" + " --- |" * len(nets))
    diffs: dict[tuple, list[tuple[float, bool]]] = {}
    for cell in cells:
        plain = found[cell + ("plain",)]["result"]["test"]
        row = []
        for net in nets:
            result = found[cell + (net,)]["result"]
            diff = 100 * (result["test"] - plain)
            diffs.setdefault((_labels(cell[0]), cell[1], net), []).append((diff, result["shown"]))
            row.append(f"{diff:+.1f}{'*' if result['shown'] else ''}")
        lines.append(f"| {_labels(cell[0])} | {cell[1]:g} | {cell[2]} | {100 * plain:.1f} | " + " | ".join(row) + " |")
    lines += ["", "| labels | lr | net | mean against plain | below plain | evidence shown |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for (labels, lr, net), values in diffs.items():
        d = np.array([v for v, _ in values])
        lines.append(
            f"| {labels} | {lr:g} | {net} | {d.mean():+.1f} (lowest {d.min():+.1f}) | {int((d < 0).sum())} of {len(d)} "
            f"| {sum(s for _, s in values)} of {len(d)} |"
        )
    used = [found[c + (n,)] for c in cells for n in ("plain", *nets)]
    return "\n".join(lines) + "\n\n" + _store.provenance_note(used)


def _labels(noise: float) -> str:
    return "clean" if noise == 0 else f"{noise:.0%} random"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", nargs="+", type=float, default=[0.1])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.4])
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--min-ess-until-evidence", type=float, help="the nets' min_ess_until_evidence (default: theirs)")
    p.add_argument("--min-ess", type=float, help="the nets' min_ess (default: theirs)")
    p.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS), help="the nets to run (plain training too)")
    p.add_argument("--report", action="store_true", help="print the table of the stored rows and exit")
    args = p.parse_args(argv)
    if not args.report:
        given = {"min_ess_until_evidence": args.min_ess_until_evidence, "min_ess": args.min_ess}
        options = {k: v for k, v in given.items() if v is not None}
        keys = [_key(noise, lr, seed, net, options) for noise in args.noise for lr in args.lr for seed in args.seeds
                for net in (None, *args.nets)]  # fmt: skip
        for key in tqdm([k for k in keys if _store.find(args.table, k) is None], desc="runs"):
            net = None if key["net"] == "plain" else key["net"]
            accuracy, shown = run(key["seed"], key["noise"], key["lr"], net, **key.get("options", {}))
            result = {"test": accuracy, "shown": shown}
            _store.append(args.table, {"key": key, "result": result, "provenance": _store.provenance(argv)})
    print(report(args.table, nets=tuple(args.nets)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
