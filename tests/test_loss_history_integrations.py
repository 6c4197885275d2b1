"""The loss history through the integrations: the Hugging Face Trainer reads each sample's index from a dataset
column, Lightning's ``reweight_step`` and timm's task pass ``sample_ids``; each keeps the history of exactly the
samples it trained on."""

from __future__ import annotations

import pytest
import torch

CLASSES = 3


def _seen(reweighter) -> set[int]:
    store = reweighter._slot.history
    assert store is not None
    return set(torch.nonzero(store.seen).flatten().tolist())


def test_hf_trainer_reads_the_id_column(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from reweight.integrations.transformers import ReweightTrainer

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    model = BertForSequenceClassification(config)

    def rows(n, offset=0, with_ids=True):
        out = []
        for i in range(n):
            row = {"input_ids": torch.randint(1, 40, (8,)), "labels": int(torch.randint(0, 3, ()))}
            if with_ids:
                row["sample_id"] = offset + i
            out.append(row)
        return out

    args = TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=8, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = ReweightTrainer(
        model=model, args=args, train_dataset=rows(24, offset=100), meta_dataset=rows(8, with_ids=False),
        reweight_kwargs={"loss_history": True, "seed": 0},
    )  # fmt: skip
    trainer.train()
    assert trainer.reweighter.step_count == 3
    assert _seen(trainer.reweighter) == set(range(100, 124))  # three batches of 8: every training sample once

    trainer2 = ReweightTrainer(
        model=model, args=args, train_dataset=rows(16, with_ids=False), meta_dataset=rows(8, with_ids=False),
        reweight_kwargs={"loss_history": True, "seed": 0},
    )  # fmt: skip
    with pytest.raises(ValueError, match="id_column='sample_id'"):
        trainer2.train()


def test_lightning_reweight_step_passes_sample_ids(tmp_path):
    pytest.importorskip("lightning")
    from lightning_fit import fit_passing

    from reweight.integrations.lightning import MetaReweightCallback

    meta = [(torch.randn(6, 6), torch.randint(0, CLASSES, (6,)))]
    callback = MetaReweightCallback(meta, net="lossnet", loss_history=True, seed=0)
    fit_passing(callback, torch.arange(16), "sample_ids", 1, str(tmp_path))
    assert _seen(callback.reweighter) == set(range(8))


def test_timm_task_passes_sample_ids():
    timm = pytest.importorskip("timm")
    from reweight.integrations.timm import ReweightClassificationTask

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=CLASSES)
    meta = [(torch.randn(4, 3, 16, 16), torch.randint(0, CLASSES, (4,)))]
    task = ReweightClassificationTask(model, meta, loss_history=True, seed=0, verbose=False)
    task.bind_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, CLASSES, (4,))
    out = task(x, y, sample_ids=torch.tensor([5, 9, 2, 7]))
    out["loss"].backward()
    assert _seen(task.reweighter) == {2, 5, 7, 9}
    with pytest.raises(ValueError, match="sample_ids"):
        task(x, y)
