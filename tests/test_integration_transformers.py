"""ReweightTrainer: a real transformers.Trainer, tiny config-built models, offline, on the CPU."""

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

if not os.environ.get("CI"):  # CI installs the extra (".[test]") and must run these tests, never skip them
    pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainingArguments,
)

from reweight import LossNet  # noqa: E402
from reweight.integrations.transformers import REWEIGHTER_STATE_NAME, ReweightTrainer, per_sample_loss  # noqa: E402

VOCAB, CLASSES, LENGTH = 40, 3, 8


def bert(attn: str = "sdpa", seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = attn
    return BertForSequenceClassification(config)


def llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def text_dataset(n: int, seed: int, lm: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=g)
        mask = torch.ones(LENGTH, dtype=torch.long)
        if lm:
            cut = int(torch.randint(3, LENGTH + 1, (), generator=g))  # unequal token counts
            mask[cut:] = 0
            labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
            rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        else:
            rows.append(
                {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, CLASSES, (), generator=g)}
            )
    return rows


class Recorder(TrainerCallback):
    """Model gradients just before the optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None})


class RecordingTrainer(ReweightTrainer):
    """Keeps each training micro-batch and its weights."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []
        self.models_seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        self.models_seen.append(model)
        calls = self.reweighter.step_count if self.reweighter is not None else 0
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch, **kwargs)
        if self.reweighter is not None and self.reweighter.step_count > calls:
            self.batches.append(({k: v.clone() for k, v in inputs.items()}, self.last_weights.clone()))
        return out

    def _record(self, weights):
        self.last_weights = weights
        super()._record(weights)


def recorded(trainer) -> list[dict[str, torch.Tensor]]:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Recorder)).grads


def make_trainer(tmp_path, model, train, meta, *, cls=RecordingTrainer, batch=4, accumulation=1, steps=1, **kw):
    options = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "max_steps": steps,
        "learning_rate": 0.05,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": kw.pop("save_strategy", "no"),
        "save_steps": kw.pop("save_steps", 1),
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
    }
    args = TrainingArguments(**{**options, **kw.pop("args", {})})
    reweight_kwargs = kw.pop("reweight_kwargs", {"seed": 0})
    return cls(
        model=model,
        args=args,
        train_dataset=train,
        meta_dataset=meta,
        reweight_kwargs=reweight_kwargs,
        callbacks=[Recorder()],
        **kw,
    )


def hand_gradient(model, batches, loss_fn, total: int) -> dict[str, torch.Tensor]:
    """grad of sum over micro-batches of sum_i w_i * l_i, divided by the double batch size."""
    model = copy.deepcopy(model)
    model.zero_grad()
    for inputs, weights in batches:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        losses = loss_fn(model(**inputs).logits, labels)
        ((weights * losses).sum() / total).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_unit_weights_reproduce_the_models_own_loss():
    model = bert("eager")
    batch = {k: torch.stack([r[k] for r in text_dataset(6, 1)]) for k in ("input_ids", "attention_mask", "labels")}
    labels = batch.pop("labels")
    own = model(**batch, labels=labels).loss
    torch.testing.assert_close(per_sample_loss("sequence_classification")(model(**batch).logits, labels).mean(), own)

    lm = llama()
    rows = text_dataset(5, 2, lm=True)
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
    labels = batch.pop("labels")
    own = lm(**batch, labels=labels).loss
    torch.testing.assert_close(per_sample_loss("causal_lm")(lm(**batch).logits, labels).mean(), own)


def test_gradient_is_the_hand_computed_weighted_gradient_and_the_net_learns(tmp_path):
    model = bert("sdpa")
    net = LossNet(hidden=8, uniform_start=False)  # with no meta warm-up: the one step's weights are not all 1
    net_before = copy.deepcopy(net.state_dict())
    initial = copy.deepcopy(model)
    trainer = make_trainer(
        tmp_path,
        model,
        text_dataset(8, 1),
        text_dataset(6, 2),
        reweight_kwargs={"net": net, "seed": 0, "meta_warmup": 0},
    )
    trainer.train()
    assert len(trainer.batches) == 1
    weights, grads = trainer.batches[0][1], recorded(trainer)[0]
    assert not torch.allclose(weights, torch.ones_like(weights))
    want = hand_gradient(initial, trainer.batches, per_sample_loss("sequence_classification"), total=4)
    assert_grads_close(grads, want)
    assert any(not torch.equal(net_before[k], v) for k, v in trainer.reweighter.net.state_dict().items())
    logged = [log for log in trainer.state.log_history if "reweight/weight_std" in log]
    assert logged and logged[0]["reweight/weight_std"] > 0 and "reweight/meta_loss" in logged[0]


def test_gradient_accumulation_two_gives_the_gradient_of_one_double_batch(tmp_path):
    model = bert("eager")
    initial = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, model, text_dataset(8, 1), text_dataset(6, 2), batch=4, accumulation=2)
    trainer.train()
    assert len(trainer.batches) == 2  # two meta steps, one optimizer step
    grads = recorded(trainer)
    assert len(grads) == 1
    # the double batch's loss: mean over its 8 samples of w_i * l_i (Trainer's GA scaling, not twice that)
    want = hand_gradient(initial, trainer.batches, per_sample_loss("sequence_classification"), total=8)
    assert_grads_close(grads[0], want)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_causal_lm_with_sdpa_weights_token_sums_over_all_accumulated_tokens(tmp_path, accumulation):
    model = llama()
    initial = copy.deepcopy(model)
    train, meta = text_dataset(4, 3, lm=True), text_dataset(4, 4, lm=True)
    trainer = make_trainer(tmp_path, model, train, meta, batch=4 // accumulation, accumulation=accumulation)
    assert trainer.task == "causal_lm"
    trainer.train()
    assert len(trainer.batches) == accumulation
    tokens = sum(int((inputs["labels"][:, 1:] != -100).sum()) for inputs, _ in trainer.batches)
    sums = per_sample_loss("causal_lm", reduction="sum")
    # HF's own loss: sum of token losses over the valid tokens of all micro-batches (not a mean of means)
    assert_grads_close(recorded(trainer)[0], hand_gradient(initial, trainer.batches, sums, total=tokens))


@pytest.mark.parametrize("lookahead_lr", [None, 0.5])
def test_warmup_from_lr_zero_needs_a_lookahead_lr(tmp_path, lookahead_lr):
    args = {"lr_scheduler_type": "linear", "warmup_steps": 5}  # the first step's lr is 0
    meta = [dict(row, idx=torch.tensor(i)) for i, row in enumerate(text_dataset(6, 2))]  # an unused column
    trainer = make_trainer(
        tmp_path, bert("eager"), text_dataset(8, 1), meta, args=args, lookahead_lr=lookahead_lr,
        reweight_kwargs={"seed": 0, "net": "lossnet"},
    )  # LossNet: no penalty of its own, so a zero meta-gradient leaves its gradient zero
    assert set(next(iter(trainer.get_meta_dataloader()))) == {"input_ids", "attention_mask", "labels"}
    trainer.train()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.05 / 5)  # one warmup step of five taken
    net_grads = torch.cat([p.grad.flatten() for p in trainer.reweighter.net.parameters()])
    if lookahead_lr is None:  # zero look-ahead step: no meta-gradient reaches the net
        assert torch.count_nonzero(net_grads) == 0
    else:
        assert torch.count_nonzero(net_grads) > 0


def test_evaluation_runs_no_meta_step(tmp_path):
    model = bert("eager")
    eval_rows = text_dataset(6, 5)
    trainer = make_trainer(tmp_path, model, text_dataset(8, 1), text_dataset(6, 2), eval_dataset=eval_rows, batch=6)
    trainer.train()
    steps = trainer.reweighter.step_count
    net = copy.deepcopy(trainer.reweighter.net.state_dict())
    metrics = trainer.evaluate()
    assert trainer.reweighter.step_count == steps
    assert all(torch.equal(v, trainer.reweighter.net.state_dict()[k]) for k, v in net.items())
    batch = {k: torch.stack([r[k] for r in eval_rows]) for k in ("input_ids", "attention_mask", "labels")}
    labels = batch.pop("labels")
    with torch.no_grad():
        plain = model.eval()(**batch, labels=labels).loss
    assert metrics["eval_loss"] == pytest.approx(float(plain), rel=1e-5)


def test_reweighter_state_survives_checkpoint_and_resume(tmp_path):
    train, meta = text_dataset(16, 1), text_dataset(6, 2)
    full = make_trainer(tmp_path / "a", bert("eager"), train, meta, steps=3, save_strategy="steps")
    full.train()
    assert os.path.isfile(tmp_path / "a" / "checkpoint-1" / REWEIGHTER_STATE_NAME)

    resumed = make_trainer(tmp_path / "a", bert("eager", seed=5), train, meta, steps=3, save_strategy="steps")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.reweighter.step_count == full.reweighter.step_count == 3
    for k, v in full.reweighter.net.state_dict().items():
        torch.testing.assert_close(resumed.reweighter.net.state_dict()[k], v)
    assert resumed.reweighter.state_dict()["meta_stream"] == full.reweighter.state_dict()["meta_stream"]

    fresh = make_trainer(tmp_path / "b", bert("eager"), train, meta, steps=1, reweight_kwargs={"seed": 1})
    fresh.train()
    assert any(
        not torch.equal(fresh.reweighter.net.state_dict()[k], v) for k, v in full.reweighter.net.state_dict().items()
    )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # aot_eager: a compiled backward donating buffers
def test_compiled_model_forwards_through_the_wrapper_and_meta_steps_on_the_bare_module(tmp_path, backend):
    torch._dynamo.reset()
    model = bert("eager")
    initial = copy.deepcopy(model)
    compile_args = {"torch_compile": True, "torch_compile_backend": backend}
    trainer = make_trainer(tmp_path, model, text_dataset(8, 1), text_dataset(6, 2), args=compile_args)
    trainer.train()
    assert trainer.last_weights.shape == trainer.last_losses.shape == (4,)  # for a WeightRecorder
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in trainer.models_seen)
    assert trainer.reweighter.module is model  # the look-ahead runs on the bare module
    grads = recorded(trainer)[0]
    assert_grads_close(grads, hand_gradient(initial, trainer.batches, per_sample_loss("sequence_classification"), 4))


def test_missing_transformers_names_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import reweight.integrations.transformers\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "reweight[transformers]"' in out


def test_integrations_package_imports_no_framework():
    code = (
        "import sys, reweight, reweight.integrations; heavy = {'transformers', 'timm', 'lightning', 'torchvision'};"
        " print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_example_runs_offline():
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "hf_text_classification.py")
    args = [sys.executable, example, "--train-size", "64", "--meta-size", "12", "--epochs", "1"]
    out = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test accuracy" in out.stdout and "mean weight: clean samples" in out.stdout


def test_bad_arguments_are_refused(tmp_path):
    rows = text_dataset(4, 1)
    with pytest.raises(ValueError, match="exactly one"):
        make_trainer(tmp_path, bert("eager"), rows, None)
    with pytest.raises(ValueError, match="task"):
        make_trainer(tmp_path, bert("eager"), rows, rows, task="regression")
    with pytest.raises(TypeError, match="loss_fn"):
        make_trainer(tmp_path, bert("eager"), rows, rows, reweight_kwargs={"loss_fn": None})
    with pytest.raises(ValueError, match="labels"):
        make_trainer(tmp_path, bert("eager"), rows, rows).compute_loss(
            bert("eager"), {"input_ids": rows[0]["input_ids"]}
        )


def test_head_lookahead_works_from_the_first_step_and_equals_the_reverse_engine_on_the_head(tmp_path):
    train, meta = text_dataset(8, 1), text_dataset(6, 2)
    # a random start and no meta warm-up: the weights differ from 1 from the first step, so comparing the two
    # engines' weights compares their meta-gradients (from the default uniform start they would all be ~1)
    nonuniform = {"net": "lossnet", "net_kwargs": {"uniform_start": False}, "meta_warmup": 0}
    runs = {}
    for name, kwargs in {
        "head": {"lookahead": "head"},
        "reverse": {"lookahead": ["classifier.*"], "engine": "reverse"},
    }.items():
        trainer = make_trainer(
            tmp_path / name, bert("eager"), train, meta, steps=2, reweight_kwargs={"seed": 0, **nonuniform, **kwargs}
        )
        trainer.train()
        assert trainer.reweighter.step_count == 2
        runs[name] = trainer
    assert runs["head"].reweighter.engine_name == "linear_head"
    for (_, w_head), (_, w_rev) in zip(runs["head"].batches, runs["reverse"].batches):
        assert not torch.allclose(w_head, torch.ones_like(w_head))
        torch.testing.assert_close(w_head, w_rev, rtol=1e-4, atol=1e-6)


def test_reweighter_is_built_when_training_begins(tmp_path):
    seen = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(trainer.reweighter)

    trainer = make_trainer(tmp_path, bert("eager"), text_dataset(8, 1), text_dataset(6, 2))
    trainer.add_callback(Probe())
    assert trainer.reweighter is None
    trainer.train()
    assert seen == [trainer.reweighter] and seen[0].step_count == 1


def test_meta_batches_come_from_the_trainers_collator_with_its_column_filter(tmp_path):
    meta = [dict(row, idx=torch.tensor(i)) for i, row in enumerate(text_dataset(6, 2))]  # an unused column
    trainer = make_trainer(tmp_path, bert("eager"), text_dataset(8, 1), meta, meta_batch_size=3)
    batches = list(trainer.get_meta_dataloader())
    assert [set(b) for b in batches] == [{"input_ids", "attention_mask", "labels"}] * 2
    assert sorted(int(i) for b in batches for i in b["labels"]) == sorted(int(r["labels"]) for r in meta)


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_the_default_net_is_the_gated_net_on_class_labels_and_lossnet_on_tokens(tmp_path, task):
    """The Trainer's per-sample loss is not the library's cross-entropy: the first batch settles net="auto"."""
    model, lm = (bert("eager"), False) if task == "sequence_classification" else (llama(), True)
    rows = text_dataset(8, 1, lm=lm)
    trainer = make_trainer(tmp_path, model, rows, text_dataset(6, 2, lm=lm), reweight_kwargs={"seed": 0})
    trainer.train()
    settled = ("gated", "class") if task == "sequence_classification" else ("lossnet", "sum")
    assert (trainer.reweighter.options.net, trainer.reweighter.normalization) == settled


@pytest.mark.parametrize("net", ["metainfonet", "logitnet", "gated"])
def test_token_task_refuses_a_net_that_needs_class_logits(tmp_path, net):
    rows = text_dataset(4, 3, lm=True)
    with pytest.raises(ValueError, match="net='lossnet' or net='l2rw'"):
        make_trainer(tmp_path, llama(), rows, rows, reweight_kwargs={"net": net})


def test_model_returning_a_dict_trains_with_logits_fn(tmp_path):
    class Scores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = bert("eager")

        def forward(self, input_ids, attention_mask=None, labels=None):  # labels: kept by the column filter
            return {"scores": self.inner(input_ids=input_ids, attention_mask=attention_mask).logits}

    model = Scores()
    trainer = make_trainer(
        tmp_path,
        model,
        text_dataset(8, 1),
        text_dataset(6, 2),
        # a random start and no meta warm-up: the one step's weights depend on the scores (not all 1)
        reweight_kwargs={
            "seed": 0,
            "logits_fn": lambda out: out["scores"],
            "net": "lossnet",
            "net_kwargs": {"uniform_start": False},
            "meta_warmup": 0,
        },
    )
    trainer.train()
    assert trainer.reweighter.step_count == 1
    weights = trainer.batches[0][1]
    assert not torch.allclose(weights, torch.ones_like(weights))


def test_token_level_head_lookahead_equals_reverse_restricted_to_the_lm_head():
    from reweight import MetaReweighter

    loss = per_sample_loss("causal_lm")
    rows = text_dataset(12, 3, lm=True)
    batch = {k: torch.stack([r[k] for r in rows[:6]]) for k in rows[0]}
    meta = {k: torch.stack([r[k] for r in rows[6:]]) for k in rows[0]}
    meta_loader = [({"input_ids": meta["input_ids"], "attention_mask": meta["attention_mask"]}, meta["labels"])]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    weights = {}
    configs = {"head": {"lookahead": "head"}, "reverse": {"lookahead": ["lm_head.*"], "engine": "reverse"}}
    for name, kw in configs.items():
        model = llama("eager").double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        reweighter = MetaReweighter(model, opt, meta_loader, loss_fn=loss, seed=0, **kw)
        for step in range(2):
            outputs = model(**inputs)
            weights[name, step] = reweighter.step(inputs, batch["labels"], outputs)
            opt.zero_grad()
            (weights[name, step] * loss(outputs.logits, batch["labels"])).mean().backward()
            opt.step()
        assert reweighter.engine_name == ("linear_head" if name == "head" else "reverse")
    assert not torch.allclose(weights["head", 1], torch.ones(6, dtype=torch.float64))
    for step in range(2):
        torch.testing.assert_close(weights["head", step], weights["reverse", step], rtol=1e-9, atol=1e-12)


def test_compiled_trainer_with_head_lookahead_steps_from_the_first_batch(tmp_path):
    torch._dynamo.reset()
    compile_args = {"torch_compile": True, "torch_compile_backend": "aot_eager"}
    trainer = make_trainer(
        tmp_path, bert("eager"), text_dataset(8, 1), text_dataset(6, 2), args=compile_args, steps=2,
        reweight_kwargs={"seed": 0, "lookahead": "head"},
    )  # fmt: skip
    trainer.train()
    assert trainer.reweighter.engine_name == "linear_head" and trainer.reweighter.step_count == 2


def test_bf16_on_the_cpu_steps_under_autocast_with_finite_weights(tmp_path):
    """``bf16=True`` with ``use_cpu=True``: the Trainer's forward (and the meta step inside compute_loss) runs
    under bf16 autocast; the weights stay float32, finite and off uniform, and the model and net train."""
    model = bert("sdpa")
    dtypes = []
    # the classifier's output: accelerate casts the model's outputs back to float32
    model.classifier.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    net = LossNet(hidden=8, uniform_start=False)  # with no meta warm-up: the weights move from the first step
    net_before = copy.deepcopy(net.state_dict())
    trainer = make_trainer(
        tmp_path,
        model,
        text_dataset(12, 1),
        text_dataset(6, 2),
        steps=3,
        args={"bf16": True},
        reweight_kwargs={"net": net, "seed": 0, "meta_warmup": 0},
    )
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16" and dtypes and set(dtypes) == {torch.bfloat16}
    weights = torch.stack([w for _, w in trainer.batches])
    assert weights.shape == (3, 4) and weights.dtype == torch.float32
    assert torch.isfinite(weights).all() and weights.std() > 1e-4
    assert torch.isfinite(trainer.reweighter.last_meta_loss)
    assert all(torch.isfinite(g).all() for step in recorded(trainer) for g in step.values())
    after = trainer.reweighter.net.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(net_before[k], v) for k, v in after.items())


@pytest.mark.parametrize(
    ("reweight_kwargs", "steps", "accumulation", "warns"),
    [
        ({"seed": 0, "veto_warmup": 0}, 2, 1, True),  # 2 calls, fewer than the net's 300 warm-up steps, with the veto
        ({"seed": 0, "veto_warmup": 0, "meta_warmup": 4}, 2, 2, False),  # 4 calls: the warm-up is over at the end
        ({"seed": 0, "veto_warmup": 0, "meta_warmup": 4}, 2, 1, True),
        ({"seed": 0, "veto_warmup": 0, "veto": math.inf}, 2, 1, False),  # no veto: the net's weights (uniform start)
        ({"seed": 0}, 2, 1, False),  # by default the veto is held off while the net warms up
        ({"seed": 0, "veto_warmup": 2}, 2, 1, True),  # held off for less than the net's warm-up
    ],
)
def test_a_run_shorter_than_the_nets_warmup_is_warned_about(tmp_path, reweight_kwargs, steps, accumulation, warns):
    from reweight.monitor import ShortRunWarning

    rows = text_dataset(16, 0)
    trainer = make_trainer(
        tmp_path, bert("eager"), rows, rows, steps=steps, accumulation=accumulation, reweight_kwargs=reweight_kwargs
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    short = [w for w in caught if issubclass(w.category, ShortRunWarning)]
    assert len(short) == int(warns)
    if warns:
        assert f"the run has {steps * accumulation} reweighter steps" in str(short[0].message)
        assert "Leave veto_warmup at its default" in str(short[0].message) and "veto=math.inf" in str(short[0].message)
