"""The step-cost benchmark: every variant's timing row is the ratio of its own timings (tiny batches), and a
run writes rows with their provenance to the table and renders its report from them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_cost  # noqa: E402

SUBSETS = {
    # every engine and look-ahead on the quicker model; the ResNet's own code paths once
    "transformer": lambda v: v.interval == 1 or v.name == "forward/full/k=10",
    "resnet32": lambda v: (
        v.kind in ("plain", "reference", "floor", "floor-in-place") or v.name == "linear_head/head/k=1"
    ),
}


@pytest.mark.parametrize("model_name", SUBSETS)
def test_variants_run(model_name):
    chosen = [v for v in step_cost.variants() if SUBSETS[model_name](v)]
    assert len(chosen) >= 4
    for variant in chosen:
        setup = step_cost.Setup(model_name, variant.meta_batch)
        setup.x, setup.y, setup.xm, setup.ym = setup.x[:4], setup.y[:4], setup.xm[:4], setup.ym[:4]
        row = step_cost.time_variant(setup, variant, repeats=1)
        assert set(row) == {"plain_ms", "step_ms", "ratio"}
        assert row["plain_ms"] > 0 and row["step_ms"] > 0
        # one repeat: the median ratio is that repeat's variant time over its plain time
        assert row["ratio"] == pytest.approx(row["step_ms"] / row["plain_ms"], rel=1e-9)


def test_a_run_appends_rows_with_provenance_and_reports_from_them(tmp_path, capsys):
    import torch

    table = tmp_path / "step_cost.jsonl"
    args = ["--model", "transformer", "--only", "linear_head/head/k=10", "--repeats", "1", "--clock", "cpu"]
    step_cost.main(args + ["--table", str(table), "--run", "tiny"])
    printed = capsys.readouterr().out
    rows = step_cost._store.rows(table)
    names = [r["key"]["variant"] for r in rows]  # "plain" selects the plain step and the head floors too
    assert names[0] == "plain" and names[-1] == "linear_head/head/k=10" and len(names) == 4
    for r in rows:
        assert r["key"] == {"run": "tiny", "model": "transformer", "variant": r["variant"]["name"], "measure": "timing"}
        assert r["options"] == {"repeats": 1, "clock": "cpu", "allocator": "system", "block": 1, "threads": 1}
        assert r["result"]["ratio"] == pytest.approx(r["result"]["step_ms"] / r["result"]["plain_ms"])
        prov = r["provenance"]
        assert prov["packages"]["torch"] == torch.__version__ and len(prov["library"]["commit"]) == 40
        assert prov["threads"] == 1 and "--run tiny" in prov["command"]
    assert rows[-1]["variant"]["interval"] == 10 and rows[-1]["variant"]["engine"] == "linear_head"
    assert step_cost.report(table, ["tiny"]) in printed
    assert "| linear_head/head/k=10 | linear_head | head | 10 | 100 |" in printed


def test_live_bytes_are_read_per_profiler_range():
    import torch
    from torch.profiler import record_function

    def fn():
        kept = torch.empty(2**18)  # 1 MiB of float32
        with record_function("reweight.a"):
            torch.empty(2**19).fill_(1.0)  # 2 MiB, freed inside the range
        with record_function("reweight.b"):
            pass
        del kept

    phases = step_cost.live_by_phase(fn)
    assert phases["a"] == pytest.approx((1.0, 3.0))
    assert phases["b"] == pytest.approx((1.0, 1.0))
    assert phases["step"] == pytest.approx((0.0, 3.0))
    assert step_cost.live_peak_mb(fn) == pytest.approx(3.0)


def test_compile_cost_rows_are_their_own_ratios(capsys):
    import compile_cost

    rows = compile_cost.main(["--model", "mlp", "--modes", "eager", "--repeats", "2", "--batch", "4"])
    (row,) = rows
    assert row["plain_ms"] > 0 and row["reweighted_ms"] > 0 and row["ratio"] > 0
    assert row["added_ms"] == pytest.approx(row["reweighted_ms"] - row["plain_ms"])
    assert "| mlp | auto | eager |" in capsys.readouterr().out


def test_llama_lora_rows_time_ghost_and_forward_on_the_adapters():
    setup = step_cost.Setup("llama_lora", 2, batch=2)
    assert isinstance(setup.x, dict) and setup.loss_fn is not None
    trained = setup.fresh()[1].param_groups[0]["params"]
    assert trained and all(p.requires_grad for p in trained)  # the LoRA adapters only
    for engine in ("ghost", "forward"):
        row = step_cost.time_variant(setup, step_cost.Variant(f"{engine}/full/k=1", "reweight", engine, "full"), 1)
        assert row["plain_ms"] > 0 and row["ratio"] == pytest.approx(row["step_ms"] / row["plain_ms"], rel=1e-9)
    with pytest.raises(NotImplementedError):
        step_cost.make_step(setup, step_cost.Variant("reference flow (MW-Net code)", "reference"))
    compiled = step_cost.compiled_variant(step_cost.Variant("ghost/full/k=1", "reweight", "ghost", "full"))
    assert compiled.name == "ghost/full/k=1 compiled" and compiled.compiled


def test_compiled_variants_and_their_accounting_render_beside_the_eager_ones(tmp_path, monkeypatch):
    import functools

    import torch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.compiler.reset()
    table = tmp_path / "step_cost.jsonl"
    small = ["--model", "mlp", "--repeats", "1", "--batch", "4", "--meta-batch", "4", "--clock", "cpu"]
    small += ["--table", str(table), "--modes", "eager", "compiled"]
    step_cost.main(small + ["--only", "ghost/full/k=1", "--exact", "--run", "c"])
    rows = step_cost._store.rows(table)
    names = [r["key"]["variant"] for r in rows]
    assert names == ["plain", "ghost/full/k=1", "plain compiled", "ghost/full/k=1 compiled"]
    assert rows[-1]["variant"]["compiled"] and rows[-1]["variant"]["meta_batch"] == 4
    assert rows[0]["options"]["modes"] == ["eager", "compiled"] and rows[0]["options"]["batch"] == 4
    text = step_cost.compile_report(table, ["c"])
    cells = [[c.strip() for c in line.split("|")[2:9]] for line in text.splitlines() if line.startswith("| mlp |")]
    by = {c[0]: c[1:] for c in cells}
    assert "-" not in by["ghost/full/k=1"] and by["plain"][2] == "-" and by["plain"][4] != "-"

    step_cost.main(small + ["--components", "--run", "a"])
    text = step_cost.compile_accounting(table, "a")
    assert "| ghost: its own forward of the batch, captured | - |" in text
    assert "| the reweighted step (ghost/full/k=1) |" in text and "| x its plain step |" in text


def test_a_partial_lookahead_renames_the_full_variants(tmp_path):
    pytest.importorskip("peft")
    table = tmp_path / "step_cost.jsonl"
    args = ["--model", "llama_lora", "--only", "ghost/full/k=1", "--exact", "--lookahead", "*layers.1.*lora*"]
    step_cost.main(args + ["--batch", "2", "--meta-batch", "2", "--repeats", "1", "--clock", "cpu"]
                   + ["--table", str(table), "--run", "partial"])  # fmt: skip
    rows = {r["key"]["variant"]: r for r in step_cost._store.rows(table)}
    assert set(rows) == {"plain", "ghost/*layers.1.*lora*/k=1"}
    variant = rows["ghost/*layers.1.*lora*/k=1"]["variant"]
    assert variant["lookahead"] == "*layers.1.*lora*" and variant["engine"] == "ghost"
    assert rows["ghost/*layers.1.*lora*/k=1"]["result"]["ratio"] > 0
