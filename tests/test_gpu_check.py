"""benchmarks/gpu_check.py, the one-shot check for a CUDA machine: without CUDA it exits cleanly, and its CPU smoke
mode runs the same code (timings, sync counts, attention operators, time budget) and writes the report."""

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def test_without_cuda_exits_cleanly_saying_so(tmp_path):
    out = run("--out", str(tmp_path / "out"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "no CUDA device: nothing to check"
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run("--device", "cpu", "--smoke", "--out", str(out))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), cpu_s


def test_smoke_writes_every_section_and_describes_the_machine(smoke):
    report, md, cpu_s = smoke
    assert {"machine", "timing", "syncs", "sdpa", "ddp", "fsdp2", "items", "elapsed_s", "finished"} <= set(report)
    assert "fatal" not in report
    assert {"torch", "python", "cpu_model", "cpu_count", "git_commit", "cuda_available"} <= set(report["machine"])
    assert report["ddp"] == report["fsdp2"] == {"status": "skipped: --device cpu without --ddp"}
    for title in ("## Step cost, batch=2, float32", "## Step cost, batch=2, bf16", "## Host synchronisations",
                  "## Attention operators", "## DDP", "## FSDP2"):
        assert title in md
    assert cpu_s < 60  # CPU seconds of the run (the wall time depends on what else the machine runs)


def test_ratios_are_the_runs_own_timings(smoke):
    timing = smoke[0]["timing"]["batch=2"]
    names = [v.name for v in gpu_check.variants()]
    for dtype in ("float32", "bf16"):
        assert set(timing[dtype]) == set(gpu_check.SMOKE_MODELS)
        for model, rows in timing[dtype].items():
            assert list(rows) == names
            for name, row in rows.items():
                if model == "resnet32" and name.startswith("ghost"):  # BatchNorm couples the samples
                    assert row["status"] == "not applicable" and "batch norm" in row["error"], row
                    continue
                assert row["plain_ms"] > 0 and row["step_ms"] > 0, row
                assert row["ratio"] == pytest.approx(row["step_ms"] / row["plain_ms"], rel=1e-9), row
    rows = timing["float32"]["transformer"]
    assert rows["preset=fast"]["engine"] == "ghost" and rows["preset=fast"]["interval"] > 1
    assert rows["lookahead=head"]["engine"] == "linear_head" and rows["plain"]["engine"] == "-"


def test_one_sync_count_per_engine(smoke):
    syncs = smoke[0]["syncs"]
    for model in gpu_check.SMOKE_MODELS:
        for engine, _ in gpu_check.SYNC_ENGINES:
            row = syncs[model][engine]
            if model == "resnet32" and engine.startswith("ghost"):
                assert row["status"] == "not applicable", row
                continue
            assert row["engine"] == engine and row["method"] == "counted calls"
            assert isinstance(row["per_step"], int) and row["per_step"] >= 0, row
            assert len(row["reweighter_step"]) == len(row["whole_step"]) == 2
            assert row["per_step"] <= 1, row  # the library's claim (tests/test_host_sync.py)


def test_attention_operators_by_pass(smoke):
    sdpa = smoke[0]["sdpa"]
    for dtype in ("float32", "bf16"):
        for name in [v.name for v in gpu_check.variants()]:
            found = sdpa[dtype][name]
            assert any("scaled_dot_product" in op for op in found["user forward"]), found
            if name != "plain":  # the meta step's own forward at the look-ahead parameters
                assert set(found) - {"user forward", "user backward"}, found
    assert "reweight.jvp" in sdpa["float32"]["forward"]


def test_budget_spent_skips_and_records_every_item(tmp_path):
    out = run("--device", "cpu", "--smoke", "--models", "transformer", "--budget-s", "0", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["items"] and {i["status"] for i in report["items"]} == {"skipped"}
    assert report["timing"]["batch=2"]["float32"]["transformer"]["ghost"]["reason"].startswith("time budget")
    assert f"## Items not run or failed ({len(report['items'])} of {len(report['items'])})" in (
        tmp_path / "gpu_check.md"
    ).read_text()


def test_a_failing_item_is_recorded_and_the_next_runs(tmp_path):
    check = gpu_check.Check(argparse.Namespace(out=tmp_path, budget_s=1e6), cuda=False)

    def fails():
        raise RuntimeError("boom")

    def refuses():
        raise NotImplementedError("engine 'ghost': not for this model")

    assert check.item("s", ("a",), fails) is None
    assert check.item("s", ("b",), refuses) is None
    assert check.item("s", ("c",), lambda: {"x": 1}) == {"x": 1}
    assert [i["status"] for i in check.report["items"]] == ["error", "not applicable", "ok"]
    assert check.report["s"]["a"]["error"] == "RuntimeError: boom" and check.report["s"]["c"] == {"x": 1}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["s"]["c"] == {"x": 1}


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_equality_check_on_two_gloo_ranks(kind):
    """The check the script runs with NCCL on two GPUs, here on gloo: every run equal to one process, the
    nets and gathered models identical across ranks, FSDP2 on the sharded ghost path."""
    out = gpu_check.equality_check(kind, "gloo", timeout_s=150)
    names = gpu_check.EQUALITY[kind][1]
    rows = {k: v for k, v in out.items() if k != "backend"}
    assert out["backend"] == "gloo" and rows and (names is None or set(rows) == set(names))
    for name, row in rows.items():
        assert row["ok"] and row["ranks_identical"] and row["max_diff_to_single"] <= 1e-5, (name, row)
        if kind == "fsdp2":
            assert row["engine"] == "ghost", (name, row)
