"""MetaReweightCallback: a real Lightning Trainer with automatic optimisation, offline on the CPU."""

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

if not os.environ.get("CI"):  # CI installs the extra (".[test]") and must run these tests, never skip them
    pytest.importorskip("lightning")

import lightning as L  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from reweight import LossNet  # noqa: E402
from reweight.integrations.lightning import MetaReweightCallback, reweight_step  # noqa: E402

CLASSES = 3


class LitClassifier(L.LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.steps = []  # (x, y, weights, grads before the optimizer step)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        weights = reweight_step(self, x, y, logits)
        self.steps.append({"x": x, "y": y, "weights": weights})
        return (weights * F.cross_entropy(logits, y, reduction="none")).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        weights = reweight_step(self, x, y, logits)
        self.log("val_loss", (weights * F.cross_entropy(logits, y, reduction="none")).mean())

    def on_before_optimizer_step(self, optimizer):
        self.steps[-1]["grads"] = {k: p.grad.clone() for k, p in self.named_parameters()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def meta_loader() -> DataLoader:
    return DataLoader(data(12, 50), batch_size=6, shuffle=True)


def trainer(tmp_path, **kw) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
    }
    options.update(kw)
    return L.Trainer(**options)


def test_gradient_is_the_hand_computed_weighted_gradient_and_the_net_learns(tmp_path):
    module = LitClassifier()
    initial = copy.deepcopy(module)
    # a random start and no meta warm-up: the one step's weights differ from 1 (the default uniform start
    # would give every sample weight 1) and the net moves at its full lr
    net = LossNet(hidden=8, uniform_start=False)
    net_before = copy.deepcopy(net.state_dict())
    callback = MetaReweightCallback(meta_loader(), net=net, seed=0, meta_warmup=0)
    trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, DataLoader(data(8, 1), batch_size=8))
    step = module.steps[0]
    assert not torch.allclose(step["weights"], torch.ones_like(step["weights"]))
    initial.train()
    (step["weights"] * F.cross_entropy(initial(step["x"]), step["y"], reduction="none")).mean().backward()
    for k, p in initial.named_parameters():
        torch.testing.assert_close(step["grads"][k], p.grad, rtol=1e-5, atol=1e-7, msg=k)
    assert any(not torch.equal(net_before[k], v) for k, v in callback.reweighter.net.state_dict().items())
    # the weighting net is not part of the LightningModule
    assert not any(p is q for p in module.parameters() for q in net.parameters())
    assert all(not k.startswith("reweight") for k in module.state_dict())


def test_accumulation_divides_the_weighted_loss(tmp_path):
    module = LitClassifier()
    initial = copy.deepcopy(module)
    callback = MetaReweightCallback(meta_loader(), seed=0)
    trainer(tmp_path, max_steps=1, accumulate_grad_batches=2, callbacks=[callback]).fit(
        module, DataLoader(data(8, 1), batch_size=4)
    )
    assert len(module.steps) == 2 and callback.reweighter.step_count == 2
    initial.train()
    for step in module.steps:
        losses = F.cross_entropy(initial(step["x"]), step["y"], reduction="none")
        ((step["weights"] * losses).sum() / 8).backward()
    for k, p in initial.named_parameters():
        torch.testing.assert_close(module.steps[-1]["grads"][k], p.grad, rtol=1e-5, atol=1e-7, msg=k)


def test_validation_runs_no_meta_step(tmp_path):
    module = LitClassifier()
    callback = MetaReweightCallback(meta_loader(), seed=0)
    t = trainer(tmp_path, max_steps=2, callbacks=[callback])
    t.fit(module, DataLoader(data(8, 1), batch_size=4))
    steps = callback.reweighter.step_count
    x, y = data(8, 2).tensors
    results = t.validate(module, DataLoader(data(8, 2), batch_size=8), verbose=False)
    assert callback.reweighter.step_count == steps == 2
    module.eval()
    with torch.no_grad():
        plain = F.cross_entropy(module(x), y)
    assert results[0]["val_loss"] == pytest.approx(float(plain), rel=1e-5)  # unit weights in evaluation


def _own_cross_entropy(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


@pytest.mark.parametrize("loss_fn", [None, _own_cross_entropy], ids=["library loss", "own loss"])
def test_state_survives_lightning_checkpoint_and_resume(tmp_path, loss_fn):
    """Also under a loss of the user's, where net="auto" waits for the first batch and the checkpoint settles it."""
    kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
    train = DataLoader(data(16, 1), batch_size=4)
    full_cb = MetaReweightCallback(meta_loader(), seed=0, **kwargs)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    full = LitClassifier()
    trainer(tmp_path, max_epochs=2, callbacks=[full_cb, saver], enable_checkpointing=True).fit(full, train)
    path = tmp_path / "epoch=0-step=4.ckpt"
    assert torch.load(path, weights_only=True)["callbacks"]["MetaReweightCallback"]["step"] == 4

    resumed_cb = MetaReweightCallback(meta_loader(), seed=123, **kwargs)
    resumed = LitClassifier(seed=9)
    trainer(tmp_path, max_epochs=2, callbacks=[resumed_cb]).fit(resumed, train, ckpt_path=str(path))
    assert resumed_cb.reweighter.step_count == full_cb.reweighter.step_count == 8
    assert resumed_cb.reweighter.options.net == full_cb.reweighter.options.net == "gated"
    for k, v in full_cb.reweighter.net.state_dict().items():
        torch.testing.assert_close(resumed_cb.reweighter.net.state_dict()[k], v)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)


def test_missing_lightning_names_the_extra():
    code = (
        "import sys; sys.modules['lightning'] = None\n"
        "try:\n    import reweight.integrations.lightning\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "reweight[lightning]"' in out


def test_head_lookahead_works_from_the_first_step_and_equals_the_reverse_engine_on_the_head(tmp_path):
    weights = {}
    for name, kwargs in {
        "head": {"lookahead": "head"},
        "reverse": {"lookahead": ["net.3.*"], "engine": "reverse"},
    }.items():
        module = LitClassifier()
        callback = MetaReweightCallback(meta_loader(), seed=0, **kwargs)
        trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, DataLoader(data(8, 1), batch_size=4))
        assert callback.reweighter.step_count == 2
        weights[name] = [s["weights"] for s in module.steps]
    for w_head, w_rev in zip(weights["head"], weights["reverse"]):
        torch.testing.assert_close(w_head, w_rev, rtol=1e-4, atol=1e-6)


def test_weight_statistics_are_logged(tmp_path):
    module = LitClassifier()
    callback = MetaReweightCallback(meta_loader(), seed=0)
    t = trainer(tmp_path, max_steps=2, callbacks=[callback])
    t.fit(module, DataLoader(data(8, 1), batch_size=4))
    w = module.steps[-1]["weights"].float()
    logged = t.logged_metrics
    assert float(logged["reweight/weight_std"]) == pytest.approx(float(w.std(unbiased=False)), rel=1e-5)
    assert float(logged["reweight/weight_min"]) == pytest.approx(float(w.min()), rel=1e-6)
    assert float(logged["reweight/weight_max"]) == pytest.approx(float(w.max()), rel=1e-6)
    assert float(logged["reweight/meta_loss"]) == pytest.approx(float(callback.reweighter.last_meta_loss), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "warns"),
    [
        ({"veto_warmup": 0}, True),  # the veto from the first step, in a run shorter than the net's warm-up
        ({}, False),  # by default the veto waits for the net
        ({"veto_warmup": 0, "veto": math.inf}, False),
        ({"veto_warmup": 0, "meta_warmup": 2}, False),
    ],
)
def test_a_run_shorter_than_the_nets_warmup_is_warned_about(tmp_path, kwargs, warns):
    from reweight.monitor import ShortRunWarning

    callback = MetaReweightCallback(meta_loader(), seed=0, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(LitClassifier(), DataLoader(data(8, 1), batch_size=4))
    assert sum(issubclass(w.category, ShortRunWarning) for w in caught) == int(warns)
