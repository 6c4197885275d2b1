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
