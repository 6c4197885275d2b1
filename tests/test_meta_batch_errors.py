"""A meta batch the model cannot take, one of another dtype, and a mean-reduced meta loss: each is either
handled (cast to the model's dtype) or refused with an error that names the meta batch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MetaReweighter


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("engine", ["auto", "forward", "reverse"])
def test_a_meta_batch_of_the_wrong_width_names_the_meta_batch_and_its_shapes(engine):
    model = _model()
    meta = [(torch.randn(20, 32), torch.randint(0, 4, (20,)))]
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, engine=engine, seed=0)
    x, y = torch.randn(8, 64), torch.randint(0, 4, (8,))
    with pytest.raises(ValueError, match=r"cannot take the meta batch: inputs of shapes \(20, 32\) \(training batch: "
                       r"\(8, 64\)\)"):
        rw.step(x, y, model(x))
    assert rw.step_count == 0


def test_float64_meta_inputs_are_cast_to_the_model_dtype():
    model = _model()
    meta = [(torch.randn(20, 64, dtype=torch.float64), torch.randint(0, 4, (20,)))]
    reference = [(meta[0][0].float(), meta[0][1])]
    x, y = torch.randn(8, 64), torch.randint(0, 4, (8,))
    got = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, seed=0).step(x, y, model(x))
    want = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), reference, seed=0).step(x, y, model(x))
    assert torch.equal(got, want)


def test_float64_regression_targets_are_cast_too():
    model = nn.Linear(3, 1)
    mse = lambda out, t: F.mse_loss(out.squeeze(-1), t, reduction="none")  # noqa: E731
    meta = [(torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64))]
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, loss_fn=mse, seed=0)
    x, y = torch.randn(8, 3), torch.randn(8)
    assert rw.step(x, y, model(x)).dtype == torch.float32


def test_a_mean_reduced_meta_loss_is_refused():
    model = _model()
    meta = [(torch.randn(20, 64), torch.randint(0, 4, (20,)))]
    rw = MetaReweighter(
        model, torch.optim.SGD(model.parameters(), lr=0.1), meta, meta_loss_fn=nn.CrossEntropyLoss(), seed=0
    )
    x, y = torch.randn(8, 64), torch.randint(0, 4, (8,))
    with pytest.raises(ValueError, match=r"meta_loss_fn on the meta batch must return per-sample losses of shape "
                       r"\(20,\), got \(\) \(a mean- or sum-reduced loss: use reduction='none'\)"):
        rw.step(x, y, model(x))
