"""The step-cost benchmark's variants all run (tiny batches; no timing is checked)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_cost  # noqa: E402


@pytest.mark.parametrize("model_name", ["resnet32", "transformer"])
def test_every_variant_runs(model_name):
    for variant in step_cost.variants():
        setup = step_cost.Setup(model_name, variant.meta_batch)
        setup.x, setup.y, setup.xm, setup.ym = setup.x[:4], setup.y[:4], setup.xm[:4], setup.ym[:4]
        step = step_cost.make_step(setup, variant)
        step()
        step()
