"""Per-sample weight diagnostics: record (index, loss, weight, step), find likely mislabelled samples, plot.

A thin, optional layer: the core never imports it, and matplotlib is imported only by the plotting
functions (``pip install "reweight[examples]"``).

Example:
    >>> import torch
    >>> from reweight.diagnostics import WeightRecorder
    >>> rec = WeightRecorder()
    >>> rec.record(torch.tensor([0, 1, 2]), torch.tensor([0.1, 2.0, 0.3]), torch.tensor([1.2, 0.1, 1.0]), step=0)
    >>> rec.lowest_weight_ids(1).tolist()
    [1]
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = [
    "WeightRecorder",
    "GroupWeightHistory",
    "group_weights",
    "weight_auroc",
    "plot_weight_histogram",
    "plot_weight_vs_loss",
    "plot_group_weights",
]


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


class WeightRecorder:
    """Accumulates per-sample records ``(index, loss, weight, step)`` during training.

    ``index`` is the sample's id in your dataset (e.g. yielded by the loader next to ``x, y``);
    ``step`` is any int you choose (the optimizer step or the epoch).
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(c[0]) for c in self._chunks)

    def record(self, indices: Any, losses: Any, weights: Any, step: int) -> None:
        """Add one batch: ``indices``, ``losses`` and ``weights`` of shape ``(batch,)`` (tensors or arrays).

        Raises:
            ValueError: if the three do not have the same length.
        """
        i, lo, w = _np(indices).reshape(-1), _np(losses).reshape(-1), _np(weights).reshape(-1)
        if not len(i) == len(lo) == len(w):
            raise ValueError(f"indices, losses and weights must have one length, got {len(i)}, {len(lo)}, {len(w)}")
        s = np.full(len(i), int(step), dtype=np.int64)
        self._chunks.append((i.astype(np.int64), lo.astype(np.float64), w.astype(np.float64), s))

    def clear(self) -> None:
        """Drop every record."""
        self._chunks.clear()

    def records(self) -> dict[str, np.ndarray]:
        """All records as arrays ``index``, ``loss``, ``weight``, ``step`` in recording order."""
        if not self._chunks:
            return {
                k: np.zeros(0, dtype=d)
                for k, d in (("index", np.int64), ("loss", float), ("weight", float), ("step", np.int64))
            }
        cols = list(zip(*self._chunks, strict=True))
        return {k: np.concatenate(c) for k, c in zip(("index", "loss", "weight", "step"), cols, strict=True)}

    def per_sample(self, since_step: int | None = None) -> dict[str, np.ndarray]:
        """Mean ``loss`` and ``weight`` per sample ``index`` (sorted) over records with ``step >= since_step``."""
        r = self.records()
        if since_step is not None:
            keep = r["step"] >= since_step
            r = {k: v[keep] for k, v in r.items()}
        ids, inv = np.unique(r["index"], return_inverse=True)
        n = np.bincount(inv, minlength=len(ids)).astype(np.float64)
        return {
            "index": ids,
            "loss": np.bincount(inv, r["loss"], minlength=len(ids)) / np.maximum(n, 1),
            "weight": np.bincount(inv, r["weight"], minlength=len(ids)) / np.maximum(n, 1),
        }

    def lowest_weight_ids(self, k: int, since_step: int | None = None) -> np.ndarray:
        """Ids of the ``k`` samples with the lowest mean weight (likely mislabelled), lowest first; ties by id."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        s = self.per_sample(since_step)
        order = np.lexsort((s["index"], s["weight"]))
        return s["index"][order[:k]]

    def export_lowest(self, path: str | os.PathLike, k: int, since_step: int | None = None) -> str:
        """Write the ``k`` lowest-weight samples as CSV ``index,weight,loss`` (lowest first); returns the path."""
        s = self.per_sample(since_step)
        pos = {int(i): j for j, i in enumerate(s["index"])}
        lines = ["index,weight,loss"]
        for i in self.lowest_weight_ids(k, since_step):
            j = pos[int(i)]
            lines.append(f"{int(i)},{s['weight'][j]:.6g},{s['loss'][j]:.6g}")
        path = os.fspath(path)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def save(self, path: str | os.PathLike) -> str:
        """Save every record as a ``.npz`` file; returns the path."""
        path = os.fspath(path)
        np.savez_compressed(path, allow_pickle=False, **self.records())
        return path

    def summary(self, corrupted: Any | None = None, since_step: int | None = None) -> dict[str, float]:
        """Mean weight and, given a boolean ``corrupted`` mask indexed by sample id, the clean/corrupted AUROC."""
        s = self.per_sample(since_step)
        out = {"mean_weight": float(s["weight"].mean()) if len(s["weight"]) else float("nan")}
        if corrupted is not None:
            c = _np(corrupted).astype(bool)[s["index"]]
            out["auroc"] = weight_auroc(s["weight"], c)
            out["mean_weight_clean"] = float(s["weight"][~c].mean()) if (~c).any() else float("nan")
            out["mean_weight_corrupted"] = float(s["weight"][c].mean()) if c.any() else float("nan")
        return out


def group_weights(source: Any) -> dict[str, float]:
    """The current weight of each group, ``{name: weight}`` (one host sync), from a
    :class:`~reweight.MetaReweighter` with ``net="groups"`` or a :class:`~reweight.nets.GroupNet`; the weights
    average to 1 over the groups (1 each at the start: the plain mixture).

    Raises:
        ValueError: if ``source`` has no group weights.

    Example:
        >>> from reweight.nets import GroupNet
        >>> group_weights(GroupNet(2, group_names=["web", "books"]))
        {'web': 1.0, 'books': 1.0}
    """
    net = getattr(source, "net", source)
    fn = getattr(net, "group_weights", None)
    if not callable(fn):
        raise ValueError(f"{type(source).__name__} has no group weights: use net='groups' (net_kwargs num_groups)")
    weights = _np(fn()).reshape(-1).astype(np.float64)
    names = list(getattr(net, "group_names", None) or range(len(weights)))
    return {str(n): float(w) for n, w in zip(names, weights, strict=True)}


class GroupWeightHistory:
    """The group weights over training: call :meth:`record` every few steps, then :meth:`plot` or :meth:`arrays`.

    Example:
        >>> from reweight.nets import GroupNet
        >>> history = GroupWeightHistory()
        >>> history.record(GroupNet(3), step=0)
        >>> history.arrays()["weights"].shape
        (1, 3)
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.rows: list[dict[str, float]] = []

    def __len__(self) -> int:
        return len(self.steps)

    def record(self, source: Any, step: int) -> None:
        """Add the current weights of ``source`` (see :func:`group_weights`) at ``step`` (one host sync)."""
        self.steps.append(int(step))
        self.rows.append(group_weights(source))

    def arrays(self) -> dict[str, Any]:
        """``steps`` ``(T,)``, ``weights`` ``(T, G)`` and the group ``names``."""
        names = list(self.rows[0]) if self.rows else []
        weights = np.array([[r[n] for n in names] for r in self.rows], dtype=np.float64).reshape(len(self.rows), -1)
        return {"steps": np.array(self.steps, dtype=np.int64), "weights": weights, "names": names}

    def plot(self, path: str | os.PathLike, *, title: str = "") -> str:
        """:func:`plot_group_weights` of the recorded weights; returns the path."""
        a = self.arrays()
        return plot_group_weights(a["steps"], a["weights"], path, names=a["names"], title=title)


def plot_group_weights(
    steps: Any, weights: Any, path: str | os.PathLike, *, names: Any | None = None, title: str = ""
) -> str:
    """Line plot of each group's weight ``weights[:, g]`` over ``steps`` (matplotlib, imported here only).

    The weights are drawn on a log scale (the group net moves their logarithms, and the order of the small ones
    is what a user looks for); the dashed line at 1 is the plain mixture (every group counted as sampled).
    """
    plt = _pyplot()
    s, w = _np(steps).reshape(-1), _np(weights)
    w = w.reshape(len(s), -1)
    labels = [str(n) for n in names] if names is not None else [str(g) for g in range(w.shape[1])]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for g in range(w.shape[1]):
        ax.plot(s, w[:, g], label=labels[g])
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter  # plain numbers: no mathtext fonts needed

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("group weight (mean 1, log scale)")
    ax.set_title(title or "learned group weights")
    ax.legend()
    return _save(plt, fig, path)


def weight_auroc(weights: Any, corrupted: Any) -> float:
    """AUROC of the weights as a score for *clean* samples: P(w_clean > w_corrupted) + 0.5 P(tie).

    1 means every clean sample outweighs every corrupted one, 0.5 is chance. ``nan`` if a group is empty.
    """
    w = _np(weights).astype(np.float64).reshape(-1)
    c = _np(corrupted).astype(bool).reshape(-1)
    if len(w) != len(c):
        raise ValueError(f"weights and corrupted must have one length, got {len(w)} and {len(c)}")
    n_pos, n_neg = int((~c).sum()), int(c.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # rank-sum (Mann-Whitney U) with average ranks for ties
    order = np.argsort(w, kind="mergesort")
    ranks = np.empty(len(w))
    sorted_w = w[order]
    _, start, counts = np.unique(sorted_w, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, counts)
    u = ranks[~c].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'reweight[examples]'") from err
    return plt


def plot_weight_histogram(
    weights: Any, path: str | os.PathLike, corrupted: Any | None = None, *, bins: int = 40, title: str = ""
) -> str:
    """Histogram of per-sample weights, split into clean (green) and corrupted (red) if a mask is given."""
    plt = _pyplot()
    w = _np(weights).reshape(-1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    edges = np.histogram_bin_edges(w, bins=bins)
    if corrupted is None:
        ax.hist(w, bins=edges, color="tab:blue")
    else:
        c = _np(corrupted).astype(bool).reshape(-1)
        ax.hist(w[~c], bins=edges, color="tab:green", alpha=0.6, label="clean")
        ax.hist(w[c], bins=edges, color="tab:red", alpha=0.6, label="corrupted")
        ax.legend()
    ax.set_xlabel("sample weight")
    ax.set_ylabel("samples")
    ax.set_title(title)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | os.PathLike) -> str:
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_weight_vs_loss(
    losses: Any, weights: Any, path: str | os.PathLike, corrupted: Any | None = None, *, title: str = ""
) -> str:
    """Scatter of per-sample weight against training loss (clean green, corrupted red if a mask is given).

    ``title`` should name the method whose weights are shown (default: ``"sample weight vs training loss"``).
    """
    plt = _pyplot()
    lo, w = _np(losses).reshape(-1), _np(weights).reshape(-1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if corrupted is None:
        ax.scatter(lo, w, s=3, color="tab:blue")
    else:
        c = _np(corrupted).astype(bool).reshape(-1)
        ax.scatter(lo[~c], w[~c], s=3, color="tab:green", alpha=0.5, label="clean")
        ax.scatter(lo[c], w[c], s=3, color="tab:red", alpha=0.5, label="corrupted")
        ax.legend()
    ax.set_xlabel("training loss")
    ax.set_ylabel("sample weight")
    ax.set_title(title or "sample weight vs training loss")
    return _save(plt, fig, path)
