"""Weighting networks: map what the classifier saw (loss, logits, label) to a per-sample weight.

Interface of a weighting net (built-in or user-defined ``nn.Module``)::

    forward(loss: Tensor (batch,), logits: Tensor (batch, K), targets: Tensor) -> Tensor | WeightingOutput

All inputs arrive detached from the classifier. The returned raw weights are non-negative with shape
``(batch,)`` (``(batch, 1)`` is accepted); a :class:`WeightingOutput` may also carry a scalar ``penalty``
that is added to the meta loss (MetaInfoNet's ``lambda * KL``). A net whose class attribute
``requires_logits`` is true is refused when the model's outputs are not class logits.

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
    """Meta-Weight-Net: ``sigmoid(MLP(loss))``, Linear(1, hidden)-ReLU-Linear(hidden, 1).

    Args:
        hidden: width of the hidden layer (default: ``100``, as Meta-Weight-Net).
        uniform_start: start from uniform weights (the last layer at zero): a net that has learned nothing
            leaves plain training as it is; ``False`` keeps PyTorch's random initialisation, whose weights
            start unequal and, on large losses, saturated (default: ``True``).
    """

    requires_logits = False

    def __init__(self, hidden: int = 100, uniform_start: bool = True) -> None:
        super().__init__()
        _check_positive_int("hidden", hidden)
        self.mlp = _mlp_head(1, hidden, uniform_start)

    def forward(self, loss: Tensor, logits: Tensor | None = None, targets: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.mlp(loss.unsqueeze(-1).to(next(self.mlp.parameters()).dtype))).squeeze(-1)


class LogitNet(nn.Module):
    """``sigmoid(MLP(z * e(y)))`` on the detached logits ``z`` and a learned label embedding (paper §4.2).

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
