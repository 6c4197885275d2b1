"""A reweighted step prints none of torch's deprecation noise, and silences nothing else."""

import subprocess
import sys

CODE = """
import warnings
import torch
from torch import nn
from reweight import MetaReweighter

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rw = MetaReweighter(model, opt, [(torch.randn(6, 4), torch.randint(0, 3, (6,)))], engine="forward", seed=0)
x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
rw.step(x, y, model(x))
assert "torch._decomp.decompositions_for_jvp" in __import__("sys").modules
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warnings.warn("`torch.jit.script` is deprecated (raised by the user)", FutureWarning)
assert len(caught) == 1, caught  # the filter was scoped, not left behind
print("ok")
"""


def test_forward_engine_step_raises_no_future_warning_and_leaves_filters_alone():
    # -W error turns any FutureWarning (torch.jit.script's included) into an error
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", CODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
