"""The step-cost benchmark's variants run (tiny batches; no timing is checked)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_cost  # noqa: E402

SUBSETS = {
    # every engine and look-ahead on the quicker model; the ResNet's own code paths once
    "transformer": lambda v: v.interval == 1 or v.name == "forward/full/k=10",
    "resnet32": lambda v: v.kind in ("plain", "reference", "floor") or v.name == "linear_head/head/k=1",
}


@pytest.mark.parametrize("model_name", SUBSETS)
def test_variants_run(model_name):
    chosen = [v for v in step_cost.variants() if SUBSETS[model_name](v)]
    assert len(chosen) >= 4
    for variant in chosen:
        setup = step_cost.Setup(model_name, variant.meta_batch)
        setup.x, setup.y, setup.xm, setup.ym = setup.x[:4], setup.y[:4], setup.xm[:4], setup.ym[:4]
        step = step_cost.make_step(setup, variant)
        for _ in range(variant.interval + 1):
            step()
