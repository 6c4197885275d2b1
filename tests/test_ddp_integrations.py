"""The trainer integrations under data parallelism: two gloo processes on the CPU, as the core's DDP tests.

One pair of spawned processes shares a gloo group (``env://``, the variables a launcher sets) and runs, in turn,
a Hugging Face ``Trainer`` (tiny BERT built from a config, sequence classification; a tiny Llama for the
token-count normalisation), a Lightning ``Trainer`` with ``strategy="ddp"`` on two CPU devices, and timm's task
wrapped in DDP by ``prepare_distributed`` (what ``train.py --distributed`` does). Each rank records the
micro-batches its trainer gave it; the test process then trains one model with the core ``MetaReweighter`` on
the concatenated batches (and concatenated meta batches) and checks that the weighting nets are bit-identical
across ranks and that model and net equal that single-process run. The models have no BatchNorm (per-shard
statistics differ from the global batch's; see docs/distributed.md).
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if not os.environ.get("CI"):  # CI installs the extras (".[test]") and must run these tests, never skip them
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    pytest.importorskip("timm")

from rank_processes import free_port, launcher_env, spawn_ranks  # noqa: E402
from test_integration_transformers import bert, llama, text_dataset  # noqa: E402

from reweight import MetaReweighter  # noqa: E402

WORLD, STEPS, CLASSES = 2, 3, 3
HF_LOOKAHEAD_LR = 2.0  # the Trainer's lr 0.05 alone moves the weights too little to tell normalisations apart
META_LR = 2.0  # SGD on the net, not Adam: sees the scale of the net's gradient (as tests/test_ddp.py)


def _meta_sgd(params):
    return torch.optim.SGD(params, lr=META_LR)


# The net every run trains (as tests/test_ddp.py): a random start and no meta warm-up, so that every layer has a
# gradient to sum over ranks from the first step and the net moves at its full lr within STEPS steps (from the
# default uniform start, warmed up, the weights stay within 1e-3 of uniform); the SGD lr suits the normalised
# coefficients (sum |c| = 1 over the global batch)
NET = {"net": "lossnet", "net_kwargs": {"uniform_start": False}, "meta_warmup": 0, "meta_optimizer": _meta_sgd}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _cat(batches: list[Any]) -> Any:
    """The concatenation over ranks of one step's batches (tensors, tuples or dicts of tensors)."""
    first = batches[0]
    if isinstance(first, dict):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    if isinstance(first, tuple | list):
        return tuple(torch.cat(parts) for parts in zip(*batches))
    return torch.cat(batches)


def _assert_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, rtol: float = 2e-4) -> None:
    assert got.keys() == want.keys(), what
    for k, v in want.items():
        if v.is_floating_point():
            err = ((got[k] - v).abs() / (v.abs() + 1e-3)).max()
            assert torch.allclose(got[k], v, rtol=rtol, atol=rtol / 10), (
                f"{what} {k}: max relative difference {err:.2e}"
            )
        else:
            assert torch.equal(got[k], v), f"{what} {k}"


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- Hugging Face


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _hf_meta(rank: int | None, lm: bool = False) -> list[dict[str, torch.Tensor]]:
    """Meta batches of ``rank`` (or, with ``None``, their concatenation over ranks)."""
    if rank is None:
        return [_cat(list(parts)) for parts in zip(*(_hf_meta(r, lm) for r in range(WORLD)))]
    return [_collate(text_dataset(3, 500 + 10 * k + rank, lm)) for k in range(2)]


def _hf_train(rank: int, tmp: str, lm: bool) -> dict[str, Any]:
    from transformers import TrainerCallback, TrainingArguments

    from reweight.integrations.transformers import ReweightTrainer

    class Recording(ReweightTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            calls = self.reweighter.step_count if self.reweighter is not None else 0
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch, **kwargs)
            if self.reweighter is not None and self.reweighter.step_count > calls:
                self.batches.append(({k: v.clone() for k, v in inputs.items()}, self.last.clone()))
            return out

        def _record(self, weights):
            self.last = weights
            super()._record(weights)

    class Grads(TrainerCallback):
        def __init__(self):
            self.grads = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})

    args = TrainingArguments(
        output_dir=os.path.join(tmp, f"hf-{rank}"),
        per_device_train_batch_size=4,
        max_steps=1 if lm else STEPS,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    model = llama("eager") if lm else bert("eager")
    grads = Grads()
    trainer = Recording(
        model=model,
        args=args,
        train_dataset=text_dataset(24, 3 if lm else 1, lm),
        meta_loader=_hf_meta(rank, lm),
        lookahead_lr=HF_LOOKAHEAD_LR,
        reweight_kwargs={"seed": 0, **NET},
        callbacks=[grads],
    )
    trainer.train()
    return {
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "batches": trainer.batches,
        "grads": grads.grads,
        "model": _state(model),
        "net": _state(trainer.reweighter.net),
    }


# ---------------------------------------------------------------- Lightning


def _lightning_train(rank: int, tmp: str) -> dict[str, Any]:
    import lightning as L

    from reweight.integrations.lightning import MetaReweightCallback, reweight_step

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()
            self.batches = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            weights = reweight_step(self, x, y, logits)
            self.batches.append(((x.clone(), y.clone()), weights.clone()))
            return (weights * F.cross_entropy(logits, y, reduction="none")).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    module = Lit()
    callback = MetaReweightCallback(_mlp_meta(rank), seed=0, **NET)
    trainer = fit_lightning(module, callback, "ddp", tmp)
    return {
        "world_size": trainer.world_size,
        "batches": module.batches,
        "model": _state(module.net),
        "net": _state(callback.reweighter.net),
    }


def fit_lightning(module: Any, callback: Any, strategy: Any, tmp: str) -> Any:
    """Fit ``module`` for ``STEPS`` steps on ``WORLD`` CPU ranks under ``strategy`` with ``callback``, on the MLP's
    batches of 4 (this rank's view of a DistributedSampler), with nothing but the training loop enabled."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=os.path.join(tmp, "lightning"),
        callbacks=[callback],
    )
    x, y = _mlp_batch(24, 7)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    return trainer


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def _mlp_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _mlp_meta(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if rank is None:
        return [_cat(list(parts)) for parts in zip(*(_mlp_meta(r) for r in range(WORLD)))]
    return [_mlp_batch(5, 300 + 10 * k + rank) for k in range(2)]


# ---------------------------------------------------------------- timm


def _timm_model() -> nn.Module:
    import timm

    torch.manual_seed(0)
    # GroupNorm, no BN; float64: in float32 the convolutions' summation order differs with the batch size, and
    # the large meta learning rate turns that into differences of a few 1e-4 in the net after three steps
    return timm.create_model("test_efficientnet_gn", pretrained=False, num_classes=CLASSES).double()


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def _timm_meta(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if rank is None:
        return [_cat(list(parts)) for parts in zip(*(_timm_meta(r) for r in range(WORLD)))]
    return [_images(3, 700 + 10 * k + rank) for k in range(2)]


def _timm_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)


def _timm_train(rank: int, tmp: str) -> dict[str, Any]:
    from reweight.integrations.timm import ReweightClassificationTask

    model = _timm_model()
    task = ReweightClassificationTask(model, _timm_meta(rank), criterion_kwargs={}, seed=0, verbose=False, **NET)
    optimizer = _timm_optimizer(model)
    task.bind_optimizer(optimizer)
    task.prepare_distributed()  # train.py --distributed: the trainable module becomes DDP(model)
    batches = []
    for t in range(STEPS):
        x, y = _images(4, 10 * t + rank)
        task.train()
        out = task(x, y)
        batches.append(((x, y), task.last_weights.clone()))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    return {
        "wrapped": type(task.trainable_module).__name__,
        "reweighter_sees": type(task.reweighter.model).__name__,
        "batches": batches,
        "model": _state(model),
        "net": _state(task.reweighter.net),
    }


# ---------------------------------------------------------------- the two processes


def _worker(rank: int, port: int, out_dir: str) -> None:
    launcher_env(rank, WORLD, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        results = {}
        results["hf"] = _hf_train(rank, out_dir, lm=False)
        results["hf_lm"] = _hf_train(rank, out_dir, lm=True)
        results["timm"] = _timm_train(rank, out_dir)
        results["lightning"] = _lightning_train(rank, out_dir)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return spawn_ranks(_worker, (free_port(), tmp), tmp, WORLD, timeout_s=420)


def _single_process(model, optimizer, meta, loss_fn, steps, forward, **kw) -> MetaReweighter:
    """The core on the concatenated batches: ``steps`` is [(inputs, targets)] per step."""
    rw = MetaReweighter(model, optimizer, meta, seed=0, loss_fn=loss_fn, **NET, **kw)
    model.train()
    for inputs, targets in steps:
        outputs = forward(model, inputs)
        weights = rw.step(inputs, targets, outputs)
        loss = (weights * loss_fn(getattr(outputs, "logits", outputs), targets)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return rw


@pytest.mark.parametrize("name", ["hf", "timm", "lightning"])
def test_nets_bit_identical_across_ranks(ranks, name):
    for key, value in ranks[0][name]["net"].items():
        assert torch.equal(value, ranks[1][name]["net"][key]), key
    for key, value in ranks[0][name]["model"].items():
        assert torch.equal(value, ranks[1][name]["model"][key]), key
    # each rank saw its own data
    (first0, _), (first1, _) = ranks[0][name]["batches"][0], ranks[1][name]["batches"][0]
    a, b = (first0["input_ids"], first1["input_ids"]) if name == "hf" else (first0[0], first1[0])
    assert not torch.equal(a, b)


def test_hugging_face_trainer_matches_one_process_on_the_concatenated_batches(ranks):
    from reweight.integrations.transformers import per_sample_loss

    assert [r["hf"]["world_size"] for r in ranks] == [WORLD, WORLD]
    assert ranks[0]["hf"]["wrapped"] == "DistributedDataParallel"
    steps = []
    for t in range(STEPS):
        batch = _cat([r["hf"]["batches"][t][0] for r in ranks])
        steps.append((batch, batch.pop("labels")))
    model = bert("eager")
    loss_fn = per_sample_loss("sequence_classification")
    rw = _single_process(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        [(dict(b), b["labels"]) for b in _hf_meta(None)],
        loss_fn,
        steps,
        lambda m, inputs: m(**inputs),
        lookahead_lr=HF_LOOKAHEAD_LR,
    )
    _assert_states(ranks[0]["hf"]["model"], _state(model), "model")
    _assert_states(ranks[0]["hf"]["net"], _state(rw.net), "net")
    assert torch.cat([w for _, w in ranks[0]["hf"]["batches"]]).std() > 1e-3  # the weights are not trivial


def test_hugging_face_token_task_normalises_by_the_global_token_count(ranks):
    """Causal LM, unequal token counts per rank: the model gradient is that of sum_i w_i * token_sum_i over all
    ranks' sequences divided by all ranks' valid tokens (not the mean of each rank's own token mean)."""
    from reweight.losses import causal_lm_loss, shift_causal_labels

    batches = [r["hf_lm"]["batches"][0] for r in ranks]
    tokens = [int((shift_causal_labels(b["labels"]) != -100).sum()) for b, _ in batches]
    assert tokens[0] != tokens[1]  # the test would not tell the two normalisations apart otherwise
    model = llama("eager")
    total = 0.0
    for inputs, weights in batches:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        sums = causal_lm_loss(model(**inputs).logits, labels, reduction="sum")
        total = total + (weights * sums).sum()
    (total / sum(tokens)).backward()
    for rank in ranks:
        got = rank["hf_lm"]["grads"][0]
        for k, p in model.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_timm_distributed_task_matches_one_process_on_the_concatenated_batches(ranks):
    from timm.loss import create_classification_loss

    from reweight.integrations.timm import per_sample_criterion

    assert ranks[0]["timm"]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["timm"]["reweighter_sees"] == "DistributedDataParallel"
    steps = [_cat([r["timm"]["batches"][t][0] for r in ranks]) for t in range(STEPS)]
    model = _timm_model()
    rw = _single_process(
        model,
        _timm_optimizer(model),
        _timm_meta(None),
        per_sample_criterion(create_classification_loss()),
        steps,
        lambda m, x: m(x),
    )
    _assert_states(ranks[0]["timm"]["model"], _state(model), "model", rtol=1e-9)
    _assert_states(ranks[0]["timm"]["net"], _state(rw.net), "net", rtol=1e-9)


def test_lightning_ddp_matches_one_process_on_the_concatenated_batches(ranks):
    assert [r["lightning"]["world_size"] for r in ranks] == [WORLD, WORLD]
    steps = [_cat([r["lightning"]["batches"][t][0] for r in ranks]) for t in range(STEPS)]
    model = _mlp()
    rw = _single_process(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        _mlp_meta(None),
        lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
        steps,
        lambda m, x: m(x),
    )
    _assert_states(ranks[0]["lightning"]["model"], _state(model), "model")
    _assert_states(ranks[0]["lightning"]["net"], _state(rw.net), "net")
    weights = torch.cat([torch.cat([r["lightning"]["batches"][t][1] for r in ranks]) for t in range(STEPS)])
    assert weights.std() > 1e-3
