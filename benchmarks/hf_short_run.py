"""The veto in a short Hugging Face run: examples/hf_text_classification.py's task (a tiny random BERT, 3 classes,
40% flipped labels, 48 clean samples, 6 epochs of 16 steps, AdamW 3e-3), plain Trainer against ReweightTrainer
with the library's defaults (the veto held off over the net's warm-up), with the veto from the first step
(``veto_warmup=0``), reading the coefficients within each class (``veto_center=True``) and as they are
(``veto_center=False``), without the veto (``veto=math.inf``), waiting for evidence of label noise
(``veto_evidence=0.05``, the default on class labels; the cell says whether the evidence was shown) and not waiting
(``veto_evidence=0``), and with the look-ahead mirroring AdamW's step (``virtual_step="optimizer"``; the default is
a plain SGD step), per seed (the model's initialisation and the Trainer's seed). Offline.

Each cell is the accuracy on ``--on``: ``heldout``, 512 clean samples drawn apart from the training, meta and test
sets and never shown to the reweighter (what a default is chosen on), or ``test``, the example's test set.

    python benchmarks/hf_short_run.py --net lossnet gated --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import hf_text_classification as task  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging  # noqa: E402

from reweight.integrations.transformers import ReweightTrainer  # noqa: E402

# the configurations that set the veto run without the wait for competence, named (it was tried as the default)
CONFIGS = {
    "plain": None,
    "defaults": {},
    "veto from the first step": {"veto_warmup": 0, "veto_competence": 0},
    "veto within classes": {"veto_center": True, "veto_competence": 0},
    "veto as it is": {"veto_center": False, "veto_competence": 0},
    "no veto": {"veto": math.inf},
    "veto waiting for evidence": {"veto_evidence": 0.05, "veto_competence": 0},
    "veto not waiting for evidence": {"veto_evidence": 0},
    "adamw mirrored": {"virtual_step": "optimizer", "veto_competence": 0},
    "veto waiting for competence": {"veto_competence": 0.45},
    "veto not waiting for competence": {"veto_competence": 0},
    "vetoed share to the batch": {"veto_refill": 1, "veto_competence": 0},
    "vetoed share refilled up to 2x": {"veto_refill": 2, "veto_competence": 0},
    "vetoed share to the class": {"veto_refill": math.inf, "veto_competence": 0},
}


def accuracy(net: str, seed: int, options: dict | None, data, epochs: float = 6) -> str:
    """The cell: accuracy on the scored samples; with ``veto_evidence``, whether the evidence was shown."""
    train, meta, scored = data
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=32, num_train_epochs=epochs, learning_rate=3e-3,
            warmup_steps=10, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1000,
            disable_tqdm=True, seed=seed,
        )  # fmt: skip
        if options is None:
            trainer = Trainer(model=task.tiny_bert(seed), args=args, train_dataset=train)
        else:
            if net == "lossnet":  # normalised over the batch ("sum"): where the refill is refused, it changes nothing
                options = {k: v for k, v in options.items() if k != "veto_refill"}
            trainer = ReweightTrainer(
                model=task.tiny_bert(seed), args=args, train_dataset=train, meta_dataset=meta,
                reweight_kwargs={"net": net, "seed": seed, **options},
            )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the per-run summary: not part of the table
        trainer.train()
        cell = f"{task.evaluate_accuracy(trainer.model, scored):.3f}"
        evidence = getattr(trainer, "reweighter", None) and trainer.reweighter.noise_evidence
        return cell if not evidence else cell + (" (shown)" if bool(evidence.shown) else " (not shown)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", nargs="+", default=["lossnet", "gated"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=float, default=6, help="16 steps each (6: 96 steps)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG")
    p.add_argument("--on", choices=("heldout", "test"), default="test", help="the samples each cell is scored on")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    train, _ = task.make_text(512, 0.4, seed=0)
    meta, _ = task.make_text(48, 0.0, seed=1)
    scored, _ = task.make_text(512, 0.0, seed=2 if args.on == "test" else 3)
    data, plain = (train, meta, scored), {}  # plain training does not depend on the net: once per seed
    print("| net | seed | " + " | ".join(args.configs) + " |")
    print("| --- | --- |" + " --- |" * len(args.configs))
    for net in args.net:
        for seed in args.seeds:
            row = []
            for name in args.configs:
                if CONFIGS[name] is None and seed not in plain:
                    plain[seed] = accuracy(net, seed, None, data, args.epochs)
                options = CONFIGS[name]
                row.append(plain[seed] if options is None else accuracy(net, seed, options, data, args.epochs))
            print(f"| {net} | {seed} | " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
