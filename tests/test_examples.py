"""Tiny-scale smoke runs of the demo (examples/noisy_labels.py) and the benchmark (benchmarks/accuracy.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    return _load("examples/noisy_labels.py", "_demo_noisy_labels")


@pytest.fixture(scope="module")
def bench():
    return _load("benchmarks/accuracy.py", "_bench_accuracy")


def test_demo_runs_and_writes_its_figures(demo, tmp_path, capsys):
    table = demo.main(epochs=2, num_samples=600, out=str(tmp_path))
    assert set(table) == {"Standard", "LossNet", "MetaInfoNet", "Gated", "Gated + history"}
    for row in table.values():
        assert 0.0 <= row["final"] <= 1.0 and 0.0 <= row["last"] <= 1.0
    assert 0.0 <= table["MetaInfoNet"]["auroc"] <= 1.0
    for name in ("weights_clean_vs_corrupted.png", "test_accuracy.png", "weight_vs_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    lines = (tmp_path / "lowest_weights_metainfonet.csv").read_text().splitlines()
    assert lines[0] == "index,weight,loss" and len(lines) == 201
    out = capsys.readouterr().out
    assert "| MetaInfoNet |" in out
    # the printed share of corrupted samples among the 200 lowest weights is the one the CSV's ids give
    data = demo.make_data(600, 0.4, 0)
    assert len(data["y"]) == 280 and len(data["meta"]) == 200
    ids = [int(line.split(",")[0]) for line in lines[1:]]
    weights = [float(line.split(",")[1]) for line in lines[1:]]
    assert weights == sorted(weights) and len(set(ids)) == 200
    share = data["corrupted"][ids].mean()
    assert f"MetaInfoNet: {share:.0%} of its 200 lowest-weight samples are corrupted" in out


def test_benchmark_caches_resumes_and_reports(bench, tmp_path, monkeypatch):
    args = ["--datasets", "mnist1d", "--settings", "flip1-40", "lt-10", "--seeds", "0"]
    args += ["--epochs", "1", "--num-samples", "600", "--results", str(tmp_path)]
    assert bench.main(args) == 0
    rows = bench._load(tmp_path)
    assert len(rows) == 2 * len(bench.METHODS)
    (run,) = [r for r in rows if r["key"]["method"] == "metainfonet" and r["key"]["setting"] == "flip1-40"]
    res = run["result"]
    assert run["key"]["config"]["epochs"] == 1 and len(res["test_acc"]) == 1
    assert 0.0 <= res["auroc"] <= 1.0
    # one epoch: "best" is that epoch's test accuracy, "last" the mean over it, on 280 training samples
    assert res["best_epoch"] == 0 and res["best"] == res["test_acc"][0] == res["last"] and res["n_train"] == 280
    # the pass counts of one epoch: 3 batches, each with one meta batch of 100 forwards
    assert res["cost"]["forwards"] == 280 + 3 * 100
    cfg = bench.dataclasses.replace(bench.CONFIGS["mnist1d"], epochs=1, num_samples=600)
    assert run["result"]["n_corrupted"] == int(bench.make_data("mnist1d", "flip1-40", 0, cfg)["corrupted"].sum()) > 0

    def fail(*a, **k):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(bench, "train_run", fail)
    assert bench.main(args) == 0  # resumes: everything is cached

    text = bench.report(tmp_path, ["mnist1d"])
    assert "| MetaInfoNet (best) |" in text and "| Fine-tune (last) |" in text and "AUROC" in text
    assert "Missing cells" in text  # the other settings were not run


def test_benchmark_lambda_sweep_reports_a_choice(bench, tmp_path):
    args = ["--lambda-sweep", "--lambdas", "0", "1", "--datasets", "mnist1d", "--settings", "flip1-40"]
    args += ["--seeds", "0", "--epochs", "1", "--num-samples", "600", "--results", str(tmp_path)]
    assert bench.main(args) == 0
    text = bench.lambda_report(tmp_path, "mnist1d", "flip1-40")
    assert "| 0 |" in text and "| 1 |" in text and "lambda =" in text
    assert "Chosen over all of them: lambda = " in bench.lambda_choice(tmp_path, "mnist1d", ["flip1-40"])


def test_lora_example_runs_offline_and_writes_its_figure(tmp_path, capsys):
    pytest.importorskip("peft")
    lora = _load("examples/lora_finetune.py", "_example_lora")
    summary = lora.main(epochs=3, num_train=240, batch_size=16, out=str(tmp_path))  # the docs' run, seed 0
    # docs/llm_finetuning.md: AUROC 0.899, mean weight 1.098 / 0.856 with the defaults and no lookahead_lr (the
    # veto zeroes some clean sequences on a step: a lower AUROC than the net's alone, more weight off the junk)
    assert summary["auroc"] > 0.85
    assert summary["mean_weight_clean"] > 1.05 > 0.9 > summary["mean_weight_corrupted"]
    assert (tmp_path / "weights_clean_vs_corrupted.png").read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert "engine: ghost" in out and "weight AUROC clean vs corrupted" in out
