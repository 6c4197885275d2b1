"""Tiny-scale smoke run of examples/source_weights.py and benchmarks/source_weights.py (a few steps each)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("mnist1d")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_example_runs_and_plots(tmp_path, capsys):
    ex = _load("examples/source_weights.py", "_example_source_weights")
    assert len(ex.simplex_grid(2)) == 7 and (1 / 3, 1 / 3, 1 / 3) in ex.simplex_grid(2)
    results = ex.main(steps_cls=3, steps_lm=3, out=str(tmp_path), grid=1)
    for task in ("classification", "lm"):
        assert (tmp_path / f"group_weights_{task}.png").read_bytes()[:8] == PNG
        r = results[task]
        assert set(r["learned"]["group_weights"]) == set(ex.NAMES[task])
        assert sum(r["learned"]["group_weights"].values()) == pytest.approx(3.0, rel=1e-5)
    assert "| uniform | learned | oracle" in capsys.readouterr().out


def test_benchmark_writes_rows_with_provenance(tmp_path):
    bench = _load("benchmarks/source_weights.py", "_bench_source_weights")
    table = tmp_path / "t.jsonl"
    row = bench.run("classification", seed=0, steps=2, grid=1, table=table)
    again = bench.run("classification", seed=0, steps=2, grid=1, table=table)  # found, not re-measured
    assert again == json.loads(table.read_text().splitlines()[0]) and len(table.read_text().splitlines()) == 1
    assert {"uniform", "learned", "oracle", "learned+lossnet", "group_weights"} <= set(row["result"])
    assert "commit" in json.dumps(row["provenance"]) or "version" in row["provenance"]


def test_choice_sweep_writes_one_row_per_candidate_and_reports_them(tmp_path):
    bench = _load("benchmarks/source_weights.py", "_bench_source_weights")
    table = tmp_path / "choice.jsonl"
    bench.choose([0], {"classification": 2, "lm": 2}, table=table)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert len(rows) == 2 * len(bench.CANDIDATES)
    assert all({"metric", "meta_metric", "group_weights"} <= set(r["result"]) for r in rows)
    text = bench.choice_report(table)
    assert all(f"| {name} |" in text for name in bench.CANDIDATES) and text.count("of 1 |") == len(rows)


def test_equal_sources_rows_and_report(tmp_path):
    bench = _load("benchmarks/source_weights.py", "_bench_source_weights")
    table = tmp_path / "equal.jsonl"
    bench.equal_sources([0], 2, table=table)
    bench.equal_sources([0], 2, table=table)  # found, not re-measured
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert len(rows) == 1 and {"uniform", "learned", "group_weights"} <= set(rows[0]["result"])
    assert "| 0 |" in bench.equal_report(table) and "Learned minus uniform" in bench.equal_report(table)
