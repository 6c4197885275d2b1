"""The defaults matrix: do the library's defaults separate corrupted from clean samples, with no knob set?

Five tasks, each with 30-40% corrupted training samples and a small clean meta set, trained for ``--steps``
steps with no ``lookahead_lr`` and no other option:

- ``cls_sgd``: scikit-learn's digits, 40% uniform label noise, an MLP, SGD lr 0.1 momentum 0.9;
- ``cls_adamw``: the same with AdamW lr 1e-3;
- ``lora``: a tiny random Llama (transformers) with LoRA adapters on every projection, AdamW lr 1e-3, 40% of
  the sequences replaced by random tokens (clean: arithmetic progressions);
- ``vit``: the digits as 16x16 images, 40% uniform label noise, timm's ViT-Tiny made smaller (``pretrained=False``,
  depth 4, width 96, patch 4, one channel), AdamW lr 1e-3;
- ``reg``: scikit-learn's ``make_regression``, 30% of the targets shifted by N(0, 5^2), per-sample MSE, SGD
  lr 0.01 momentum 0.9.

For LossNet, MetaInfoNet (classification) and L2RW, each row holds the AUROC of the returned weights as a
score for clean samples (pooled over the last 50 steps, and per window of steps: ``traj``), the mean weight
of clean and corrupted samples, and the test metric against plain training. ``--config earlier`` runs the
earlier defaults for comparison (Adam with coupled weight decay, the nets' random start, no meta-lr
warm-up, no floor on the effective sample size; the coefficients' scaling is part of the update and stays).

    python benchmarks/defaults_matrix.py --seeds 0 1 2            # run (resumes), then print the table
    python benchmarks/defaults_matrix.py --report                 # the table of the stored rows
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _store  # noqa: E402

from reweight import MetaReweighter  # noqa: E402
from reweight.diagnostics import weight_auroc  # noqa: E402
from reweight.nets import HISTORY_NETS  # noqa: E402
from reweight.options import VETO  # noqa: E402
from reweight.virtual_step import ADAPTIVE  # noqa: E402

TABLE = Path(__file__).resolve().parent / "results" / "defaults_matrix.jsonl"
# The configurations that set a veto on top of the library's defaults do not wait for the model's competence on the
# meta set (veto_competence 0, named: the defaults' while it was tried as the default), as their rows ran.
CONFIGS = {
    "defaults": {},
    "earlier": {
        "meta_optimizer": functools.partial(torch.optim.Adam, lr=1e-3, weight_decay=5e-4),
        "meta_warmup": 0,
        "uniform_start": False,
        "min_ess": 0.0,
        "normalization": "sum",  # the default before the nets that read the logits were normalised within classes
        "veto": math.inf,
    },
    # the defaults before the veto with a 3e-3 meta lr (the screen against the falls under uniform noise)
    "meta3": {"meta_optimizer": functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=5e-4), "veto": math.inf},
    # the defaults before the veto with each sample's loss history (loss_history=True, the batches' indices as
    # sample_ids), for the nets that read the loss
    "history": {"loss_history": True, "veto": math.inf},
    # L2RW with the floor it has within classes (0.4) on every task, also under "sum" (LoRA, regression)
    "l2rw-floor40": {},
    # the defaults with the meta-gradient's veto at the batch's mean |c| (the nets; L2RW's rule is a veto at 0)
    "veto10": {
        "veto": 1.0, "veto_warmup": 0, "min_ess_until_evidence": 0, "veto_competence": 0, "veto_refill": math.inf
    },
    # the defaults with the veto reading the coefficients at the net's warm-up factor over its 300 steps
    "veto-warmup": {
        "veto_warmup": 300, "veto_center": False, "min_ess_until_evidence": 0, "veto_competence": 0,
        "veto_refill": math.inf,
    },
    # the defaults with the veto reading each coefficient against its class's (batch's) weighted mean (run when
    # veto_center=True meant the batch's mean under "sum" on class labels too, commits 8503372 to dd35f17)
    "veto-center": {
        "veto_center": True, "veto_warmup": 0, "min_ess_until_evidence": 0, "veto_competence": 0,
        "veto_refill": math.inf,
    },
    # the gated net with the workarounds the vit task's probes pointed to: the weights normalised over the batch
    # (the veto kept), or no veto (the class normalisation kept)
    "sum": {"normalization": "sum", "veto_competence": 0},
    "noveto": {"veto": math.inf},
    # the defaults with virtual_step="optimizer" for the tasks trained with Adam / AdamW: the look-ahead mirrors
    # their step (the plain SGD step, the default, for the tasks trained with SGD)
    "mirror": {"virtual_step": "optimizer", "veto_competence": 0, "veto_refill": math.inf},
    # the defaults with the veto waiting, latched, for the model's chance-corrected accuracy on the meta batches
    # (a moving average) to reach 0.45 as well as for the evidence (veto_competence; L2RW has no veto)
    "competence": {"veto_competence": 0.45, "veto_refill": math.inf},
    # the defaults with a vetoed sample's share of the loss spread over the whole batch under normalization="class"
    # instead of its class's kept samples (veto_refill=1, first named veto_share="batch"), or with the class's kept
    # samples scaled up by at most 2 for it and the batch taking the rest (veto_refill=2; the nets that read the logits)
    "share": {"veto_refill": 1.0, "veto_competence": 0},
    "refill2": {"veto_refill": 2.0, "veto_competence": 0},
    # a placebo: plain training with each sample's loss weighted by 1 + 0.01 z, z standard normal drawn apart from
    # everything else (seed + 1000): how far a run moves under a perturbation that carries no information
    "placebo": {},
}
JITTER = 0.01
SIGNAL = "(sum c_i w_i + penalty) / sum |c_i|"  # the net's surrogate (reweight.net_slot.NetSlot.update)
SPELLED = {  # the key's description of each configuration (no key whose meaning can change)
    "defaults": {
        "meta_optimizer": "AdamW(1e-3, wd 5e-4)",
        "meta_warmup": 300,
        "uniform_start": True,
        "meta_signal": SIGNAL,
        "min_ess": "0.2 (0.4 for l2rw within classes)",
        "normalization": "class for the nets that read the logits (metainfonet, gated) and for l2rw, else sum",
    },
    "meta3": {
        "meta_optimizer": "AdamW(3e-3, wd 5e-4)",
        "meta_warmup": 300,
        "uniform_start": True,
        "meta_signal": SIGNAL,
        "min_ess": 0.2,
        "normalization": "class for the nets that read the logits (metainfonet, gated), else sum",
    },
    "earlier": {
        "meta_optimizer": "Adam(1e-3, wd 5e-4, coupled)",
        "meta_warmup": 0,
        "uniform_start": False,
        "meta_signal": SIGNAL,
    },
}


BEFORE_VETO = dict(SPELLED["defaults"])  # the defaults' rows before the veto became one of them
if math.isfinite(VETO):
    SPELLED["defaults"]["veto"] = f"{VETO:g} for the nets (none for l2rw, whose rule it is at 0)"
BEFORE_CENTER = dict(SPELLED["defaults"])  # the defaults' rows before the veto read the coefficients within classes
SPELLED["defaults"]["veto_center"] = "within each class under normalization=class (the nets that read the logits)"
BEFORE_WARMUP = dict(SPELLED["defaults"])  # the defaults' rows before the veto waited for the net's warm-up
SPELLED["defaults"]["veto_warmup"] = "the net's meta_warmup (300) while the veto acts"
BEFORE_EVIDENCE = dict(SPELLED["defaults"])  # the defaults' rows before the veto waited for evidence of label noise
SPELLED["defaults"]["veto_evidence"] = "0.05 under normalization=class (the nets that read the logits), else 0"
BEFORE_LOSSNET_EVIDENCE = dict(SPELLED["defaults"])  # the defaults' rows before LossNet's veto waited for it too
SPELLED["defaults"]["veto_evidence"] = "0.05 on class labels (every net with a veto), else 0"
BEFORE_QUIET = dict(SPELLED["defaults"])  # the defaults' rows before min_ess_until_evidence became one of them
SPELLED["defaults"]["min_ess_until_evidence"] = "0.8 while the veto waits under normalization=class, else 0"
SPELLED["history"] = {**BEFORE_VETO, "loss_history": True}
SPELLED["l2rw-floor40"] = {"min_ess": 0.4, "normalization": "class on class labels, else sum"}
SPELLED["veto10"] = {**BEFORE_CENTER, "veto": 1.0}
SPELLED["veto-warmup"] = {**BEFORE_CENTER, "veto_warmup": 300}
SPELLED["veto-center"] = {**BEFORE_CENTER, "veto_center": "c_i less its class's (class) or batch's (sum) mean"}
SPELLED["sum"] = {**SPELLED["defaults"], "normalization": "sum"}
SPELLED["noveto"] = {**SPELLED["defaults"], "veto": "none"}
# the defaults with the look-ahead mirroring Adam / AdamW (the key of the rows made while it was the candidate default)
SPELLED["mirror"] = {
    **SPELLED["defaults"],
    "virtual_step": "Adam / AdamW's step mirrored (each coordinate over its second moment), else SGD",
}
BEFORE_COMPETENCE = dict(SPELLED["defaults"])  # the defaults (the veto does not wait for competence)
SPELLED["competence"] = {**BEFORE_COMPETENCE, "veto_competence": 0.45}
SPELLED["share"] = {**BEFORE_COMPETENCE, "veto_share": "batch (under normalization=class)"}
SPELLED["refill2"] = {**BEFORE_COMPETENCE, "veto_refill": "2 (under normalization=class)"}
SPELLED["placebo"] = {"weights": f"1 + {JITTER:g} z, z ~ N(0, 1) from seed + 1000"}
# L2RW has no net and runs the library's defaults in every configuration, except that those measured before its
# default normalisation became "class" under cross-entropy keep the "sum" they ran with (their keys say so)
L2RW_OPTIONS = {
    "earlier": {"normalization": "sum"},
    "meta3": {"normalization": "sum"},
    "l2rw-floor40": {"min_ess": 0.4},
    "mirror": {"virtual_step": "optimizer"},
}


def _batches(n, bs, steps, seed):
    rng = np.random.default_rng(1000 + seed)
    out, perm = [], np.array([], dtype=np.int64)
    while len(out) < steps:
        if len(perm) < bs:
            perm = np.concatenate([perm, rng.permutation(n)])
        out.append(perm[:bs])
        perm = perm[bs:]
    return out


@functools.cache
def digits_data(seed):
    from reweight.data import load_digits, meta_split, uniform_noise

    d = load_digits(seed=seed)
    split = meta_split(d.y_train, 10, num_classes=10, seed=seed)
    xtr, ytr = d.x_train[split.train], d.y_train[split.train]
    noisy = uniform_noise(ytr, 0.4, num_classes=10, seed=seed)
    return dict(
        x=torch.tensor(xtr),
        y=torch.tensor(noisy.labels),
        corrupted=torch.tensor(noisy.corrupted),
        mx=torch.tensor(d.x_train[split.meta]),
        my=torch.tensor(d.y_train[split.meta]),
        tx=torch.tensor(d.x_test),
        ty=torch.tensor(d.y_test),
    )


def per_sample_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def per_sample_mse(out, y):
    return (out.squeeze(-1) - y).pow(2)


def _digits_classification(d: dict, model: nn.Module, opt: torch.optim.Optimizer, view=None) -> dict:
    """A classification task on the digits' splits ``d``: meta batches of 100, test accuracy; ``view`` maps the
    digits' 64 pixels to the model's input (default: as they are)."""
    view = view or (lambda x: x)
    meta = [(view(d["mx"][i : i + 100]), d["my"][i : i + 100]) for i in range(0, len(d["my"]), 100)]

    def fwd(idx):
        x, y = view(d["x"][idx]), d["y"][idx]
        return x, y, model(x), d["corrupted"][idx]

    @torch.no_grad()
    def scores():
        return (model(view(d["tx"])).argmax(1) == d["ty"]).float()

    return dict(
        model=model,
        opt=opt,
        meta=meta,
        fwd=fwd,
        scores=scores,
        n=len(d["y"]),
        bs=64,
        loss_fn=per_sample_ce,
        num_classes=10,
        metric="acc",
        kw={},
    )


def task_cls(opt_kind):
    def setup(seed):
        d = digits_data(seed)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        if opt_kind == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return _digits_classification(d, model, opt)

    return setup


VIT_DEPTH, VIT_WIDTH = 4, 96  # ViT-Tiny's layout at a third of its depth and half its width (CPU time)


def task_vit(seed):
    import timm  # the timm extra

    d = digits_data(seed)
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        depth=VIT_DEPTH,
        embed_dim=VIT_WIDTH,
        num_heads=3,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def images(x: torch.Tensor) -> torch.Tensor:  # the digits' 8x8 pixels (in [0, 1]) as 16x16 images
        return F.interpolate(x.view(-1, 1, 8, 8), scale_factor=2, mode="nearest")

    return _digits_classification(d, model, opt, images)


@functools.cache
def reg_data(seed):
    from sklearn.datasets import make_regression  # scikit-learn: the benchmarks' extra

    x, y = make_regression(n_samples=1700, n_features=10, n_informative=8, noise=5.0, random_state=seed)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    te, me, tr = perm[:400], perm[400:500], perm[500:]
    ytr = y[tr].copy()
    corrupted = rng.random(len(tr)) < 0.3
    ytr[corrupted] += rng.normal(0, 5.0, corrupted.sum())
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return dict(
        x=f(x[tr]), y=f(ytr), corrupted=torch.tensor(corrupted), mx=f(x[me]), my=f(y[me]), tx=f(x[te]), ty=f(y[te])
    )


def task_reg(seed):
    d = reg_data(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    meta = [(d["mx"][i : i + 50], d["my"][i : i + 50]) for i in range(0, 100, 50)]

    def fwd(idx):
        x, y = d["x"][idx], d["y"][idx]
        return x, y, model(x), d["corrupted"][idx]

    @torch.no_grad()
    def scores():
        return per_sample_mse(model(d["tx"]), d["ty"])

    return dict(
        model=model,
        opt=opt,
        meta=meta,
        fwd=fwd,
        scores=scores,
        n=len(d["y"]),
        bs=64,
        loss_fn=per_sample_mse,
        num_classes=1,
        metric="mse",
        kw={},
    )


V, T = 64, 24


@functools.cache
def lm_data(seed):
    g = torch.Generator().manual_seed(seed)

    def clean(n):  # arithmetic progressions mod V: start s, stride d in 1..3
        s = torch.randint(0, V, (n, 1), generator=g)
        st = torch.randint(1, 4, (n, 1), generator=g)
        return (s + st * torch.arange(T)) % V

    n = 1200
    x = clean(n)
    corrupted = torch.rand(n, generator=g) < 0.4
    x[corrupted] = torch.randint(0, V, (int(corrupted.sum()), T), generator=g)
    return dict(x=x, corrupted=corrupted, mx=clean(64), tx=clean(256))


def per_seq_lm(logits, ids):
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


class LoRALinear(nn.Module):
    """peft-style LoRA (r=8, alpha=16, B zero-initialised) around a frozen nn.Linear (no peft needed)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: int = 16) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def task_lora(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    d = lm_data(seed)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(mod, child_name, LoRALinear(child))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    meta = [({"input_ids": d["mx"][i : i + 32]}, d["mx"][i : i + 32]) for i in range(0, 64, 32)]

    def fwd(idx):
        x = d["x"][idx]
        return {"input_ids": x}, x, model(input_ids=x), d["corrupted"][idx]

    @torch.no_grad()
    def scores():
        return per_seq_lm(model(input_ids=d["tx"]).logits, d["tx"])

    return dict(
        model=model,
        opt=opt,
        meta=meta,
        fwd=fwd,
        scores=scores,
        n=len(d["x"]),
        bs=16,
        loss_fn=per_seq_lm,
        num_classes=1,
        metric="clean_loss",
        kw=dict(logits_fn=lambda out: out.logits),
    )


TASKS = {
    "cls_sgd": task_cls("sgd"),
    "cls_adamw": task_cls("adamw"),
    "vit": task_vit,
    "lora": task_lora,
    "reg": task_reg,
}
NETS_FOR = {
    "cls_sgd": ["lossnet", "metainfonet", "gated", "l2rw"],
    "cls_adamw": ["lossnet", "metainfonet", "gated", "l2rw"],
    "vit": ["lossnet", "metainfonet", "gated", "l2rw"],
    "lora": ["lossnet", "l2rw"],
    "reg": ["lossnet", "l2rw"],
}


def nets_for(task: str, config: str) -> list[str]:
    """The nets a configuration runs on ``task`` (``"history"``: the nets that read the loss; ``"l2rw-floor40"``:
    L2RW; ``"veto10"``, ``"veto-warmup"`` and ``"veto-center"``: the nets, not L2RW; ``"sum"`` and ``"noveto"``:
    the gated net; ``"competence"``: the nets on the tasks with class labels; ``"share"``, ``"refill2"``: the nets
    that read the logits)."""
    if config == "l2rw-floor40":
        return ["l2rw"]
    if config in ("veto10", "veto-warmup", "veto-center"):
        return [n for n in NETS_FOR[task] if n != "l2rw"]
    if config in ("sum", "noveto"):
        return ["gated"]
    if config == "placebo":
        return ["jitter"]
    if config in ("share", "refill2"):  # only under normalization="class": the nets that read the logits
        return [n for n in NETS_FOR[task] if n in ("metainfonet", "gated")]
    if config == "competence":  # the wait reads the meta set's accuracy: class labels, the nets with a veto
        return [] if task in ("lora", "reg") else [n for n in NETS_FOR[task] if n != "l2rw"]
    return [n for n in NETS_FOR[task] if config != "history" or n in HISTORY_NETS]


# ----------------------------------------------------------------------------- one run


def _auroc(w: torch.Tensor, corrupted: torch.Tensor) -> float:
    if corrupted.all() or not corrupted.any():
        return float("nan")
    return float(weight_auroc(w.numpy(), corrupted.numpy()))


def run(task: str, net: str, config: str, seed: int, steps: int) -> dict:
    """One training run; the result row's ``result``."""
    torch.set_num_threads(1)
    s = TASKS[task](seed)
    model, opt = s["model"], s["opt"]
    rw = None
    jitter = torch.Generator().manual_seed(seed + 1000) if net == "jitter" else None
    if net not in ("plain", "jitter"):
        options = dict(CONFIGS[config])
        uniform = options.pop("uniform_start", True)
        net_kwargs = None if net == "l2rw" else {"uniform_start": uniform}
        if net == "l2rw":
            options = dict(L2RW_OPTIONS.get(config, {}))
        if options.get("virtual_step") == "optimizer" and not isinstance(opt, ADAPTIVE):
            options["virtual_step"] = "sgd"  # "mirror": Adam's step mirrored, SGD's plain step as by default
        rw = MetaReweighter(
            model, opt, s["meta"], net=net, net_kwargs=net_kwargs, seed=seed, loss_fn=s["loss_fn"], **s["kw"], **options
        )
    ws, cs = [], []
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for idx in _batches(s["n"], s["bs"], steps, seed):
            model.train()
            inputs, y, out, corrupted = s["fwd"](torch.as_tensor(idx))
            logits = out.logits if hasattr(out, "logits") else out
            losses = s["loss_fn"](logits, y)
            if rw is not None:
                ids = torch.as_tensor(idx) if rw.options.loss_history else None  # the samples' indices
                w = rw.step(inputs, y, out, sample_ids=ids)
                ws.append(w.float())
                cs.append(corrupted)
                loss = (w * losses).mean()
            elif jitter is not None:
                loss = ((1 + JITTER * torch.randn(losses.shape, generator=jitter)) * losses).mean()
            else:
                loss = losses.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    res = {**_test_metrics(s["scores"](), seed), "metric": s["metric"], "seconds": round(time.time() - start, 1)}
    if rw is None:
        return res
    edges = sorted({e for e in [0, 10, 50, *range(100, steps + 1, 50)] if e <= steps} | {steps})
    windows = list(zip(edges[:-1], edges[1:]))
    last = max(0, steps - 50)
    w, c = torch.cat(ws[last:]), torch.cat(cs[last:])
    res.update(
        engine=rw.engine_name,
        warnings=sorted({type(x.message).__name__ for x in caught if "Reweight" in type(x.message).__module__}),
        windows=edges,
        traj=[round(_auroc(torch.cat(ws[a:b]), torch.cat(cs[a:b])), 3) for a, b in windows],
        traj_ratio=[round(_ratio(torch.cat(ws[a:b]), torch.cat(cs[a:b])), 3) for a, b in windows],
        auroc=round(_auroc(w, c), 3),
        w_clean=round(w[~c].mean().item(), 3),
        w_corrupted=round(w[c].mean().item(), 3),
    )
    return res


def _test_metrics(scores: torch.Tensor, seed: int) -> dict:
    """The test metric over the test split (``test``) and over its two halves, drawn by ``seed``: ``held``, on
    which configurations are chosen, and ``rest``, which no choice reads."""
    half = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))[: len(scores) // 2]
    held = torch.zeros(len(scores), dtype=torch.bool)
    held[half] = True
    return {"test": scores.mean().item(), "held": scores[held].mean().item(), "rest": scores[~held].mean().item()}


def _ratio(weights: torch.Tensor, corrupted: torch.Tensor) -> float:
    """The corrupted samples' mean weight over the clean samples' (above 1: the weights favour the corrupted)."""
    return (weights[corrupted].mean() / weights[~corrupted].mean()).item()


def report(table: Path = TABLE, config: str = "defaults", steps: int = 300, options: dict | None = None) -> str:
    """Markdown: per task and net, every seed's final AUROC, the lowest windowed AUROC, the mean weights
    and the test metric against plain training, for the runs of ``steps`` steps of ``config`` with ``options``
    (default: what ``config`` spells now; :data:`BEFORE_VETO`: the defaults' rows before the veto)."""
    spelled = SPELLED[config] if options is None else options
    rows = [
        r
        for r in _store.latest(table)
        if r["key"]["steps"] == steps
        and (r["key"]["config"] == "plain" or (r["key"]["config"] == config and r["key"].get("options") == spelled))
    ]
    seeds = {(r["key"]["task"], r["key"]["seed"]) for r in rows if r["key"]["config"] != "plain"}
    rows = [r for r in rows if (r["key"]["task"], r["key"]["seed"]) in seeds]  # plain training on the same seeds
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["key"]["task"], r["key"]["net"]), []).append(r)
    lines = [
        f"Configuration `{config}`, {steps} steps; AUROC of the weights (clean above corrupted), last 50 steps, "
        "per seed; lowest: the lowest over windows of steps and seeds; most inverted: the largest ratio of the "
        "corrupted samples' mean weight to the clean samples' over windows and seeds (above 1: the weights favour the "
        "corrupted), with its window; gain: the test metric's gain over plain training of the same seed (accuracy in "
        "points, losses lower is better), mean ± standard error, and the seeds below plain training.",
        "",
        "| task | net | AUROC per seed | lowest | most inverted | weight clean / corrupted | test (plain) | gain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in TASKS:
        plain = sorted(cells.get((task, "plain"), []), key=lambda r: r["key"]["seed"])
        plain_test = " ".join(f"{r['result']['test']:.3f}" for r in plain)
        for net in nets_for(task, config):
            rs = sorted(cells.get((task, net), []), key=lambda r: r["key"]["seed"])
            if not rs:
                continue
            res = [r["result"] for r in rs]
            lowest = min(v for x in res for v in x["traj"] if not math.isnan(v))
            weights = f"{np.mean([x['w_clean'] for x in res]):.2f} / {np.mean([x['w_corrupted'] for x in res]):.2f}"
            tests = " ".join(f"{x['test']:.3f}" for x in res)
            aurocs = " ".join(f"{x['auroc']:.2f}" for x in res)
            inverted = _most_inverted(res)
            gain = _gain(res, {r["key"]["seed"]: r["result"]["test"] for r in plain}, [r["key"]["seed"] for r in rs])
            cells_text = f"{aurocs} | {lowest:.2f} | {inverted} | {weights} | {tests} ({plain_test}) | {gain}"
            lines.append(f"| {task} | {net} | {cells_text} |")
    lines.append("")
    lines.append(_store.provenance_note(rows))
    return "\n".join(lines)


def compare(table: Path, steps: int, before: dict, after: dict, metric: str = "held") -> str:
    """Markdown: per task and net run with the options ``before`` and ``after`` (as the keys spell them, whatever
    the configuration's name) on the same seeds, ``metric``'s gain over plain training under each (mean ± standard
    error, read as :func:`_units` says, and the seeds whose gap counts), the paired difference after - before,
    and the range of the weights' AUROC (last 50 steps) under each."""
    found: dict[tuple, dict] = {}
    for r in _store.latest(table):
        k = r["key"]
        if k["steps"] != steps or metric not in r["result"]:
            continue
        side = "plain" if k["config"] == "plain" else {_line(before): "before", _line(after): "after"}.get(
            _line(k.get("options", {}))
        )
        if side is not None:
            found[(k["task"], k["net"], side, k["seed"])] = r
    lines = [
        f"{steps} steps, scored on `{metric}`; gain: over plain training of the same seed, mean ± standard error, "
        "(seeds more than 3 points, or 0.05 in loss, below plain training); after - before: paired by seed.",
        "",
        "| task | net | seeds | gain before | gain after | after - before | AUROC before | AUROC after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    used = []
    for task in TASKS:
        for net in NETS_FOR[task]:
            seeds = sorted(s for (t, n, side, s) in found if (t, n, side) == (task, net, "after"))
            seeds = [s for s in seeds if (task, net, "before", s) in found and (task, "plain", "plain", s) in found]
            if not seeds:
                continue
            used += [found[(task, n, side, s)] for s in seeds for n, side in ((net, "before"), (net, "after"))]
            used += [found[(task, "plain", "plain", s)] for s in seeds]
            res = {side: [found[(task, net, side, s)]["result"] for s in seeds] for side in ("before", "after")}
            plain = [found[(task, "plain", "plain", s)]["result"] for s in seeds]
            sign, cut, digits = _units(res["after"][0]["metric"])
            gains = {side: [sign * (x[metric] - p[metric]) for x, p in zip(res[side], plain)] for side in res}
            cells = [f"{_mean_se(g, digits)} ({sum(v < -cut for v in g)} below)" for g in gains.values()]
            cells.append(_mean_se([a - b for a, b in zip(gains["after"], gains["before"])], digits))
            aurocs = {side: [x["auroc"] for x in res[side]] for side in res}
            cells += [f"{min(a):.2f} to {max(a):.2f}" for a in aurocs.values()]
            lines.append(f"| {task} | {net} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(_store.provenance_note({id(r): r for r in used}.values()))
    return "\n".join(lines)


def placebo_spread(table: Path, steps: int, metric: str = "held") -> str:
    """Markdown: per task, how far the placebo (``--config placebo``) ends from plain training of the same seed on
    ``metric``: mean ± standard error, the standard deviation of a pair, the largest gap either way, and the
    seeds more than 3 points (0.05 in loss) apart."""
    found: dict[tuple, dict] = {}
    for r in _store.latest(table):
        k = r["key"]
        if k["steps"] == steps and k["config"] in ("plain", "placebo") and metric in r["result"]:
            found[(k["task"], k["config"], k["seed"])] = r
    lines = [
        f"{steps} steps, scored on `{metric}`: the placebo less plain training of the same seed.",
        "",
        "| task | seeds | placebo - plain | sd of a pair | largest gaps | seeds more than 3 apart |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    used = []
    for task in TASKS:
        seeds = sorted(s for (t, c, s) in found if (t, c) == (task, "placebo") and (task, "plain", s) in found)
        if not seeds:
            continue
        pairs = [(found[(task, "placebo", s)], found[(task, "plain", s)]) for s in seeds]
        used += [r for pair in pairs for r in pair]
        sign, cut, digits = _units(pairs[0][1]["result"]["metric"])
        gaps = [sign * (a["result"][metric] - b["result"][metric]) for a, b in pairs]
        sd = np.std(gaps, ddof=1) if len(gaps) > 1 else float("nan")
        lines.append(
            f"| {task} | {len(seeds)} | {_mean_se(gaps, digits)} | {sd:.{digits}f} | {min(gaps):+.{digits}f}, "
            f"{max(gaps):+.{digits}f} | {sum(abs(g) > cut for g in gaps)} |"
        )
    lines.append("")
    lines.append(_store.provenance_note(used))
    return "\n".join(lines)


def _line(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def _units(metric: str) -> tuple[int, float, int]:
    """How a metric's difference from plain training is read: its sign and scale (accuracy in points, higher
    better; a loss as plain training's minus the net's), the gap that counts for a seed (3 points, 0.05 in loss),
    and the digits shown."""
    return (100, 3, 1) if metric == "acc" else (-1, 0.05, 3)


def _mean_se(values: list[float], digits: int) -> str:
    se = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{np.mean(values):+.{digits}f} ± {se:.{digits}f}"


def _gain(results: list[dict], plain: dict[int, float], seeds: list[int]) -> str:
    """The test metric's gain over plain training of the same seeds: mean ± standard error (accuracy in points;
    for losses plain training's minus the net's) and how many seeds end below plain training."""
    if not results:
        return "-"
    sign, _, digits = _units(results[0]["metric"])
    gains = [sign * (x["test"] - plain[seed]) for x, seed in zip(results, seeds) if seed in plain]
    if not gains:
        return "-"
    return f"{_mean_se(gains, digits)} ({sum(g < 0 for g in gains)} of {len(gains)} below)"


def _most_inverted(results: list[dict]) -> str:
    """The largest corrupted / clean mean-weight ratio over windows and seeds, and its window's steps."""
    if not all("traj_ratio" in x for x in results):
        return "-"
    ratio, a, b = max(
        (r, a, b) for x in results for r, a, b in zip(x["traj_ratio"], x["windows"], x["windows"][1:]) if r == r
    )
    return f"{ratio:.2f} (steps {a}-{b})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--config", default="defaults", choices=list(CONFIGS))
    p.add_argument("--nets", nargs="+", help="run only these of the configuration's nets (default: all)")
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--report", action="store_true", help="print the table of the stored rows and exit")
    p.add_argument("--again", action="store_true", help="measure stored keys again (the latest row counts)")
    args = p.parse_args(argv)
    if not args.report:
        for task in args.tasks:
            nets = [n for n in nets_for(task, args.config) if args.nets is None or n in args.nets]
            for net in ["plain", *nets]:
                config = "plain" if net == "plain" else args.config
                for seed in args.seeds:
                    key = {"task": task, "net": net, "config": config, "seed": seed, "steps": args.steps}
                    if config != "plain":
                        key["options"] = SPELLED[config]
                    if not args.again and _store.find(args.table, key) is not None:
                        continue
                    result = run(task, net, args.config, seed, args.steps)
                    _store.append(args.table, {"key": key, "result": result, "provenance": _store.provenance(argv)})
                    print(f"{task} {net} {config} seed {seed}: {result.get('auroc', '')} test {result['test']:.3f}")
    placebo = args.config == "placebo"
    print(placebo_spread(args.table, args.steps) if placebo else report(args.table, args.config, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
