"""The accuracy benchmark's alternatives to reweighting (issue 10) on a tiny configuration: every new method
runs end to end and caches, the pass counter matches the passes counted by hand, GCE matches a hand
computation, and the report renders the accuracy-vs-cost chart."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--datasets", "mnist1d", "--settings", "flip1-40", "--seeds", "0", "--epochs", "2", "--num-samples", "600"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bench_accuracy_alt", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_bench_accuracy_alt"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_runs(bench, tmp_path_factory):
    """Every alternative once on flip1-40 (600 mnist1d samples, 2 epochs)."""
    root = tmp_path_factory.mktemp("results")
    methods = ["standard", "merged", "gce", "cleanlab", "metainfonet+finetune", "lossnet+finetune"]
    assert bench.main(TINY + ["--methods", *methods, "--results", str(root)]) == 0
    return root


def _cell(root: Path, method: str) -> dict:
    """The row of ``method`` on mnist1d flip1-40 seed 0 in the table under ``root``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _store

    (row,) = [
        r
        for r in _store.latest(root / "accuracy.jsonl")
        if r["key"]["method"] == method and r["key"]["setting"] == "flip1-40" and r["key"]["seed"] == 0
    ]
    return json.loads(json.dumps(row))  # a copy: tests may edit it


def test_gce_matches_a_hand_computation(bench):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2, 1])
    expected = []
    for row, t in zip(logits.tolist(), targets.tolist()):
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        expected.append((1 - p**0.7) / 0.7)
    got = bench.gce_loss(logits, targets)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert math.isclose(got[2].item(), (1 - (1 / 3) ** 0.7) / 0.7, rel_tol=1e-6)
    # q = 1 is the mean absolute error 1 - p_y; the gradient stays finite where p_y underflows
    assert torch.allclose(bench.gce_loss(logits, targets, q=1.0), 1 - torch.softmax(logits, 1)[range(3), targets])
    far = torch.tensor([[200.0, -200.0]], requires_grad=True)
    bench.gce_loss(far, torch.tensor([1])).sum().backward()
    assert torch.isfinite(far.grad).all()
    with pytest.raises(ValueError, match="q must be in"):
        bench.gce_loss(logits, targets, q=0.0)


def test_folds_are_a_stratified_partition():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _alternatives import detection, fold_indices

    labels = np.repeat(np.arange(4), [10, 7, 5, 3])
    folds = fold_indices(len(labels), labels, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    for f in folds:  # class 0 (10 samples) puts exactly two in every fold
        assert (labels[f] == 0).sum() == 2
    flagged = np.array([1, 1, 0, 0, 1], bool)
    corrupted = np.array([1, 0, 1, 0, 0], bool)
    assert detection(flagged, corrupted) == {"flagged": 3, "precision": 1 / 3, "recall": 1 / 2}
    assert math.isnan(detection(flagged, np.zeros(5, bool))["recall"])


def test_pass_counts_match_the_passes_made(tiny_runs):
    n, epochs, meta = 280, 2, 200  # 480 training samples, 200 of them the meta set
    std = _cell(tiny_runs, "standard")["result"]
    assert std["n_train"] == n
    assert std["cost"]["forwards"] == std["cost"]["backwards"] == n * epochs and std["cost"]["jvps"] == 0
    ft = _cell(tiny_runs, "finetune")["result"]["cost"]  # written by the same run: + 10 epochs on the meta set
    assert ft["forwards"] == ft["backwards"] == n * epochs + 10 * meta
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _cost import standard_passes

    for method in ("standard", "finetune"):  # cells cached before the counter: the count by construction
        run = _cell(tiny_runs, method)
        counted = standard_passes(run)
        del run["result"]["cost"]
        assert standard_passes(run) == counted
    merged = _cell(tiny_runs, "merged")["result"]["cost"]
    assert merged["forwards"] == merged["backwards"] == (n + meta) * epochs
    # a reweighted step: the caller's forward and one meta batch (100) forward; the look-ahead's passes over
    # the batch (a JVP or backwards, by engine) come on top of the caller's backward and the meta backward
    steps = epochs * math.ceil(n / 100)
    rw = _cell(tiny_runs, "lossnet")["result"]["cost"]
    assert rw["forwards"] == n * epochs + 100 * steps
    assert rw["jvps"] + rw["backwards"] >= 2 * n * epochs + 100 * steps


def test_every_alternative_caches_and_resumes(bench, tiny_runs, monkeypatch):
    for method in ("merged", "gce", "cleanlab", "metainfonet+finetune", "lossnet+finetune", "metainfonet", "lossnet"):
        run = _cell(tiny_runs, method)
        assert run["key"]["method"] == method and 0.0 <= run["result"]["best"] <= 1.0
        assert run["result"]["cost"]["seconds"] >= 0 and run["result"]["cost"]["forwards"] > 0
    assert _cell(tiny_runs, "gce")["key"]["options"] == {"q": 0.7}
    cl = _cell(tiny_runs, "cleanlab")["result"]
    assert cl["cleanlab"]["flagged"] > 0 and 0.0 <= cl["cleanlab"]["precision"] <= 1.0
    assert cl["n_retrain"] == cl["n_train"] - cl["cleanlab"]["flagged"] + 200
    assert cl["best"] == cl["last"] and "best_epoch" not in cl  # the meta set was trained on: no selection
    plus, plain = _cell(tiny_runs, "metainfonet+finetune")["result"], _cell(tiny_runs, "metainfonet")["result"]
    assert plus["before_finetune"]["best"] == plain["best"] and plus["test_acc"] == plain["test_acc"]
    assert plus["best"] == plus["finetune_test_acc"][-1] and len(plus["finetune_test_acc"]) == 10

    def fail(*a, **k):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(bench, "train_run", fail)
    methods = ["finetune", "merged", "gce", "cleanlab", "metainfonet", "metainfonet+finetune", "lossnet+finetune"]
    assert bench.main(TINY + ["--methods", *methods, "--results", str(tiny_runs)]) == 0


def test_a_companion_cell_already_cached_is_never_rewritten(bench, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _store

    cfg = bench.dataclasses.replace(bench.CONFIGS["mnist1d"], epochs=2, num_samples=600)
    key = bench._key("mnist1d", "flip1-40", "lossnet", 0, cfg, None, "gentle", "default", "plain")
    table = tmp_path / "accuracy.jsonl"
    _store.append(table, {"key": key, "result": {"stale": True}})
    assert bench.main(TINY + ["--methods", "lossnet+finetune", "--results", str(tmp_path)]) == 0
    rows = _store.rows(table)
    assert [r["key"]["method"] for r in rows] == ["lossnet", "lossnet+finetune"]
    assert rows[0]["result"] == {"stale": True}


def test_a_table_made_on_more_than_one_cpu_says_which():
    """Runs of one seed diverge across CPUs, so a table whose rows come from several names them and their counts;
    a table of one CPU's rows keeps the one line of code versions."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _store

    def row(commit: str, cpu: str | None) -> dict:
        prov = {"library": {"version": "0.1.0", "commit": commit}}
        return {"provenance": {**prov, "cpu": cpu} if cpu else prov}

    one = _store.provenance_note([row("a" * 40, "AMD EPYC"), row("b" * 40, "AMD EPYC")])
    assert one.count("\n") == 0 and "CPU" not in one
    mixed = _store.provenance_note([row("a" * 40, "AMD EPYC"), row("a" * 40, "Intel Xeon"), row("a" * 40, None)])
    first, second = mixed.split("\n")
    assert first.startswith("Code versions of the 3 rows")
    assert second.endswith("AMD EPYC: 1, Intel Xeon: 1, not recorded: 1.")


def test_paper_ratio_protocol(bench):
    cfg = bench.CONFIGS["mnist1d-2pct"]
    train = int(0.8 * cfg.num_samples)  # mnist1d keeps 80% for training
    assert 10 * cfg.meta_per_class_noise / train == pytest.approx(0.02)
    small = bench.dataclasses.replace(cfg, num_samples=800)
    d = bench.make_data("mnist1d-2pct", "uniform-40", 0, small)
    assert len(d["y"]) == 640 - 200 and len(d["ym"]) == 200 and d["x"].shape[1:] == (1, 40)
    assert 0.3 < d["corrupted"].mean() < 0.5


@pytest.mark.parametrize(
    ("setting", "low", "high"),
    [("uniform-0", 0.0, 0.0), ("uniform-5", 0.02, 0.08), ("uniform-10", 0.06, 0.14), ("flip1-10", 0.06, 0.14)],
)
def test_light_settings_corrupt_their_share_of_the_labels(bench, setting, low, high):
    """The settings beside the grid: clean labels stay clean, light noise corrupts about its rate."""
    small = bench.dataclasses.replace(bench.CONFIGS["mnist1d"], num_samples=800)
    d = bench.make_data("mnist1d", setting, 0, small)
    assert low <= d["corrupted"].mean() <= high
    if high == 0.0:
        assert not d["corrupted"].any()
    assert setting in bench.LIGHT_SETTINGS and setting not in bench.SETTINGS  # beside the grid, not in it


@pytest.mark.parametrize(("setting", "low", "high"), [("lt-1", 0.0, 0.0), ("lt-3", 0.1, 0.2)])
def test_mild_tail_settings_stay_below_the_class_share_warning(bench, setting, low, high):
    """``lt-1`` keeps the classes balanced, ``lt-3`` is a long tail too mild for ClassShareWarning's 0.2 (what
    docs/results.md says of it): the training classes' total variation from the balanced meta set's shares."""
    from reweight.class_checks import ClassChecks

    small = bench.dataclasses.replace(bench.CONFIGS["mnist1d"], num_samples=2000)
    d = bench.make_data("mnist1d", setting, 0, small)
    shares = torch.bincount(d["y"], minlength=10).double() / len(d["y"])
    meta = torch.bincount(d["ym"], minlength=10).double() / len(d["ym"])
    distance = float(0.5 * (shares - meta).abs().sum())
    assert low <= distance <= high + 0.02  # a balanced draw of 1,600 moves it by about 0.02
    assert distance < ClassChecks().threshold and not d["corrupted"].any()
    assert setting in bench.MILD_TAIL_SETTINGS and setting not in bench.SETTINGS


@pytest.mark.parametrize("setting", ["lt-10+uniform-40", "lt-10+flip1-40"])
def test_noisy_tail_settings_corrupt_the_long_tail(bench, setting):
    """A long tail with label noise on it: the training set is the long tail's (the same samples, the same true
    labels), about 40% of them corrupted; the meta set is the long-tail protocols' (10 per class, clean)."""
    small = bench.dataclasses.replace(bench.CONFIGS["mnist1d"], num_samples=2000)
    tail = bench.make_data("mnist1d", "lt-10", 0, small)
    d = bench.make_data("mnist1d", setting, 0, small)
    torch.testing.assert_close(d["x"], tail["x"])
    assert 0.3 < d["corrupted"].mean() < 0.45
    bad = torch.from_numpy(d["corrupted"])
    assert torch.equal(d["y"][~bad], tail["y"][~bad]) and (d["y"][bad] != tail["y"][bad]).all()
    assert torch.bincount(d["ym"], minlength=10).tolist() == [10] * 10
    assert setting in bench.NOISY_TAIL_SETTINGS and setting not in bench.SETTINGS
    with pytest.raises(ValueError, match="long tail only"):  # noise on noise would drop the second part silently
        bench.make_data("mnist1d", "uniform-40+" + setting.split("+")[1], 0, small)


def test_report_renders_cost_tables_and_chart(bench, tiny_runs, tmp_path):
    chart = tmp_path / "cost.png"
    methods = ["standard", "finetune", "merged", "gce", "cleanlab", "lossnet", "lossnet+finetune"]
    text = bench.cost_report(tiny_runs, ["mnist1d"], ["flip1-40"], methods, chart=chart)
    assert chart.read_bytes()[:8] == PNG
    assert "| Standard | 1.00x" in text and "| Merged | 1.71x" in text  # (280 + 200) / 280 samples
    assert "cleanlab's flagged set" in text and "| flip1-40 |" in text
    table = bench.report(tiny_runs, ["mnist1d"], ["flip1-40"], methods)
    assert "| LossNet + Fine-tune (best) |" in table and "| cleanlab (last) |" in table


def test_guide_picks_the_cheapest_within_noise_of_the_best(bench, tiny_runs):
    methods = ["standard", "finetune", "merged", "gce", "cleanlab", "lossnet", "lossnet+finetune"]
    text = bench.guide_report(tiny_runs, ["mnist1d"], ["flip1-40"], methods, seeds=[0])
    row = next(line for line in text.splitlines() if line.startswith("| mnist1d | flip1-40 |"))
    acc = {m: _cell(tiny_runs, m)["result"]["best"] for m in methods}
    best = max(acc.values())
    # one seed: no spread, so "within noise" is a tie with the best; the cheapest of the ties is used
    cost = {m: bench._cost.passes(_cell(tiny_runs, m)["result"]) for m in methods}
    used = min((m for m in methods if acc[m] == best), key=lambda m: cost[m])
    verdict = "" if used.startswith("lossnet") else "not reweight: "
    assert f"**{verdict}{bench.NAMES[used]}: {100 * best:.1f} ± 0.0 at {cost[used] / cost['standard']:.2f}x**" in row


def test_rows_carry_provenance_and_expanded_options(bench, tiny_runs):
    row = _cell(tiny_runs, "lossnet")
    prov = row["provenance"]
    assert prov["library"]["version"] == __import__("reweight").__version__
    assert len(prov["library"]["commit"]) == 40 and isinstance(prov["library"]["dirty"], bool)
    assert prov["packages"]["torch"] == torch.__version__ and prov["packages"]["numpy"] == np.__version__
    assert prov["cpu"] and prov["threads"] == 1 and prov["date"].endswith("Z")
    assert "--methods" in prov["command"]
    # a preset is stored as the options it stands for, so a preset that changes meaning changes the key
    fast = bench.reweighter_options("metainfonet", "fast", None, False)
    assert fast["interval"] == 6 and fast["meta_optimizer"] == {"name": "AdamW", "lr": 6e-3, "weight_decay": 5e-4}
    assert fast["net_kwargs"]["kl_weight"] == 0.01 and fast["engine"] == "auto"
    assert fast["net_kwargs"]["uniform_start"] is True
    assert fast["meta_warmup"] == 300 and fast["meta_signal"] == "(sum c_i w_i + penalty) / sum |c_i|"
    assert bench.reweighter_options("metainfonet", "fast5", None, False)["interval"] == 5
    key = row["key"]["reweighter"]
    assert key["meta_optimizer"] == {"name": "AdamW", "lr": 1e-3, "weight_decay": 5e-4}
    assert key["meta_warmup"] == 300 and key["meta_signal"] == "(sum c_i w_i + penalty) / sum |c_i|"
    assert key["net_kwargs"] == {"hidden": 100, "uniform_start": True}
    assert bench.reweighter_options("standard", "default", None, True) is None


def test_raw_weights_reads_the_same_run_as_the_table(bench, capsys, tmp_path):
    """benchmarks/raw_weights.py repeats one cell with hooks: its test accuracies are the cached row's, and its
    stored row is printed again by --report without a run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import raw_weights

    rows = tmp_path / "raw_weights.jsonl"
    args = ["--setting", "flip1-40", "--seed", "0", "--model", "plain", "--schedule", "gentle", "--epochs", "5",
            "--num-samples", "600", "--results", str(rows)]
    assert raw_weights.main(args + ["--report"]) == 1  # nothing stored yet
    capsys.readouterr()
    assert raw_weights.main(args) == 0
    printed = capsys.readouterr().out
    lines = printed.strip().splitlines()
    assert lines[2].startswith("| epoch | raw mean | raw max / mean |") and len(lines) == 4 + raw_weights.BUCKETS
    raw_means = [float(line.split("|")[2]) for line in lines[4:]]
    assert all(0 < m < 1 for m in raw_means)  # sigmoid outputs, before the batch normalisation
    assert raw_weights.main(args + ["--report"]) == 0 and capsys.readouterr().out == printed
    assert len(rows.read_text().splitlines()) == 1
    table = tmp_path / "accuracy.jsonl"
    tiny = ["--datasets", "mnist1d", "--settings", "flip1-40", "--seeds", "0", "--epochs", "5", "--num-samples", "600"]
    assert bench.main(tiny + ["--methods", "gated", "--variants", "nokn", "--results", str(table)]) == 0
    cached = json.loads(table.read_text().splitlines()[0])["result"]["test_acc"]
    test_acc = [float(line.split("|")[-2]) for line in lines[4:]]
    assert test_acc[0] == pytest.approx(cached[0], abs=5e-4) and test_acc[-1] == pytest.approx(cached[-1], abs=5e-4)


def test_class_weights_reads_the_same_run_as_the_table(bench, capsys, tmp_path):
    """benchmarks/class_weights.py repeats one cell with a hook: its test accuracies are the cached row's, each
    fifth of the run has every class's mean weight, and --report prints the stored row again without a run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import class_weights

    rows = tmp_path / "class_weights.jsonl"
    args = ["--dataset", "mnist1d", "--setting", "uniform-40", "--method", "logitnet", "--variant", "ess20",
            "--epochs", "5", "--num-samples", "600", "--results", str(rows)]  # fmt: skip
    assert class_weights.main(args + ["--report"]) == 1  # nothing stored yet
    capsys.readouterr()
    assert class_weights.main(args) == 0
    printed = capsys.readouterr().out
    lines = printed.strip().splitlines()
    assert lines[2].startswith("| fifth of the run | class 0 |") and len(lines) == 4 + class_weights.PARTS
    stored = json.loads(rows.read_text())["result"]
    for weights, fit in zip(stored["weight"], stored["fit"]):
        assert len(weights) == len(fit) == 10 and all(w > 0 for w in weights) and all(0 <= f <= 1 for f in fit)
    assert class_weights.main(args + ["--report"]) == 0 and capsys.readouterr().out == printed
    table = tmp_path / "accuracy.jsonl"
    tiny = ["--datasets", "mnist1d", "--settings", "uniform-40", "--seeds", "0", "--epochs", "5", "--num-samples"]
    assert bench.main(tiny + ["600", "--methods", "logitnet", "--variants", "ess20", "--results", str(table)]) == 0
    cached = json.loads(table.read_text().splitlines()[0])["result"]["test_acc"]
    assert stored["test_acc"] == pytest.approx(cached, abs=5e-4)
    assert class_weights.rank_correlation([1, 2, 3], [3, 4, 5]) == pytest.approx(1.0)


def test_defaults_matrix_sizes_the_most_inverted_window():
    """The defaults matrix's 'most inverted' cell: the largest corrupted / clean mean-weight ratio over windows
    and seeds (NaN windows skipped) with its window; '-' for rows measured before the ratio was recorded."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import defaults_matrix

    w, corrupted = torch.tensor([1.0, 3.0, 1.0, 1.0]), torch.tensor([False, True, False, True])
    assert defaults_matrix._ratio(w, corrupted) == pytest.approx(2.0)
    edges = [0, 10, 50, 100]
    rows = [
        {"traj_ratio": [1.0, 0.5, float("nan")], "windows": edges},
        {"traj_ratio": [0.9, 1.2, 0.3], "windows": edges},
    ]
    assert defaults_matrix._most_inverted(rows) == "1.20 (steps 10-50)"
    assert defaults_matrix._most_inverted([{"traj": [0.9], "windows": edges}]) == "-"


def test_tables_read_as_one_take_a_seed_from_the_later_table(bench, tmp_path):
    def row(seed, best):
        key = {"dataset": "mnist1d", "setting": "flip1-40", "method": "gated", "variant": "v", "seed": seed,
               "schedule": "gentle", "model": "plain", "net_kwargs": None, "config": {}}  # fmt: skip
        return {"key": key, "result": {"best": best}}

    first, later = tmp_path / "first.jsonl", tmp_path / "later.jsonl"
    first.write_text("".join(json.dumps(row(s, b)) + "\n" for s, b in [(0, 0.1), (1, 0.2)]))
    later.write_text(json.dumps(row(1, 0.9)) + "\n")
    cells = bench._cells((first, later), None, "gentle", ("v",), "plain")
    assert sorted((r["key"]["seed"], r["result"]["best"]) for r in cells[("mnist1d", "flip1-40", "gated~v")]) == [
        (0, 0.1),
        (1, 0.9),
    ]
    one = bench._cells(first, None, "gentle", ("v",), "plain")
    assert one == bench._cells((first,), None, "gentle", ("v",), "plain")


def test_defaults_matrix_vit_task_trains_timm_vit_on_16x16_digits_paired_with_plain_training():
    """The matrix's ``vit`` task: timm's ViT built from config on the digits as 16x16 images in [0, 1]; a
    reweighted run and plain training of one seed start from the same model and see the same batches."""
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import defaults_matrix

    s = defaults_matrix.TASKS["vit"](0)
    x, _, out, _ = s["fwd"](torch.arange(5))
    assert x.shape == (5, 1, 16, 16) and 0 <= x.min() and x.max() <= 1 and out.shape == (5, 10)
    assert type(s["opt"]).__name__ == "AdamW"
    first = [p.detach().clone() for p in defaults_matrix.TASKS["vit"](0)["model"].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(first, s["model"].parameters()))
    plain = defaults_matrix.run("vit", "plain", "defaults", 0, 3)
    weighted = defaults_matrix.run("vit", "l2rw", "defaults", 0, 3)
    assert plain["metric"] == weighted["metric"] == "acc" and weighted["engine"]


def test_defaults_matrix_gain_pairs_each_seed_with_plain_training():
    """The matrix's gain column: accuracy in points (higher is better), losses as plain's minus the net's, each
    seed against plain training of the same seed, mean ± standard error and the seeds below."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import defaults_matrix

    acc = [{"test": 0.90, "metric": "acc"}, {"test": 0.80, "metric": "acc"}]
    assert defaults_matrix._gain(acc, {0: 0.85, 1: 0.82, 2: 0.1}, [0, 1]) == "+1.5 ± 3.5 (1 of 2 below)"
    mse = [{"test": 0.5, "metric": "mse"}, {"test": 0.1, "metric": "mse"}]
    assert defaults_matrix._gain(mse, {0: 1.0, 1: 0.2}, [0, 1]) == "+0.300 ± 0.200 (0 of 2 below)"
    assert defaults_matrix._gain(acc, {}, [0, 1]) == "-"


def test_defaults_matrix_splits_the_test_set_into_held_and_rest():
    """Each row scores the whole test split and its two seeded halves: ``held`` (what a choice reads) and ``rest``
    (what none reads) are disjoint, cover it, and are the same halves for a seed whatever is scored."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import defaults_matrix

    scores = torch.arange(10, dtype=torch.float32)
    got = defaults_matrix._test_metrics(scores, seed=3)
    assert got["test"] == pytest.approx(4.5) and got["held"] + got["rest"] == pytest.approx(9.0)
    assert got["held"] != got["rest"]
    again = defaults_matrix._test_metrics(scores * 2, seed=3)
    assert again["held"] == pytest.approx(2 * got["held"])  # the same samples
    assert defaults_matrix._test_metrics(scores, seed=4)["held"] != got["held"]


def test_defaults_matrix_compare_pairs_two_option_sets_on_held(tmp_path):
    """``compare``: each option set's held gain over plain training of the same seed, and their paired difference;
    seeds without a row of each side and of plain training are left out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _store
    import defaults_matrix

    table = tmp_path / "t.jsonl"
    before, after = {"virtual_step": "sgd"}, {"virtual_step": "mirror"}

    def row(net, config, options, seed, held, auroc=0.9):
        key = {"task": "vit", "net": net, "config": config, "seed": seed, "steps": 600}
        if options is not None:
            key["options"] = options
        result = {"test": held, "held": held, "rest": held, "metric": "acc", "auroc": auroc}
        _store.append(table, {"key": key, "result": result, "provenance": {}})

    for seed, (plain, b, a) in enumerate([(0.70, 0.60, 0.72), (0.80, 0.78, 0.81), (0.50, 0.40, 0.50)]):
        row("plain", "plain", None, seed, plain)
        row("gated", "defaults", before, seed, b, auroc=0.6)
        row("gated", "defaults", after, seed, a)
    row("gated", "defaults", after, 7, 0.99)  # no row before: left out
    text = defaults_matrix.compare(table, 600, before, after)
    line = next(x for x in text.splitlines() if x.startswith("| vit | gated"))
    assert line == (
        "| vit | gated | 3 | -7.3 ± 2.7 (2 below) | +1.0 ± 0.6 (0 below) | +8.3 ± 2.7 | 0.60 to 0.60 | 0.90 to 0.90 |"
    )


def test_defaults_matrix_placebo_spread_reads_each_seed_against_plain(tmp_path):
    """The placebo's spread: its metric less plain training's, seed by seed (accuracy in points)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _store
    import defaults_matrix

    assert defaults_matrix.nets_for("vit", "placebo") == ["jitter"]
    table = tmp_path / "t.jsonl"
    for seed, (plain, placebo) in enumerate([(0.70, 0.75), (0.80, 0.78), (0.50, 0.50)]):
        for config, held in (("plain", plain), ("placebo", placebo)):
            key = {"task": "vit", "net": "plain" if config == "plain" else "jitter", "config": config, "seed": seed}
            result = {"test": held, "held": held, "rest": held, "metric": "acc"}
            _store.append(table, {"key": {**key, "steps": 600}, "result": result, "provenance": {}})
    line = next(x for x in defaults_matrix.placebo_spread(table, 600).splitlines() if x.startswith("| vit"))
    assert line == "| vit | 3 | +1.0 ± 2.1 | 3.6 | -2.0, +5.0 | 1 |"


def test_defaults_matrix_mirror_runs_sgd_tasks_as_the_defaults():
    """``--config mirror`` mirrors the step of Adam / AdamW only: a task trained with SGD runs as the defaults,
    bit for bit; the jitter placebo returns no weights' statistics."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import defaults_matrix

    mirror = defaults_matrix.run("cls_sgd", "gated", "mirror", 0, 4)
    defaults = defaults_matrix.run("cls_sgd", "gated", "defaults", 0, 4)
    assert (mirror["test"], mirror["auroc"]) == (defaults["test"], defaults["auroc"])
    placebo = defaults_matrix.run("cls_sgd", "jitter", "placebo", 0, 4)
    assert {"test", "held", "rest"} <= set(placebo) and "auroc" not in placebo
