"""Every :class:`~reweight.MetaReweighter` argument, validated into one frozen object before any state exists.

``torch.optim``'s habit: check each argument and fill in the defaults first, so that a constructor that raises
leaves nothing behind (no hook on the user's model, no half-built net). :func:`resolve_options` applies the
preset, then checks types and values and names the argument and the allowed values in each error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._batch import LogitsFn, as_logits, unwrap_model
from .engines import list_engines
from .lookahead import LookaheadSpec
from .loss_history import check_history
from .losses import PerSampleLoss, cross_entropy, is_class_cross_entropy
from .nets import HISTORY_NETS, list_weighting_nets, named_net_reads
from .noise_evidence import QUANTILE
from .presets import FROM_PRESET, DefaultMetaOptimizer, resolve_preset
from .virtual_step import check_virtual_step

__all__ = [
    "ReweighterOptions", "resolve_options", "default_meta_optimizer", "group_meta_optimizer", "MetaOptimizerFactory"
]

MetaOptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

NORMALIZATIONS = ("sum", "class", "none")
# normalization=None: "class" on class labels for a per-sample net that reads the class logits (LogitNet,
# MetaInfoNet, the gated net, a module with requires_logits), so that it ranks the samples of each class among
# themselves and every class keeps its share of the loss. With "sum" these nets also move weight between classes,
# and under label noise on balanced classes they moved it onto the classes the model had already learned, which
# kept the others from being learned: LogitNet and MetaInfoNet ended below plain training under uniform noise
# (docs/results.md, "Weights within each class"). "class" for L2RW too: with "sum" its clamped meta-gradients
# rested each batch on the few classes the meta batch pulled toward, and it ended below plain training on every
# noise cell of MNIST-1D (docs/results.md, "L2RW within each class"). "sum" for LossNet (whose class-level
# weighting, by the loss alone, helped it), for other targets, and for the group net, whose weights move mass
# between sources by design. With imbalanced classes (a long tail), "sum" lets a net weight the rare classes up.
# Class labels are known at construction under the library's cross-entropy; under a loss of the user's the first
# batch settles it ("auto" until then: integer class indices of (batch, K >= 2) logits; settle_options).
# net="auto": the gated net (LossNet and MetaInfoNet, blended by a gate learned on the meta set) on class labels;
# LossNet, which reads the loss alone, otherwise. Known at construction under the library's cross-entropy, settled
# by the first batch under a loss of the user's (settle_options).
AUTO_NET, AUTO_NET_OTHER = "gated", "lossnet"
# min_ess=None: a fifth of the batch at least carries its loss, for every per-sample net. Without a bound
# the nets' sigmoid outputs can sink into their exponential tail, where the normalised weights are a softmax
# whose sharpness nothing limits; on the stability benchmark (BN CNN, paper schedule, 20 seeds) four of twenty
# Flip-1 runs of the gated net fell 6.7 to 32.5 points that way, and none with the floor. L2RW's weights (each
# batch's clamped meta-gradient) rest on a few samples by construction: two fifths for it within each class
# (normalization="class", its default on class labels), chosen there on the meta set among 0.2, 0.4 and 0.6
# (docs/results.md, "L2RW within each class"); under "sum" (other losses) it keeps 0.2, with which the defaults
# matrix's regression ended with a lower test error than with 0.4 on each of its three seeds. The group net gets
# none, with or without a ``within`` net: its weights may rightly rest on one small source (docs/results.md, "A
# floor on the effective sample size").
MIN_ESS, L2RW_MIN_ESS, GROUPS_MIN_ESS = 0.2, 0.4, 0.0
# min_ess_until_evidence=None: 0.8 where the veto waits for evidence and the weights are normalised within each
# class, else 0: weights with nothing to find held near uniform, the floor giving way to min_ess as the evidence
# builds (docs/results.md, "The fading floor as the default"; LossNet under "sum" lost on clean long tails with it).
MIN_ESS_UNTIL_EVIDENCE = 0.8
# meta_warmup=None: the per-sample nets' lr rises over 300 steps, so that they do not commit while the model is
# underfit; the group net alone (no ``within`` net) has one parameter per source, starts as the plain mixture and
# takes SGD's steps (group_meta_optimizer), so it needs no warm-up (docs/source_weighting.md).
META_WARMUP, GROUPS_META_WARMUP = 300, 0
META_LR, GROUPS_META_LR = 1e-3, 1e-3
# meta_follows_lr=None: the meta lr is not scaled by the training lr's decay. At the default meta lr, following
# the decay is lower on the meta set on every noise of the stability benchmark: after the decay the net keeps
# correcting the weights as the model fits the noisy labels (docs/results.md, "A meta lr that follows...").
META_FOLLOWS_LR = False
# veto=None: after each meta update a sample whose meta-gradient coefficient c_i (dL_meta/dw_i) is above half the
# batch's mean |c| gets weight 0 for that step (the meta batch says that weighting it up raises the meta loss).
# Chosen among 0, 0.5 and 1 (and none) on clean samples held out beside the meta set, never shown to the
# reweighter (the meta set flatters a stronger veto, whose weights train toward it): on the stability benchmark
# (BN CNN, paper schedule, 10 seeds of Flip-1, Flip-2 and uniform 40%) 0.5 is highest there, +7.2 points over no
# veto and 2.4 to 2.6 over 0 and 1, above no veto on each noise; no seed falls more than 2 points from its best
# (docs/results.md, "The meta-gradient's veto"). On clean labels it costs: on MNIST-1D 1 to 2 points, 3.4 to 4.5
# under a mild long tail (imbalance 3; on digits up to 1), where without it the gated net is level with plain
# training ("Long tails and a smaller meta set"). The group net alone weighs sources, not samples: none. L2RW's
# weights are its clamped coefficients, a veto at 0 by construction.
VETO = 0.5
# veto_warmup=None: the net's meta_warmup (300) while the veto acts: the veto reads the coefficients at the net's
# own warm-up factor, so it does not act before the net has learned from the meta set. From the first step (0) a
# run shorter than the warm-up ended below plain training on held-out samples (the HF example's task, 96 steps, 10
# seeds: the gated net 2.6 points on average and 16.4 on one seed, LossNet 23 on average); held off, every seed of
# both nets ended within 0.4 points of plain training or above. On the long protocols (held-out samples of fresh
# seeds, the gated net) it is +0.7 +- 0.4 pooled, and every net meets the stability targets with it; its costs
# there, on the meta set: LogitNet under uniform noise 4.1 points, LossNet 1.5 under flips; on a wide network that
# memorises, the gated net about a point under uniform noise (docs/results.md, "The veto waits for the net").
VETO_WARMUP = None
# veto_center=None: under normalization="class" the veto reads each coefficient against its class's weighted mean
# (what vetoing a sample and normalising its class again changes, to first order; the class part of c_i says how
# the meta batch would shift the classes' shares, not whether the sample is clean); under "sum" as it is.
# Against the veto as it is, on clean samples held out beside the meta set of fresh seeds (the gated net; both
# gentle protocols and the stability benchmark, 110 runs each): +1.2 +- 0.4 pooled, no protocol below; every
# class-normalised net meets the stability targets with it; at 2% clean data under pair flips, where the veto as
# it is cost 5 points against no veto and left two seeds of twenty below plain training, it costs none. LossNet
# ("sum") keeps the coefficients as they are: within its classes (veto_center=True) it was lower on the stability
# benchmark's meta set, and within the batch it separated less on the LoRA task (results, "The veto within each class").
VETO_CENTER = None
# veto_refill=None: inf: under "class" a class's kept samples take its whole vetoed share; a finite value caps how far
# they are scaled up for it, the batch taking the rest (1: all). At 2 a ViT from scratch went from 12.3 points below
# plain training to 0.8 below (held-out halves, ten seeds), MNIST-1D's gentle protocol level, but the BatchNorm CNN
# lost 2.2 under Flip-1; at 1 MNIST-1D lost 1.9 (docs/robustness.md, "Where a vetoed sample's share goes").
VETO_REFILL = math.inf
# veto_evidence=None: 0.05 on class labels (known under normalization="class", else settled by the first batch),
# else 0 (the veto from the first update); the veto waits until the meta set shows label noise (noise_evidence).
# Against the veto from the first update, on clean samples held out beside the meta set (MNIST-1D both protocols,
# the BatchNorm CNN, seeds 10-19): the gated net +1.25 points pooled over clean labels and mild tails, +0.02 over
# fifteen noisy cells, none below by two standard errors, the Hugging Face example 85.6% against 86.1% (plain
# 79.2%); LossNet +3.6 and -0.2, one noisy cell below (uniform 40%, -1.4), the noisy long tail under Flip-1 -2.4
# and -1.7, the Hugging Face example 88.0% against 88.7% (docs/results.md, "The veto waiting for evidence").
VETO_EVIDENCE = 0.05
# veto_competence=None: 0, the veto does not wait for the model's competence on the meta set (MetaCompetence). A
# threshold (0.45 measured) makes it wait until the moving average of the model's chance-corrected accuracy on the
# meta batches reaches it: a ViT trained from scratch with AdamW went from 12.3 +- 5.2 points below plain training
# (held-out halves, ten seeds, five more than 10 below) to 0.8 +- 2.1 below, but MNIST-1D under 60% uniform noise
# lost 7.1 +- 1.9 held-out points (the veto came too late), so it is not the default (docs/robustness.md, "The
# veto waiting for the model's competence").
VETO_COMPETENCE = 0.0
VIRTUAL_STEPS = ("sgd", "optimizer")
ON_NONFINITE = ("raise", "skip")


def _is_group_net(net: Any) -> bool:
    """Whether ``net`` is the group net, by name or as a module (with or without a ``within`` net)."""
    return net == "groups" if isinstance(net, str) else bool(getattr(net, "requires_groups", False))


def _is_l2rw(net: Any) -> bool:
    return isinstance(net, str) and net == "l2rw"


def _group_weights_alone(net: Any, net_kwargs: dict | None) -> bool:
    """Whether ``net`` is the group net with no per-sample net multiplied in (by name or as a module)."""
    within = (net_kwargs or {}).get("within") if isinstance(net, str) else getattr(net, "within", None)
    return _is_group_net(net) and within is None


def default_meta_optimizer(params: Iterable[nn.Parameter], lr: float = META_LR) -> torch.optim.Optimizer:
    """The weighting net's optimizer when none is given: AdamW, lr 1e-3, weight decay 5e-4 (``"fast"`` scales lr).

    The paper's lr and decay, with the decay decoupled: Adam's coupled decay is added to the gradient, and
    whenever the meta-gradient is small (a small training lr, as in fine-tuning) it outweighs it and pulls
    the net back to its start instead of letting it learn.
    """
    return torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)


def group_meta_optimizer(params: Iterable[nn.Parameter], lr: float = GROUPS_META_LR) -> torch.optim.Optimizer:
    """The optimizer of the group net alone (``net="groups"`` without ``within``) when none is given: SGD, lr 1e-3.

    SGD's steps follow the meta-gradient's size (made free of the training lr's scale by the reweighter), so a
    source that hurts the meta loss more falls faster and the group weights end in the order of the harm each
    source does; Adam's steps are nearly the same size whatever the gradient, and every source it pushes down
    falls at the same rate. The lr was chosen on the meta sets of the source-weights benchmark.
    """
    return torch.optim.SGD(params, lr=lr)


@dataclass(frozen=True)
class ReweighterOptions:
    """The reweighter's configuration after the preset is applied and every value is checked.

    The attributes are the constructor arguments of :class:`~reweight.MetaReweighter` of the same names, with the
    defaults filled in (``meta_optimizer`` is always a factory, ``meta_loss_fn`` and ``logits_fn`` callables).
    """

    net: str | nn.Module  # "auto" until the first batch settles it under a loss of the user's (settle_options)
    net_kwargs: Mapping[str, Any]
    preset: str
    interval: int
    engine: str
    lookahead: LookaheadSpec
    normalization: str  # "auto" until the first batch settles it (settle_options)
    virtual_step: str
    lookahead_lr: float | None
    meta_optimizer: MetaOptimizerFactory
    meta_warmup: int
    meta_follows_lr: bool
    min_ess: float | None  # None: L2RW's, settled with normalization="auto"
    min_ess_until_evidence: float | None  # the floor while the veto waits for evidence (None: the first batch's)
    veto: float  # math.inf: none
    veto_warmup: int  # steps over which the veto reads the coefficients at the warm-up factor (0: none)
    veto_center: bool | None  # the veto reads c_i less its class's (batch's) weighted mean; None: under "class"
    veto_refill: float  # under "class", how far a class's kept samples are scaled up to take its vetoed share
    veto_evidence: float | None  # the veto acts once the evidence reaches it (0: at once); None: the first batch's
    veto_competence: float | None  # and once the chance-corrected meta accuracy reaches it; None: the first batch's
    loss_history: bool
    loss_fn: PerSampleLoss
    meta_loss_fn: PerSampleLoss
    logits_fn: LogitsFn
    num_classes: int | None
    on_nonfinite: str
    collapse_threshold: float | None
    seed: int | None

    @property
    def is_l2rw(self) -> bool:
        """Whether the weights are L2RW's (no weighting net)."""
        return _is_l2rw(self.net)

    @property
    def vetoes(self) -> bool:
        """Whether the meta-gradient vetoes samples after each of the net's meta updates (``veto`` finite)."""
        return math.isfinite(self.veto)

    def veto_factor(self, step: int) -> float:
        """The warm-up factor ``min(1, (step + 1) / veto_warmup)`` the veto reads the coefficients at."""
        return min(1.0, (step + 1) / self.veto_warmup) if self.veto_warmup else 1.0

    @property
    def head_mode(self) -> bool:
        """Whether the look-ahead moves the final Linear layer only (``lookahead="head"``)."""
        return isinstance(self.lookahead, str) and self.lookahead == "head"

    @functools.cached_property
    def requires_logits(self) -> bool:
        """Whether the weighting net reads class logits (every net but LossNet and L2RW; ``net="auto"`` waiting for
        the first batch does not yet)."""
        if self.is_l2rw or self.net == "auto":
            return False
        if isinstance(self.net, nn.Module):
            return bool(getattr(self.net, "requires_logits", False))
        return named_net_reads(self.net, dict(self.net_kwargs), "logits")

    @functools.cached_property
    def requires_groups(self) -> bool:
        """Whether the weighting net reads group ids (``step(..., groups=g)``): ``"groups"`` and modules that
        declare ``requires_groups = True``."""
        if isinstance(self.net, nn.Module):
            return bool(getattr(self.net, "requires_groups", False))
        return not self.is_l2rw and named_net_reads(self.net, dict(self.net_kwargs), "groups")

    @functools.cached_property
    def requires_history(self) -> bool:
        """Whether the weighting net reads each sample's loss history (``step(..., sample_ids=ids)``)."""
        if isinstance(self.net, nn.Module):
            return bool(getattr(self.net, "requires_history", False))
        if self.net == "auto":  # the gated net or LossNet: both read it with loss_history
            return self.loss_history
        return not self.is_l2rw and named_net_reads(self.net, dict(self.net_kwargs), "history")

    @property
    def num_groups(self) -> int | None:
        """The group count of a net that reads groups, if it says (``num_groups``), else ``None``."""
        if isinstance(self.net, nn.Module):
            return getattr(self.net, "num_groups", None)
        return self.net_kwargs.get("num_groups") if self.requires_groups else None

    def replace(self, **changes: Any) -> ReweighterOptions:
        """A copy with ``changes``; only ``on_nonfinite`` may change after construction.

        Raises:
            ValueError: for another option or a value outside the allowed ones.
        """
        if set(changes) - {"on_nonfinite"}:
            raise ValueError(f"only on_nonfinite may change after construction; got {sorted(changes)}")
        _choice("on_nonfinite", changes["on_nonfinite"], ON_NONFINITE)
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_net(net: Any, net_kwargs: Any) -> None:
    if isinstance(net, str):
        _choice("net", net, ["auto", *list_weighting_nets(), "l2rw"])
    elif not isinstance(net, nn.Module):
        raise TypeError(f"net must be a registered name or an nn.Module, got {type(net).__name__}")
    if net_kwargs is None:
        return
    if not isinstance(net, str):
        raise ValueError("net_kwargs applies to a named net only; configure your own module directly")
    if net == "l2rw":
        raise ValueError("net='l2rw' has no weighting net: net_kwargs does not apply")
    if net == "auto":
        raise ValueError("net_kwargs applies to a named net; net='auto' picks one by the labels: name one ('gated')")
    if not isinstance(net_kwargs, dict):
        raise TypeError(f"net_kwargs must be a dict or None, got {type(net_kwargs).__name__}")


def _check_veto(veto: Any, net: Any, net_kwargs: dict | None) -> float:
    """The ``veto`` threshold, ``math.inf`` for none; ``None`` gives the default (none for the group net alone
    and L2RW, whose own rule it is)."""
    if veto is None:
        return math.inf if _is_l2rw(net) or _group_weights_alone(net, net_kwargs) else VETO
    if isinstance(veto, bool) or not isinstance(veto, numbers.Real):
        raise TypeError(f"veto must be a number or None, got {type(veto).__name__}")
    if math.isnan(float(veto)) or float(veto) < 0:
        raise ValueError(f"veto must be >= 0 (a multiple of the batch's mean |c|; math.inf: none), got {veto!r}")
    if _is_l2rw(net):
        raise ValueError("veto does not apply to net='l2rw': its weights are the clamped meta-gradient, a veto at 0")
    return float(veto)


def resolve_options(model: Any, optimizer: Any, **arguments: Any) -> ReweighterOptions:
    """Apply ``arguments["preset"]`` and check every argument of :class:`~reweight.MetaReweighter`.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument has a wrong value (the message names it and the allowed values).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    preset = arguments.pop("preset")
    presettable = ("interval", "engine", "lookahead", "normalization", "virtual_step", "lookahead_lr", "meta_optimizer")
    given = {k: arguments[k] is not FROM_PRESET for k in presettable}
    arguments.update(resolve_preset(preset, {k: arguments[k] for k in presettable}))
    a = arguments
    _check_net(a["net"], a["net_kwargs"])
    _check_int("interval", a["interval"], 1)
    if a["net"] == "l2rw" and a["interval"] != 1:
        source = f" (set by preset={preset!r}; pass interval=1)" if not given["interval"] else ""
        raise ValueError(f"interval must be 1 for net='l2rw': its weights come from each batch's meta-gradient{source}")
    _choice("engine", a["engine"], ["auto", *list_engines()])
    if a["normalization"] is not None:
        _choice("normalization", a["normalization"], NORMALIZATIONS)
    _choice("virtual_step", a["virtual_step"], VIRTUAL_STEPS)
    _choice("on_nonfinite", a["on_nonfinite"], ON_NONFINITE)
    lr = a["lookahead_lr"]
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(f"lookahead_lr must be a number or None, got {type(lr).__name__}")
        if not (math.isfinite(float(lr)) and float(lr) > 0):
            raise ValueError(f"lookahead_lr must be positive and finite, got {lr!r}")
        lr = float(lr)
    check_virtual_step(a["virtual_step"], optimizer, coordinate_scales=True)  # the optimizer's type
    groups_alone = _group_weights_alone(a["net"], a["net_kwargs"])
    own, own_lr = (group_meta_optimizer, GROUPS_META_LR) if groups_alone else (default_meta_optimizer, META_LR)
    if a["meta_optimizer"] is None:
        a["meta_optimizer"] = own
    elif isinstance(a["meta_optimizer"], DefaultMetaOptimizer):  # a preset's "the default, lr scaled"
        a["meta_optimizer"] = functools.partial(own, lr=own_lr * a["meta_optimizer"].lr_scale)
    for name in ("loss_fn", "meta_loss_fn", "meta_optimizer", "logits_fn"):
        if a[name] is not None and not callable(a[name]):
            raise TypeError(f"{name} must be callable, got {type(a[name]).__name__}")
    warmup = a["meta_warmup"]
    if warmup is None:
        warmup = GROUPS_META_WARMUP if groups_alone else META_WARMUP
    _check_int("meta_warmup", warmup, 0)
    follows = a["meta_follows_lr"]
    if follows is None:
        follows = META_FOLLOWS_LR
    if not isinstance(follows, bool):
        raise TypeError(f"meta_follows_lr must be a bool or None, got {type(follows).__name__}")
    min_ess = a["min_ess"]
    if min_ess is None:
        min_ess = GROUPS_MIN_ESS if _is_group_net(a["net"]) else MIN_ESS  # L2RW's within classes: below
    if isinstance(min_ess, bool) or not isinstance(min_ess, numbers.Real):
        raise TypeError(f"min_ess must be a number or None, got {type(min_ess).__name__}")
    if not 0 <= float(min_ess) < 1:
        raise ValueError(f"min_ess must be in [0, 1) (a share of the batch; 0 turns the floor off), got {min_ess!r}")
    veto = _check_veto(a["veto"], a["net"], a["net_kwargs"])
    quiet = a["min_ess_until_evidence"]
    if isinstance(quiet, bool) or not isinstance(quiet, numbers.Real | None):
        raise TypeError(f"min_ess_until_evidence must be a number or None, got {type(quiet).__name__}")
    if quiet is not None and not 0 <= float(quiet) < 1:
        raise ValueError(f"min_ess_until_evidence must be in [0, 1) (a share of the batch), got {quiet!r}")
    veto_warmup = a["veto_warmup"]
    if veto_warmup is None:  # the net's warm-up while the veto acts (VETO_WARMUP); nothing to warm up without one
        veto_warmup = warmup if math.isfinite(veto) else 0
    _check_int("veto_warmup", veto_warmup, 0)
    if veto_warmup and _is_l2rw(a["net"]):
        raise ValueError("veto_warmup does not apply to net='l2rw': it has no veto (its weights are the clamped c)")
    veto_center = VETO_CENTER if a["veto_center"] is None else a["veto_center"]
    if veto_center is not None and not isinstance(veto_center, bool):
        raise TypeError(f"veto_center must be a bool or None, got {type(veto_center).__name__}")
    if veto_center and _is_l2rw(a["net"]):
        raise ValueError("veto_center does not apply to net='l2rw': it has no veto (its weights are the clamped c)")
    refill = VETO_REFILL if a["veto_refill"] is None else a["veto_refill"]
    if isinstance(refill, bool) or not isinstance(refill, numbers.Real):
        raise TypeError(f"veto_refill must be a number or None, got {type(refill).__name__}")
    if not float(refill) >= 1:
        raise ValueError(f"veto_refill must be >= 1 (math.inf: a class keeps its whole share), got {refill!r}")
    evidence = a["veto_evidence"]
    if evidence is None:  # 0 here; VETO_EVIDENCE on class labels (below, or the first batch)
        evidence = 0.0
    if isinstance(evidence, bool) or not isinstance(evidence, numbers.Real):
        raise TypeError(f"veto_evidence must be a number or None, got {type(evidence).__name__}")
    if not 0 <= float(evidence) < QUANTILE:
        raise ValueError(f"veto_evidence must be in [0, {QUANTILE:g}) (a share of the batch; 0: the veto acts from the "
                         f"first update), got {evidence!r}")  # fmt: skip
    if evidence and _is_l2rw(a["net"]):
        raise ValueError("veto_evidence does not apply to net='l2rw': it has no veto (its weights are the clamped c)")
    competence = a["veto_competence"]
    if competence is not None and (isinstance(competence, bool) or not isinstance(competence, numbers.Real)):
        raise TypeError(f"veto_competence must be a number or None, got {type(competence).__name__}")
    if competence is not None and not 0 <= float(competence) < 1:
        raise ValueError(f"veto_competence must be in [0, 1) (a chance-corrected accuracy), got {competence!r}")
    if competence and (not math.isfinite(veto) or a["veto_evidence"] == 0):
        raise ValueError(
            "veto_competence applies where the veto waits for evidence of label noise (on class labels); here "
            f"nothing waits (veto={a['veto']!r}, veto_evidence={a['veto_evidence']!r}): drop veto_competence"
        )
    if quiet and (not math.isfinite(veto) or a["veto_evidence"] == 0):
        raise ValueError(
            "min_ess_until_evidence applies while the veto waits for evidence of label noise; here nothing waits "
            f"(veto={a['veto']!r}, veto_evidence={a['veto_evidence']!r}): set min_ess for the floor throughout"
        )
    if not isinstance(a["loss_history"], bool):
        raise TypeError(f"loss_history must be a bool, got {type(a['loss_history']).__name__}")
    if a["num_classes"] is not None:
        _check_int("num_classes", a["num_classes"], 1)
    threshold = a["collapse_threshold"]
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)):
        raise TypeError(f"collapse_threshold must be a number or None, got {type(threshold).__name__}")
    if a["seed"] is not None and (isinstance(a["seed"], bool) or not isinstance(a["seed"], int)):
        raise TypeError(f"seed must be an int or None, got {type(a['seed']).__name__}")
    loss_fn = a["loss_fn"] if a["loss_fn"] is not None else cross_entropy
    net = a["net"]
    if isinstance(net, str) and net == "auto" and is_class_cross_entropy(loss_fn):
        net = AUTO_NET  # under a loss of the user's the first batch settles it (settle_options)
    net_kwargs = dict(a["net_kwargs"] or {})
    if a["loss_history"] and isinstance(net, str) and net in HISTORY_NETS:
        net_kwargs["history"] = True
    options = ReweighterOptions(
        net=net,
        net_kwargs=net_kwargs,
        preset=preset,
        interval=a["interval"],
        engine=a["engine"],
        lookahead=a["lookahead"],
        normalization=a["normalization"] or "sum",
        virtual_step=a["virtual_step"],
        lookahead_lr=lr,
        meta_optimizer=a["meta_optimizer"],
        meta_warmup=warmup,
        meta_follows_lr=follows,
        min_ess=float(min_ess),
        min_ess_until_evidence=None if quiet is None else float(quiet),
        veto=veto,
        veto_warmup=veto_warmup,
        veto_center=veto_center,
        veto_refill=float(refill),
        veto_evidence=float(evidence),
        veto_competence=None if competence is None else float(competence),
        loss_history=a["loss_history"],
        loss_fn=loss_fn,
        meta_loss_fn=a["meta_loss_fn"] if a["meta_loss_fn"] is not None else loss_fn,
        logits_fn=a["logits_fn"] if a["logits_fn"] is not None else as_logits,
        num_classes=a["num_classes"],
        on_nonfinite=a["on_nonfinite"],
        collapse_threshold=None if threshold is None else float(threshold),
        seed=a["seed"],
    )
    reads_logits = options.requires_logits or options.is_l2rw or options.net == "auto"
    if a["normalization"] is None and reads_logits and not _is_group_net(net):
        # "class" on class labels: known now under the library's cross-entropy, from the first batch for another loss
        options = dataclasses.replace(options, normalization="class" if is_class_cross_entropy(loss_fn) else "auto")
    if a["veto_evidence"] is None and options.vetoes:  # on class labels: known under "class", else the first batch's
        wait = VETO_EVIDENCE if options.normalization == "class" else None
        options = dataclasses.replace(options, veto_evidence=wait)
    known = not options.vetoes or options.veto_evidence == 0 or options.normalization == "class"
    if competence is None and known:  # else the first batch's (class labels or not)
        options = dataclasses.replace(options, veto_competence=_competence(options))
    if quiet is None and options.normalization != "auto":  # known here: under "class" the wait is settled above
        options = dataclasses.replace(options, min_ess_until_evidence=until_evidence(options))
    if a["min_ess"] is None and options.is_l2rw and options.normalization in ("class", "auto"):
        options = dataclasses.replace(options, min_ess=L2RW_MIN_ESS if options.normalization == "class" else None)
    if math.isfinite(options.veto_refill) and not (options.vetoes and options.normalization in ("class", "auto")):
        raise ValueError(f"veto_refill applies where the veto acts under normalization='class'; here net={net!r}, veto="
                         f"{options.veto!r}, normalization={options.normalization!r}: drop veto_refill")  # fmt: skip
    check_history(options)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not any(id(p) in optimized for p in unwrap_model(model).parameters()):
        raise ValueError("optimizer holds none of the model's parameters")
    return options


def _competence(options: ReweighterOptions) -> float:
    """``veto_competence=None`` where it is known at construction: :data:`VETO_COMPETENCE` where the veto waits for
    evidence under ``"class"``, 0 where nothing waits; else the first batch settles it (:func:`settled`)."""
    return VETO_COMPETENCE if options.vetoes and options.veto_evidence and options.normalization == "class" else 0.0


def until_evidence(options: ReweighterOptions) -> float:
    """``min_ess_until_evidence=None``: :data:`MIN_ESS_UNTIL_EVIDENCE` where the weights are normalised within each
    class (settled, and with it whether the veto waits for evidence) and the veto waits, else 0."""
    if options.normalization != "class":
        return 0.0
    return MIN_ESS_UNTIL_EVIDENCE if options.veto_evidence else 0.0
