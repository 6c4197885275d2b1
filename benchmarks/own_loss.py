"""The defaults under a per-sample loss of the user's own: what a training loop that writes its own cross-entropy gets.

scikit-learn's digits (an MLP, SGD 0.1 with momentum, batch 64, 30 epochs), 40% label noise (Flip-1: each class to
the next; uniform: to any other class), a clean meta set of 100 samples, every option at its default. Methods:
plain training; the defaults with the library's cross-entropy (``loss_fn`` not given); the defaults with the
user's own ``F.cross_entropy(..., reduction="none")``, which ``net="auto"`` and ``normalization=None`` settle from
the first batch's labels; and LossNet with ``"sum"`` named explicitly, which is what a loss of the user's got
before they followed the labels. Test accuracy (400 held-out samples) after the last epoch.

    python benchmarks/own_loss.py --seeds 0 1 2 3 4 5 6 7 8 9
    python benchmarks/own_loss.py --report
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _store  # noqa: E402

from reweight import MetaReweighter  # noqa: E402
from reweight.options import MIN_ESS_UNTIL_EVIDENCE, VETO  # noqa: E402

TABLE = Path(__file__).resolve().parent / "results" / "own_loss.jsonl"
SETTINGS = ("flip1-40", "uniform-40")
METHODS = {  # name: the reweighter's arguments (None: plain training)
    "plain": None,
    "defaults, library loss": {},
    "defaults, own loss": {"loss_fn": "own"},
    "lossnet + sum, own loss": {"loss_fn": "own", "net": "lossnet", "normalization": "sum"},
}
EPOCHS, BATCH, LR = 30, 64, 0.1


def own_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user's per-sample cross-entropy: the same loss as the library's, another function."""
    return F.cross_entropy(logits, targets, reduction="none")


def _data(setting: str, seed: int) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    x, y = load_digits(return_X_y=True)
    order = rng.permutation(len(y))
    x, y = torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])
    train_y = y[500:].clone()
    noisy = torch.tensor(rng.random(len(train_y)) < 0.4)
    if setting == "flip1-40":
        train_y[noisy] = (train_y[noisy] + 1) % 10
    else:  # uniform: to any other class
        train_y[noisy] = (train_y[noisy] + torch.tensor(rng.integers(1, 10, int(noisy.sum())))) % 10
    return {"test_x": x[:400], "test_y": y[:400], "meta_x": x[400:500], "meta_y": y[400:500],
            "x": x[500:], "y": train_y}  # fmt: skip


def run(setting: str, method: str, seed: int) -> dict:
    """One training run; the row's ``result``."""
    torch.set_num_threads(1)
    d = _data(setting, seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    kwargs = METHODS[method]
    rw = None
    if kwargs is not None:
        kwargs = {k: own_cross_entropy if v == "own" else v for k, v in kwargs.items()}
        meta = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(d["meta_x"], d["meta_y"]), batch_size=50, shuffle=True
        )
        # without the wait for the model's competence on the meta set, named (it was tried as the default)
        rw = MetaReweighter(model, opt, meta, seed=seed, **{"veto_competence": 0, **kwargs})
    g = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(d["y"]), generator=g).split(BATCH):
            x, y = d["x"][idx], d["y"][idx]
            logits = model(x)
            losses = own_cross_entropy(logits, y)
            weights = rw.step(x, y, logits) if rw is not None else torch.ones_like(losses)
            opt.zero_grad()
            (weights * losses).mean().backward()
            opt.step()
    with torch.no_grad():
        test = (model(d["test_x"]).argmax(1) == d["test_y"]).float().mean().item()
    out: dict = {"test": test}
    if rw is not None:
        out.update(net=rw.options.net, normalization=rw.normalization)
    return out


def _key(setting: str, method: str, seed: int, veto: float = VETO, until: float = MIN_ESS_UNTIL_EVIDENCE) -> dict:
    """A row's identity; a reweighting method's also holds the library's default ``veto`` when there is one (the
    rows without it ran before the veto was a default), and the defaults' ``min_ess_until_evidence`` where it acts
    (weights within each class; the rows without it ran before it was a default)."""
    key: dict = {"setting": setting, "method": method, "seed": seed}
    if METHODS[method] is not None and math.isfinite(veto):
        key["veto"] = veto
        if until and METHODS[method].get("normalization") != "sum":
            key["min_ess_until_evidence"] = until
    return key


def report(table: Path = TABLE, veto: float = VETO, until: float = MIN_ESS_UNTIL_EVIDENCE) -> str:
    """Markdown: test accuracy per setting and method (mean ± std over seeds), the seeds below plain training
    (paired), and the net and normalisation the defaults settled on; the rows run under the default ``veto``
    (``math.inf``: those run before it was a default) and ``min_ess_until_evidence`` (0: before it was one)."""
    rows = [
        r
        for r in _store.latest(table)
        if r["key"] == _key(r["key"]["setting"], r["key"]["method"], r["key"]["seed"], veto, until)
    ]

    def cell(setting: str, method: str) -> list[dict]:
        found = [r for r in rows if r["key"]["setting"] == setting and r["key"]["method"] == method]
        return sorted(found, key=lambda r: r["key"]["seed"])

    lines = [
        "| setting | method | seeds | test accuracy (%) | seeds below plain training | net, normalization |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        plain = {r["key"]["seed"]: r["result"]["test"] for r in cell(setting, "plain")}
        for method in METHODS:
            mine = cell(setting, method)
            if not mine:
                continue
            acc = np.array([100 * r["result"]["test"] for r in mine])
            below = sum(r["result"]["test"] < plain.get(r["key"]["seed"], -1) for r in mine)
            chosen = sorted({f"{r['result'].get('net')}, {r['result'].get('normalization')}" for r in mine})
            lines.append(
                f"| {setting} | {method} | {len(mine)} | {acc.mean():.1f} ± {acc.std():.1f} | "
                f"{'-' if method == 'plain' else f'{below} of {len(mine)}'} | "
                f"{'-' if method == 'plain' else '; '.join(chosen)} |"
            )
    return "\n".join(lines) + "\n\n" + _store.provenance_note(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--report", action="store_true", help="print the table of the stored rows and exit")
    args = p.parse_args(argv)
    if not args.report:
        keys = [_key(s, m, n) for s in args.settings for m in METHODS for n in args.seeds]
        for key in tqdm([k for k in keys if _store.find(args.table, k) is None], desc="runs"):
            result = run(key["setting"], key["method"], key["seed"])
            _store.append(args.table, {"key": key, "result": result, "provenance": _store.provenance(argv)})
    print(report(args.table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
