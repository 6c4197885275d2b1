"""LoRA (peft) on a tiny random Llama: the refusal of a look-ahead on frozen parameters names a pattern that
works, and the partial look-ahead on the last block's adapters runs ghost exactly (equal to reverse)."""

import os

import pytest
import torch

if not os.environ.get("CI"):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from reweight import MetaReweighter  # noqa: E402
from reweight.integrations.transformers import per_sample_loss  # noqa: E402

VOCAB, LENGTH = 32, 8


def lora_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=LENGTH,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # LoRA's B starts at zero: make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.double()


def batch(n, seed):
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids}, ids


def reweighter(model, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    return MetaReweighter(model, opt, [batch(6, 1)], loss_fn=per_sample_loss("causal_lm"), seed=0, **kw), opt


def two_steps(rw, opt, forward, x, y) -> list[torch.Tensor]:
    """Two reweighted steps of ``forward`` on the batch ``(x, y)``; the weights of each."""
    weights = []
    for _ in range(2):
        out = forward(**x)
        w = rw.step(x, y, out)
        weights.append(w)
        opt.zero_grad()
        (w * per_sample_loss("causal_lm")(out.logits, y)).mean().backward()
        opt.step()
    return weights


def test_head_lookahead_under_lora_is_refused_naming_the_last_blocks_adapters():
    with pytest.raises(ValueError, match=r"lookahead=\[\"\*layers\.1\.\*lora\*\"\]"):
        reweighter(lora_llama(), lookahead="head")


def test_last_block_adapters_lookahead_is_ghost_and_equals_reverse():
    weights = {}
    for engine in ("auto", "reverse"):
        model = lora_llama()
        # the net at full meta lr from a random start, so that the weights move in two steps
        rw, opt = reweighter(
            model,
            lookahead=["*layers.1.*lora*"],
            engine=engine,
            meta_warmup=0,
            net="lossnet",
            net_kwargs={"uniform_start": False},
        )
        if engine == "auto":
            assert rw.engine_name == "ghost", rw.engine_reason
        for step, w in enumerate(two_steps(rw, opt, model, *batch(5, 2))):
            weights[engine, step] = w
    assert not torch.allclose(weights["auto", 1], torch.ones(5, dtype=torch.float64))
    for step in range(2):
        torch.testing.assert_close(weights["auto", step], weights["reverse", step], rtol=1e-8, atol=1e-10)


def test_compiled_lora_llama_steps_like_the_eager_one_in_one_graph():
    from torch._dynamo.utils import counters

    weights = {}
    for compiled in (False, True):
        torch.compiler.reset()
        counters.clear()
        model = lora_llama()
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        rw, opt = reweighter(forward, meta_warmup=0, net="lossnet", net_kwargs={"uniform_start": False})
        assert rw.engine_name == "ghost", rw.engine_reason
        for step, w in enumerate(two_steps(rw, opt, forward, *batch(5, 2))):
            weights[compiled, step] = w
        if compiled:  # the engine's own forward runs eagerly: no graph break, no recompilation
            assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    for step in range(2):
        torch.testing.assert_close(weights[True, step], weights[False, step], rtol=1e-8, atol=1e-10)
    torch.compiler.reset()


def test_a_peft_model_without_task_type_is_trained_as_the_causal_lm_it_wraps(tmp_path):
    """``get_peft_model`` without ``task_type`` returns a generic ``PeftModel``: the Trainer integration reads the
    task from the model it wraps, and trains it with the causal-LM loss (here with the loss history)."""
    from transformers import TrainingArguments

    from reweight.integrations.transformers import ReweightTrainer, _infer_task

    model = lora_llama().float()
    assert type(model).__name__ == "PeftModel" and _infer_task(model) == "causal_lm"
    rows = [{"input_ids": ids, "labels": ids.clone(), "sample_id": i} for i, ids in enumerate(batch(16, 2)[1])]
    meta = [{"input_ids": ids, "labels": ids.clone()} for ids in batch(8, 3)[1]]
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=8, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = ReweightTrainer(
        model=model, args=args, train_dataset=rows, meta_dataset=meta, reweight_kwargs={"loss_history": True, "seed": 0}
    )
    trainer.train()
    assert trainer.task == "causal_lm" and trainer.reweighter.step_count == 2
    assert bool(trainer.reweighter.state_dict()["loss_history"]["seen"].all())
