"""Weighting networks: map what the classifier saw (loss, logits, label) to a per-sample weight.

Interface of a weighting net (built-in or user-defined ``nn.Module``)::

    forward(loss: Tensor (batch,), logits: Tensor (batch, K), targets: Tensor) -> Tensor | WeightingOutput

All inputs arrive detached from the classifier. The returned raw weights are non-negative with shape
``(batch,)`` (``(batch, 1)`` is accepted); a :class:`WeightingOutput` may also carry a scalar ``penalty``
that is added to the meta loss (MetaInfoNet's ``lambda * KL``). A net whose class attribute
``requires_logits`` is true is refused when the model's outputs are not class logits. A net whose class attribute
``requires_groups`` is true (:class:`GroupNet`) is called as ``forward(loss, logits, targets, groups=g)`` with the
``(batch,)`` integer group ids given to ``step(..., groups=g)``; the other nets never see ``groups``. A net whose
``requires_history`` is true (:class:`LossNet` and :class:`GatedNet` built with ``history=True``, which
``MetaReweighter(..., loss_history=True)`` does) is called with ``history=h``, each sample's moving average of its
past training losses (:mod:`reweight.loss_history`).

The reweighter calls the net in ``train()`` mode for the meta update and in ``eval()`` mode when it
computes the weights it returns, so stochastic nets can sample in one and use the mean in the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import Registry

__all__ = [
    "WeightingOutput",
    "LossNet",
    "LogitNet",
    "MetaInfoNet",
    "LabelEmbedding",
    "GroupNet",
    "GatedNet",
    "register_weighting_net",
    "create_weighting_net",
    "list_weighting_nets",
]


class WeightingOutput(NamedTuple):
    """Raw non-negative weights ``(batch,)`` and an optional scalar added to the meta loss."""

    weights: Tensor
    penalty: Tensor | None = None


_NETS: Registry[Callable[..., nn.Module]] = Registry("weighting net")


def register_weighting_net(name: str, *, description: str = "") -> Callable:
    """Register a factory ``fn(num_classes: int, **kwargs) -> nn.Module`` under ``name``."""
    return _NETS.register(name, description=description)


def create_weighting_net(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the registered weighting net ``name`` for ``num_classes`` classes.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the registered names).

    Example:
        >>> create_weighting_net("lossnet", num_classes=10)(torch.ones(4), None, None).shape
        torch.Size([4])
    """
    return _NETS.get(name)(num_classes, **kwargs)


def list_weighting_nets(with_description: bool = False) -> list[str] | dict[str, str]:
    """Names of the registered weighting nets (with their one-line descriptions if asked)."""
    return _NETS.describe() if with_description else _NETS.names()


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _mlp_head(in_features: int, hidden: int, uniform_start: bool) -> nn.Sequential:
    """Linear-ReLU-Linear to one logit; with ``uniform_start`` the last layer starts at zero, so every sample
    gets ``sigmoid(0)`` (uniform weights after normalisation) until the meta-gradient says otherwise."""
    last = nn.Linear(hidden, 1)
    if uniform_start:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), last)


class LabelEmbedding(nn.Module):
    """``e(y) = W onehot(y)``: a bias-free linear map of the (possibly soft) label to ``R^K`` (paper §4.2)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.proj = nn.Linear(num_classes, num_classes, bias=False)

    def forward(self, targets: Tensor) -> Tensor:
        if targets.ndim == 1:
            targets = F.one_hot(targets.long(), self.num_classes)
        return self.proj(targets.to(self.proj.weight.dtype))


class LossNet(nn.Module):
    """Meta-Weight-Net: ``sigmoid(MLP(loss))``, Linear(1, hidden)-ReLU-Linear(hidden, 1); with ``history``,
    ``sigmoid(MLP([loss, history]))`` on the loss and the sample's moving average of its past losses.

    Args:
        hidden: width of the hidden layer (default: ``100``, as Meta-Weight-Net).
        uniform_start: start from uniform weights (the last layer at zero): a net that has learned nothing
            leaves plain training as it is; ``False`` keeps PyTorch's random initialisation, whose weights
            start unequal and, on large losses, saturated (default: ``True``).
        history: also read ``history=`` (:mod:`reweight.loss_history`; set by ``MetaReweighter(...,
            loss_history=True)``) (default: ``False``).
    """

    requires_logits = False

    def __init__(self, hidden: int = 100, uniform_start: bool = True, history: bool = False) -> None:
        super().__init__()
        _check_positive_int("hidden", hidden)
        _check_bool("history", history)
        self.requires_history = history
        self.mlp = _mlp_head(2 if history else 1, hidden, uniform_start)

    def forward(
        self, loss: Tensor, logits: Tensor | None = None, targets: Tensor | None = None, history: Tensor | None = None
    ) -> Tensor:
        if not self.requires_history:
            features = loss.unsqueeze(-1)
        elif history is None:
            raise ValueError("this LossNet reads the loss history: call it with history= (loss_history=True)")
        else:
            features = torch.stack([loss, history.to(loss.dtype)], -1)
        return torch.sigmoid(self.mlp(features.to(next(self.mlp.parameters()).dtype))).squeeze(-1)


class LogitNet(nn.Module):
    """``sigmoid(MLP(z * e(y)))`` on the detached logits ``z`` and a learned label embedding (paper §4.2).

    Suits class-dependent label flips; under uniform noise it can end below plain training (docs/results.md,
    "Decision guide under the current defaults"), where :class:`GatedNet`, which also reads the loss, does not.

    Args:
        num_classes: number of classes ``K``.
        hidden: width of the MLP's hidden layer (default: ``100``).
        uniform_start: start from uniform weights (the last layer at zero): a net that has learned nothing
            leaves plain training as it is; ``False`` keeps PyTorch's random initialisation, whose weights
            start unequal and, on large losses, saturated (default: ``True``).
    """

    requires_logits = True

    def __init__(self, num_classes: int, hidden: int = 100, uniform_start: bool = True) -> None:
        super().__init__()
        _check_positive_int("hidden", hidden)
        self.embed = LabelEmbedding(num_classes)
        self.mlp = _mlp_head(num_classes, hidden, uniform_start)

    def forward(self, loss: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
        z = logits.to(self.embed.proj.weight.dtype)
        return torch.sigmoid(self.mlp(z * self.embed(targets))).squeeze(-1)


class MetaInfoNet(nn.Module):
    """LogitNet behind a variational information bottleneck on the logits (paper §4.3, Eqs. 5-7).

    Like :class:`LogitNet` it suits class-dependent flips and can end below plain training under uniform noise.

    ``mu, s = Linear(K, 2d)(z)``, ``sigma = softplus(s - 5)`` (Alemi et al.), ``psi = mu + sigma * eps``;
    with ``skip`` the logits are concatenated to ``psi``; ``Linear(d [+ K], K)`` projects back to ``K``;
    the weight is ``sigmoid(MLP(proj * e(y)))``. The penalty is ``kl_weight * mean_batch KL(N(mu, sigma) || N(0, I))``.

    Args:
        num_classes: number of classes ``K``.
        bottleneck_dim: size ``d`` of ``psi`` (default: ``16``).
        hidden: width of the MLP's hidden layer (default: ``100``).
        kl_weight: the Lagrange multiplier ``lambda`` of Eq. 5 (default: ``0.01``: under a schedule with lr 0.1
            and BatchNorm, ``0`` let the weights concentrate on few samples and training collapsed late on some
            seeds; ``0.01`` kept the meta-set accuracy to the end, see docs/results.md).
        skip: concatenate the logits to ``psi`` before the projection (default: ``True``).
        sample_at_weight_time: sample ``psi`` also in ``eval()`` mode, when the returned weights are made;
            by default the mean ``mu`` is used there, so the weights are deterministic (default: ``False``).
        uniform_start: start from uniform weights (the last layer at zero): a net that has learned nothing
            leaves plain training as it is; ``False`` keeps PyTorch's random initialisation, whose weights
            start unequal and, on large losses, saturated (default: ``True``).
    """

    requires_logits = True

    def __init__(
        self,
        num_classes: int,
        bottleneck_dim: int = 16,
        hidden: int = 100,
        kl_weight: float = 0.01,
        skip: bool = True,
        sample_at_weight_time: bool = False,
        uniform_start: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("bottleneck_dim", bottleneck_dim)
        _check_positive_int("hidden", hidden)
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = float(kl_weight)
        self.skip = bool(skip)
        self.sample_at_weight_time = bool(sample_at_weight_time)
        self.encoder = nn.Linear(num_classes, 2 * bottleneck_dim)
        self.project = nn.Linear(bottleneck_dim + (num_classes if skip else 0), num_classes)
        self.embed = LabelEmbedding(num_classes)
        self.mlp = _mlp_head(num_classes, hidden, uniform_start)

    def encode(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and scale of ``p(psi | z)``."""
        mu, raw = self.encoder(logits.to(self.encoder.weight.dtype)).chunk(2, dim=-1)
        return mu, F.softplus(raw - 5.0)

    def sample_noise(self, mu: Tensor) -> Tensor:
        """Standard normal noise of the reparameterisation trick (override to fix it)."""
        return torch.randn_like(mu)

    def forward(self, loss: Tensor, logits: Tensor, targets: Tensor) -> WeightingOutput:
        z = logits.to(self.encoder.weight.dtype)
        mu, sigma = self.encode(z)
        sample = self.training or self.sample_at_weight_time
        psi = mu + sigma * self.sample_noise(mu) if sample else mu
        if self.skip:
            psi = torch.cat([psi, z], dim=-1)
        weights = torch.sigmoid(self.mlp(self.project(psi) * self.embed(targets))).squeeze(-1)
        kl = -0.5 * (1 + 2 * torch.log(sigma) - mu.square() - sigma.square()).sum(-1).mean()
        return WeightingOutput(weights, self.kl_weight * kl)


@register_weighting_net("lossnet", description="Meta-Weight-Net on the per-sample loss")
def _lossnet(num_classes: int, **kwargs) -> nn.Module:
    return LossNet(**kwargs)


@register_weighting_net("logitnet", description="MLP on logits times a label embedding")
def _logitnet(num_classes: int, **kwargs) -> nn.Module:
    return LogitNet(num_classes, **kwargs)


@register_weighting_net("metainfonet", description="LogitNet behind a variational information bottleneck")
def _metainfonet(num_classes: int, **kwargs) -> nn.Module:
    return MetaInfoNet(num_classes, **kwargs)


class GatedNet(nn.Module):
    """A learned blend of LossNet and MetaInfoNet: ``w = g * w_loss + (1 - g) * w_info``, ``g = sigmoid(scale *
    gate)``, the gate starting at ``g = 1/2``.

    The meta-gradient trains both nets and the gate: the gate moves toward the net whose weights agree with the
    meta set's coefficients, so each run learns which input to trust (the loss under uniform noise, the logits
    under class-dependent flips) instead of the user guessing the noise type. The penalty is MetaInfoNet's.

    Args:
        num_classes: number of classes ``K``.
        scale: multiplies the gate's step (default: ``10``: with the default meta optimizer, ``g`` can go from
            ``1/2`` to ``0.88`` in about 200 meta updates).
        loss_kwargs: keyword arguments of :class:`LossNet`.
        info_kwargs: keyword arguments of :class:`MetaInfoNet`.
        uniform_start: passed to both nets (default: ``True``).
        history: LossNet also reads the loss history (:class:`LossNet`'s ``history``) (default: ``False``).
    """

    requires_logits = True

    def __init__(
        self,
        num_classes: int,
        scale: float = 10.0,
        loss_kwargs: dict | None = None,
        info_kwargs: dict | None = None,
        uniform_start: bool = True,
        history: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(scale, int | float) and scale > 0):
            raise ValueError(f"scale must be a number > 0, got {scale!r}")
        self.scale = float(scale)
        self.loss_net = LossNet(**{"uniform_start": uniform_start, "history": history, **(loss_kwargs or {})})
        self.requires_history = self.loss_net.requires_history
        self.info_net = MetaInfoNet(num_classes, **{"uniform_start": uniform_start, **(info_kwargs or {})})
        self.gate = nn.Parameter(torch.zeros(()))

    def trust_in_loss(self) -> Tensor:
        """``g``: the share of LossNet's weights in the blend (``1/2`` at the start), detached."""
        return self._gate().detach()

    def _gate(self) -> Tensor:
        return torch.sigmoid(self.scale * self.gate)

    def forward(self, loss: Tensor, logits: Tensor, targets: Tensor, history: Tensor | None = None) -> WeightingOutput:
        info = self.info_net(loss, logits, targets)
        g = self._gate().to(info.weights.dtype)
        weights = g * self.loss_net(loss, history=history).to(info.weights.dtype) + (1 - g) * info.weights
        return WeightingOutput(weights, info.penalty)


@register_weighting_net("gated", description="LossNet and MetaInfoNet blended by a learned gate")
def _gated(num_classes: int, **kwargs) -> nn.Module:
    return GatedNet(num_classes, **kwargs)


class GroupNet(nn.Module):
    """One learned weight per data source (group): every sample of group ``g`` gets ``w_g``, optionally times a
    per-sample net's weight (``within``), so a noisy source is down-weighted as a whole and its worst samples
    further.

    ``w = num_groups * softmax(scale * theta)`` with ``theta`` zero at the start: every group starts at weight 1
    (the plain mixture), the group weights always average to 1, and only their ratios move. With the library's
    ``normalization="sum"`` a sample of group ``g`` then counts ``w_g`` times a sample of weight 1 in every
    batch. ``scale`` sets how far a meta update moves the log-weights: with the group net's default meta optimizer
    (SGD, lr 1e-3, no warm-up) a group's log-weight moves by about
    ``scale**2 * 1e-3 * w_g * (C_g - mean) / sum_i |c_i|`` per update, in proportion to the harm or help its
    samples do, so the weights end in that order.

    The meta-gradient of ``theta_g`` is exactly ``scale * w_g * (C_g - mean)`` where ``C_g`` is the sum of the
    per-sample coefficients ``c_i = dL_meta / dw_i`` over the batch's samples of group ``g``: nothing is
    approximated (DoReMi and DoGE approximate it by excess losses or gradient alignment).

    The net reads the group ids as ``forward(loss, logits, targets, groups=g)`` (``requires_groups = True``), which
    :meth:`reweight.MetaReweighter.step` passes from its ``groups=`` argument.

    Args:
        num_groups: number of groups ``G``; ids are ``0 .. G-1``.
        within: a per-sample net multiplied in: a registered name (``"lossnet"``, ``"logitnet"``,
            ``"metainfonet"``) or an ``nn.Module``; ``None`` for group weights alone (default: ``None``).
        within_kwargs: keyword arguments of the named ``within`` net (default: ``None``).
        scale: log-weight per unit of ``theta`` (default: ``20.0``).
        group_names: names of the groups for logs and plots (default: ``"0"``, ``"1"``, ...).
        num_classes: the class count, for a ``within`` net that reads logits (given by the reweighter).
    """

    requires_groups = True

    def __init__(
        self,
        num_groups: int,
        within: str | nn.Module | None = None,
        within_kwargs: dict | None = None,
        scale: float = 20.0,
        group_names: list[str] | tuple[str, ...] | None = None,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        _check_positive_int("num_groups", num_groups)
        if not (isinstance(scale, int | float) and not isinstance(scale, bool) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        names = [str(g) for g in range(num_groups)] if group_names is None else [str(n) for n in group_names]
        if len(names) != num_groups:
            raise ValueError(f"group_names has {len(names)} names for num_groups={num_groups}")
        self.num_groups, self.scale, self.group_names = num_groups, float(scale), names
        self.theta = nn.Parameter(torch.zeros(num_groups))
        if isinstance(within, str):
            if within == "groups" or within not in list_weighting_nets():
                choices = [n for n in list_weighting_nets() if n != "groups"]
                raise ValueError(f"within must be one of {choices} or an nn.Module, got {within!r}")
            within = create_weighting_net(within, num_classes, **(within_kwargs or {}))
        elif within_kwargs:
            raise ValueError("within_kwargs applies to a named within net only")
        if within is not None and not isinstance(within, nn.Module):
            raise TypeError(f"within must be a net name, an nn.Module or None, got {type(within).__name__}")
        if getattr(within, "requires_groups", False):
            raise ValueError("within must be a per-sample net, not one that reads groups")
        self.within = within
        self.requires_logits = bool(getattr(within, "requires_logits", False))

    def group_weights(self) -> Tensor:
        """The current weight of each group, ``(num_groups,)``, averaging to 1 (1 each at the start)."""
        return self.num_groups * torch.softmax(self.scale * self.theta, dim=0)

    def forward(
        self, loss: Tensor, logits: Tensor | None = None, targets: Tensor | None = None, *, groups: Tensor
    ) -> Tensor | WeightingOutput:
        weights = self.group_weights()[groups.to(self.theta.device).long()]
        if self.within is None:
            return weights
        out = self.within(loss, logits, targets)
        inner, penalty = (out.weights, out.penalty) if isinstance(out, WeightingOutput) else (out, None)
        if inner.ndim == 2 and inner.shape[1] == 1:
            inner = inner.squeeze(1)
        weights = weights.to(inner.dtype) * inner
        return weights if penalty is None else WeightingOutput(weights, penalty)


_READS_LOGITS = {"lossnet": False, "l2rw": False, "logitnet": True, "metainfonet": True, "gated": True}
#: The built-in nets that read the loss, and so can read its history (``history=True``, set by ``loss_history``).
HISTORY_NETS = ("lossnet", "gated")


def named_net_reads(name: str, net_kwargs: dict | None, what: str) -> bool:
    """Whether the registered net ``name`` built with ``net_kwargs`` reads ``what``: ``"logits"`` (class logits;
    every built-in net but ``"lossnet"``, and ``"groups"`` only through a ``within`` net that does) or
    ``"groups"`` or ``"history"`` (the loss history: ``"lossnet"`` and ``"gated"`` with ``history=True``). A net
    registered by the user is built once, for two classes and without drawing from the global RNG, and asked (its
    ``requires_logits`` / ``requires_groups`` / ``requires_history``)."""
    kwargs = net_kwargs or {}
    if name == "auto":  # the gated net on class labels, LossNet otherwise: it needs no class logits to be given
        return False
    if name == "groups":
        if what == "groups":
            return True
        within = kwargs.get("within")
        if isinstance(within, nn.Module):
            return bool(getattr(within, "requires_logits", False))
        return within is not None and named_net_reads(within, kwargs.get("within_kwargs"), what)
    if name in _READS_LOGITS or name not in _NETS:  # built-in, or unknown: as before
        if what == "history":
            return name in HISTORY_NETS and kwargs.get("history") is True
        return what == "logits" and _READS_LOGITS.get(name, True)
    with torch.random.fork_rng(devices=[]):
        net = create_weighting_net(name, 2, **kwargs)
    return bool(getattr(net, f"requires_{what}", False))


@register_weighting_net("groups", description="one learned weight per data source (optionally times a per-sample net)")
def _groups(num_classes: int, **kwargs) -> nn.Module:
    if "num_groups" not in kwargs:
        raise ValueError("net='groups' needs the number of groups: net_kwargs={'num_groups': G}")
    return GroupNet(num_classes=num_classes, **kwargs)
