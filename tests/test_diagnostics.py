"""reweight.diagnostics: recording, export of the lowest-weight ids, AUROC, plots."""

import itertools

import numpy as np
import pytest
import torch

from reweight.diagnostics import WeightRecorder, plot_weight_histogram, plot_weight_vs_loss, weight_auroc

PNG = b"\x89PNG\r\n\x1a\n"


def _hand_auroc(w, corrupted):
    clean = [a for a, c in zip(w, corrupted, strict=True) if not c]
    bad = [a for a, c in zip(w, corrupted, strict=True) if c]
    wins = sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(clean, bad))
    return wins / (len(clean) * len(bad))


def test_auroc_matches_a_pairwise_count_with_ties():
    w = [0.9, 0.1, 0.5, 0.5, 0.7, 0.2, 0.5]
    c = [False, True, True, False, False, True, False]
    assert weight_auroc(w, c) == pytest.approx(_hand_auroc(w, c))
    rng = np.random.default_rng(0)
    w = rng.integers(0, 5, 200).astype(float)
    c = rng.random(200) < 0.3
    assert weight_auroc(w, c) == pytest.approx(_hand_auroc(w, c))


def test_auroc_extremes_and_empty_groups():
    assert weight_auroc([1.0, 1.0, 0.0], [False, False, True]) == 1.0
    assert weight_auroc([0.0, 1.0], [False, True]) == 0.0
    assert weight_auroc([1.0, 1.0], [False, False]) != weight_auroc([1.0, 1.0], [False, False])  # nan
    with pytest.raises(ValueError, match="length"):
        weight_auroc([1.0], [False, True])


def test_recorder_keeps_records_and_averages_per_sample():
    rec = WeightRecorder()
    rec.record(torch.tensor([3, 1]), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.5]), step=0)
    rec.record(np.array([3]), np.array([3.0]), np.array([1.5]), step=1)
    assert len(rec) == 3
    r = rec.records()
    assert r["index"].tolist() == [3, 1, 3] and r["step"].tolist() == [0, 0, 1]
    s = rec.per_sample()
    assert s["index"].tolist() == [1, 3]
    np.testing.assert_allclose(s["weight"], [1.5, 1.0])
    np.testing.assert_allclose(s["loss"], [2.0, 2.0])
    s1 = rec.per_sample(since_step=1)
    assert s1["index"].tolist() == [3] and s1["weight"].tolist() == [1.5]
    with pytest.raises(ValueError, match="length"):
        rec.record([1, 2], [1.0], [1.0, 2.0], step=0)
    rec.clear()
    assert len(rec) == 0 and len(rec.per_sample()["index"]) == 0


def test_lowest_weight_export(tmp_path):
    rec = WeightRecorder()
    ids = np.arange(10)
    w = np.array([0.9, 0.05, 1.0, 0.3, 0.05, 2.0, 1.1, 0.7, 0.2, 1.3])
    rec.record(ids, np.linspace(0, 1, 10), w, step=0)
    assert rec.lowest_weight_ids(4).tolist() == [1, 4, 8, 3]  # tie 0.05 broken by id
    path = rec.export_lowest(tmp_path / "lowest.csv", 3)
    lines = open(path).read().splitlines()
    assert lines[0] == "index,weight,loss"
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 4, 8]
    assert float(lines[3].split(",")[1]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="k"):
        rec.lowest_weight_ids(-1)


def test_summary_and_save(tmp_path):
    rec = WeightRecorder()
    rec.record([0, 1, 2, 3], [0.1, 0.2, 2.0, 3.0], [1.0, 0.9, 0.2, 0.1], step=0)
    corrupted = np.array([False, False, True, True])
    s = rec.summary(corrupted)
    assert s["auroc"] == 1.0
    assert s["mean_weight_clean"] == pytest.approx(0.95) and s["mean_weight_corrupted"] == pytest.approx(0.15)
    path = rec.save(tmp_path / "rec.npz")
    loaded = np.load(path)
    np.testing.assert_array_equal(loaded["index"], [0, 1, 2, 3])


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    w, lo, c = rng.random(100), rng.random(100), rng.random(100) < 0.4
    for path in (
        plot_weight_histogram(w, tmp_path / "h.png", c, title="t"),
        plot_weight_histogram(w, tmp_path / "h2.png"),
        plot_weight_vs_loss(lo, w, tmp_path / "s.png", c),
        plot_weight_vs_loss(lo, w, tmp_path / "s2.png"),
    ):
        with open(path, "rb") as f:
            assert f.read(8) == PNG


def test_weight_vs_loss_title_names_the_method(tmp_path, monkeypatch):
    import reweight.diagnostics as diagnostics

    titles = []
    real_save = diagnostics._save

    def save(plt, fig, path):
        titles.append(fig.axes[0].get_title())
        return real_save(plt, fig, path)

    monkeypatch.setattr(diagnostics, "_save", save)
    rng = np.random.default_rng(0)
    w, lo = rng.random(20), rng.random(20)
    plot_weight_vs_loss(lo, w, tmp_path / "a.png", title="MetaInfoNet: weight vs loss")
    plot_weight_vs_loss(lo, w, tmp_path / "b.png")
    assert titles == ["MetaInfoNet: weight vs loss", "sample weight vs training loss"]
