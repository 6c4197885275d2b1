"""preset= reaches the reweighter each integration builds, through the real frameworks."""

from __future__ import annotations

import os

import pytest
import torch

if not os.environ.get("CI"):  # CI installs the extras (".[test]") and must run these tests, never skip them
    pytest.importorskip("timm")
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")

from test_integration_lightning import LitClassifier, data, meta_loader, trainer  # noqa: E402
from test_integration_timm import make_task  # noqa: E402
from test_integration_transformers import bert, make_trainer, text_dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from reweight.integrations.lightning import MetaReweightCallback  # noqa: E402


def test_timm_task_passes_the_preset():
    _, task, _ = make_task(preset="fast")
    assert task.reweighter.preset == "fast" and task.reweighter.interval == 6
    _, task, _ = make_task(preset="fast", interval=2)  # an explicit argument still wins
    assert task.reweighter.interval == 2


def test_lightning_callback_passes_the_preset(tmp_path):
    callback = MetaReweightCallback(meta_loader(), preset="fast", seed=0)
    trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(LitClassifier(), DataLoader(data(8, 1), batch_size=4))
    assert callback.reweighter.preset == "fast" and callback.reweighter.interval == 6


def test_hf_trainer_passes_the_preset(tmp_path):
    hf = make_trainer(
        tmp_path, bert("eager"), text_dataset(8, 1), text_dataset(6, 2), reweight_kwargs={"preset": "fast", "seed": 0}
    )
    hf.train()
    rw = hf.reweighter
    assert rw.preset == "fast" and rw.interval == 6 and rw.lookahead_lr is None
    group = rw.meta_optimizer.param_groups[0]
    assert type(rw.meta_optimizer) is torch.optim.AdamW and group["reweight_lr"] == 6e-3
    assert rw.step_count == 1 and group["lr"] == pytest.approx(6e-3 / 300)  # one step into the meta warm-up
