"""``benchmarks/readme_loop.py``: the options given on the command line name the rows they ran, ``--nets`` runs
only those nets beside plain training, and the report reads each net against plain training of the same seed."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loop():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("_bench_readme_loop", ROOT / "benchmarks" / "readme_loop.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_bench_readme_loop"] = module
    spec.loader.exec_module(module)
    return module


def test_given_options_name_the_rows_of_the_nets_only(loop):
    assert loop._key(0.0, 0.1, 3, "lossnet", {"min_ess": 0.4}) == {
        "noise": 0.0, "lr": 0.1, "seed": 3, "net": "lossnet", "options": {"min_ess": 0.4}
    }  # fmt: skip
    assert loop._key(0.0, 0.1, 3, None, {"min_ess": 0.4}) == {"noise": 0.0, "lr": 0.1, "seed": 3, "net": "plain"}


def test_nets_runs_those_nets_beside_plain_training_and_the_report_reads_them(loop, tmp_path, monkeypatch):
    ran = []

    def run(seed, noise, lr, net, **options):  # a stand-in for training: accuracy from the seed and the net
        ran.append((seed, noise, net, options))
        return 0.5 + 0.01 * seed + (0.02 if net else 0.0), bool(noise)

    monkeypatch.setattr(loop, "run", run)
    table = tmp_path / "loop.jsonl"
    argv = ["--nets", "lossnet", "--min-ess", "0.4", "--seeds", "0", "1", "--table", str(table)]
    assert loop.main(argv) == 0
    assert sorted({net for _, _, net, _ in ran}, key=str) == [None, "lossnet"]
    assert all(options == ({"min_ess": 0.4} if net else {}) for _, _, net, options in ran)
    assert len(ran) == 8  # two seeds, clean and noisy, plain and LossNet
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert {r["key"]["net"] for r in rows} == {"plain", "lossnet"}
    text = loop.report(table, nets=("lossnet",))
    assert "| clean | 0.1 | lossnet | +2.0 (lowest +2.0) | 0 of 2 | 0 of 2 |" in text
    assert "| 40% random | 0.1 | lossnet | +2.0 (lowest +2.0) | 0 of 2 | 2 of 2 |" in text
    assert "auto" not in text and "metainfonet" not in text
    assert loop.main(argv) == 0 and len(ran) == 8  # every key is in the table: nothing runs again
