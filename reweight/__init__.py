"""reweight: meta sample reweighting (L2RW, Meta-Weight-Net, LogitNet, MetaInfoNet) for any PyTorch loop.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from reweight import MetaReweighter
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(8, 3)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> meta_loader = [(torch.randn(12, 8), torch.randint(0, 3, (12,)))]  # clean meta batches
    >>> reweighter = MetaReweighter(model, optimizer, meta_loader, net="metainfonet", seed=0)
    >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    >>> logits = model(x)
    >>> weights = reweighter.step(x, y, logits)
    >>> loss = (weights * F.cross_entropy(logits, y, reduction="none")).mean()
    >>> optimizer.zero_grad(); loss.backward(); optimizer.step()
    >>> weights.shape, round(weights.mean().item(), 4)  # normalised: uniform weights give the plain mean
    (torch.Size([16]), 1.0)
"""

from .class_checks import ClassNormalizationWarning, ClassShareWarning
from .distributed import DistributedStepError
from .engines import MetaGradient, MetaProblem, get_engine, list_engines, register_engine
from .guard import GuardFallbackWarning, PlainTwinGuard
from .losses import cross_entropy
from .monitor import CollapseMonitor, WeightCollapseWarning
from .nets import (
    GatedNet,
    GroupNet,
    LogitNet,
    LossNet,
    MetaInfoNet,
    WeightingOutput,
    create_weighting_net,
    list_weighting_nets,
    register_weighting_net,
)
from .reweighter import MetaReweighter, NonFiniteLossError
from .virtual_step import VirtualStep, plan_virtual_step
from .weighted_loss import weighted_loss

__version__ = "0.1.0"

__all__ = [
    "MetaReweighter",
    "NonFiniteLossError",
    "PlainTwinGuard",
    "GuardFallbackWarning",
    "weighted_loss",
    "DistributedStepError",
    "CollapseMonitor",
    "WeightCollapseWarning",
    "ClassNormalizationWarning",
    "ClassShareWarning",
    "LossNet",
    "LogitNet",
    "MetaInfoNet",
    "GatedNet",
    "GroupNet",
    "WeightingOutput",
    "create_weighting_net",
    "list_weighting_nets",
    "register_weighting_net",
    "MetaGradient",
    "MetaProblem",
    "get_engine",
    "list_engines",
    "register_engine",
    "cross_entropy",
    "VirtualStep",
    "plan_virtual_step",
    "__version__",
]
