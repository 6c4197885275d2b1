"""Group weights are visible: the diagnostics helpers, the plot, and the logs of the three integrations; the
Hugging Face Trainer reads the group id from a dataset column."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from reweight import MetaReweighter
from reweight.diagnostics import GroupWeightHistory, group_weights, plot_group_weights
from reweight.integrations._common import WeightStats, group_stats, needs_class_logits, reads_groups
from reweight.nets import GroupNet

CLASSES = 3


def _reweighter(names=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    meta = [(torch.randn(8, 6), torch.randint(0, CLASSES, (8,)))]
    kwargs = {"num_groups": 2, "group_names": names} if names else {"num_groups": 2}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, MetaReweighter(model, opt, meta, net="groups", net_kwargs=kwargs, seed=0)


def test_diagnostics_group_weights_history_and_plot(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    model, opt, rw = _reweighter(["clean", "noisy"])
    history = GroupWeightHistory()
    history.record(rw, step=0)
    assert group_weights(rw) == {"clean": 1.0, "noisy": 1.0}
    for t in range(3):
        x, y = torch.randn(6, 6), torch.randint(0, CLASSES, (6,))
        rw.step(x, y, model(x), groups=torch.tensor([0, 0, 0, 1, 1, 1]))
        history.record(rw, step=t + 1)
    a = history.arrays()
    assert a["names"] == ["clean", "noisy"] and a["weights"].shape == (4, 2)
    assert a["weights"][-1].mean() == pytest.approx(1.0)
    history.plot(tmp_path / "g.png")
    with caplog.at_level(logging.INFO):  # the log-scale ticks are plain numbers: no mathtext font lookups
        plot_group_weights(a["steps"], a["weights"], tmp_path / "h.png")
    assert not [r for r in caplog.records if "findfont" in r.getMessage()]
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "h.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no group weights"):
        group_weights(nn.Linear(2, 2))


def test_weight_stats_carry_the_group_weights():
    model, opt, rw = _reweighter(["a", "b"])
    stats = WeightStats()
    stats.update(torch.tensor([0.5, 1.5]), None, group_stats(rw))
    stats.update(
        torch.tensor([0.5, 1.5]), None, {"group_weight/a": torch.tensor(2.0), "group_weight/b": torch.tensor(0.0)}
    )
    out = stats.pop()
    assert out["group_weight/a"] == pytest.approx(1.5) and out["group_weight/b"] == pytest.approx(0.5)
    assert group_stats(None) == {}


def test_integration_predicates():
    assert reads_groups("groups") and not reads_groups("lossnet") and reads_groups(GroupNet(2))
    assert not needs_class_logits("groups", {"num_groups": 2})
    assert not needs_class_logits("groups", {"num_groups": 2, "within": "lossnet"})
    assert needs_class_logits("groups", {"num_groups": 2, "within": "metainfonet"})


def test_hf_trainer_reads_the_source_column_and_logs_group_weights(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from reweight.integrations.transformers import ReweightTrainer

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    model = BertForSequenceClassification(config)

    def rows(n, with_source=True):
        out = []
        for i in range(n):
            row = {"input_ids": torch.randint(1, 40, (8,)), "labels": int(torch.randint(0, 3, ()))}
            if with_source:
                row["origin"] = i % 2
            out.append(row)
        return out

    args = TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=8, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = ReweightTrainer(
        model=model, args=args, train_dataset=rows(24), meta_dataset=rows(8), lookahead_lr=0.1, group_column="origin",
        reweight_kwargs={"net": "groups", "net_kwargs": {"num_groups": 2, "group_names": ["x", "y"]}, "seed": 0},
    )  # fmt: skip
    trainer.train()
    rw = trainer.reweighter
    assert rw.step_count == 3
    logs = [entry for entry in trainer.state.log_history if "reweight/group_weight/x" in entry]
    assert logs, trainer.state.log_history
    assert logs[-1]["reweight/group_weight/x"] + logs[-1]["reweight/group_weight/y"] == pytest.approx(2.0, rel=1e-5)
    assert not torch.equal(rw.group_weights, torch.ones(2, dtype=rw.group_weights.dtype))

    # a dataset without the column: the error names it
    trainer2 = ReweightTrainer(
        model=model, args=args, train_dataset=rows(16, with_source=False), meta_dataset=rows(8), lookahead_lr=0.1,
        reweight_kwargs={"net": "groups", "net_kwargs": {"num_groups": 2}, "seed": 0},
    )  # fmt: skip
    with pytest.raises(ValueError, match="group_column='source'"):
        trainer2.train()


def test_lightning_callback_logs_group_weights(tmp_path):
    pytest.importorskip("lightning")
    from lightning_fit import fit_passing

    from reweight.integrations.lightning import MetaReweightCallback

    meta = [(torch.randn(6, 6), torch.randint(0, CLASSES, (6,)))]
    callback = MetaReweightCallback(meta, net="groups", net_kwargs={"num_groups": 2}, seed=0)
    trainer = fit_passing(callback, torch.arange(16) % 2, "groups", 2, str(tmp_path))
    logged = trainer.logged_metrics
    gw = callback.reweighter.group_weights
    assert float(logged["reweight/group_weight/0"]) == pytest.approx(float(gw[0]), rel=1e-6)
    assert float(logged["reweight/group_weight/1"]) == pytest.approx(float(gw[1]), rel=1e-6)


def test_timm_task_passes_groups_and_reports_group_weights():
    timm = pytest.importorskip("timm")
    from reweight.integrations.timm import ReweightClassificationTask

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=CLASSES)
    meta = [(torch.randn(4, 3, 16, 16), torch.randint(0, CLASSES, (4,)))]
    task = ReweightClassificationTask(model, meta, net="groups", net_kwargs={"num_groups": 2}, seed=0, verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    task.bind_optimizer(optimizer)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, CLASSES, (4,))
    out = task(x, y, groups=torch.tensor([0, 1, 0, 1]))
    out["loss"].backward()
    stats = task.pop_weight_stats()
    assert set(stats) >= {"group_weight/0", "group_weight/1", "weight_std"}
    assert stats["group_weight/0"] + stats["group_weight/1"] == pytest.approx(2.0, rel=1e-5)
