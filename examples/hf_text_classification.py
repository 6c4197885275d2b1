"""Meta reweighting inside a Hugging Face Trainer: a tiny random BERT on synthetic noisy text, offline.

Each "sentence" is a bag of token ids; its class is the group of keyword tokens it contains most of.
A fraction of the training labels is flipped; a small clean meta set teaches the weighting net to
down-weight them. Nothing is downloaded: the model is built from a config.

    python examples/hf_text_classification.py --noise 0.4 --epochs 25 --baseline

25 epochs are 400 steps, past the weighting net's 300-step warm-up, over which the net learns from the meta set
and the meta-gradient's veto waits for it (docs/results.md, "The veto waits for the net"); a shorter run stays
close to plain training.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from reweight.integrations.transformers import ReweightTrainer  # noqa: E402

VOCAB, CLASSES, LENGTH, KEYWORDS = 64, 3, 12, 6


def make_text(n: int, noise: float, seed: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Sentences with class keywords among filler tokens; returns rows (noisy labels) and the clean mask."""
    g = torch.Generator().manual_seed(seed)
    rows, clean = [], []
    for _ in range(n):
        label = int(torch.randint(0, CLASSES, (), generator=g))
        ids = torch.randint(CLASSES * KEYWORDS + 1, VOCAB, (LENGTH,), generator=g)  # filler
        slots = torch.randperm(LENGTH, generator=g)[:4]
        ids[slots] = 1 + label * KEYWORDS + torch.randint(0, KEYWORDS, (4,), generator=g)
        shown = label
        if float(torch.rand((), generator=g)) < noise:
            shown = (label + int(torch.randint(1, CLASSES, (), generator=g))) % CLASSES
        clean.append(shown == label)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": shown})
    return rows, torch.tensor(clean)


def tiny_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
    )
    return BertForSequenceClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of flipped training labels")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--meta-size", type=int, default=48)
    parser.add_argument("--epochs", type=float, default=25, help="16 steps each at the default sizes")
    parser.add_argument("--net", default="lossnet", help="weighting net: lossnet, logitnet, metainfonet, l2rw")
    parser.add_argument("--baseline", action="store_true", help="also train a plain Trainer for comparison")
    args = parser.parse_args()

    train, clean = make_text(args.train_size, args.noise, seed=0)
    meta, _ = make_text(args.meta_size, 0.0, seed=1)
    test, _ = make_text(512, 0.0, seed=2)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=128,
            num_train_epochs=args.epochs,
            learning_rate=3e-3,
            warmup_steps=10,  # warmup starts at lr 0: the look-ahead uses its own lr (below)
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=20,
            disable_tqdm=True,
            seed=0,
        )
        trainer = ReweightTrainer(
            model=tiny_bert(0),
            args=training,
            train_dataset=train,
            eval_dataset=test,
            meta_dataset=meta,
            lookahead_lr=0.1,
            reweight_kwargs={"net": args.net, "seed": 0},
        )
        trainer.train()
        accuracy = evaluate_accuracy(trainer.model, test)
        print(f"reweighted ({args.net}): test accuracy {accuracy:.3f} with {args.noise:.0%} flipped labels")
        if trainer.reweighter is not None and trainer.reweighter.net is not None:
            weights = final_weights(trainer, train)
            print(f"mean weight: clean samples {weights[clean].mean():.3f}, flipped {weights[~clean].mean():.3f}")
        if args.baseline:
            plain = Trainer(model=tiny_bert(0), args=training, train_dataset=train)
            plain.train()
            print(f"plain Trainer: test accuracy {evaluate_accuracy(plain.model, test):.3f}")


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, rows: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.tensor([int(r["labels"]) for r in rows])
    return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def final_weights(trainer: ReweightTrainer, rows: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The weighting net's raw weights on the whole training set (before per-batch normalisation)."""
    model, reweighter = trainer.model.eval(), trainer.reweighter
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.tensor([int(r["labels"]) for r in rows])
    logits = model(input_ids=ids).logits
    losses = trainer.per_sample_loss(logits, labels)
    reweighter.net.eval()
    out = reweighter.net(losses, logits, labels)
    return getattr(out, "weights", out).reshape(-1)


if __name__ == "__main__":
    main()
