"""reweight: meta sample reweighting (L2RW, Meta-Weight-Net, LogitNet, MetaInfoNet) for any PyTorch loop.

Example:
    >>> from reweight import MetaReweighter
    >>> # reweighter = MetaReweighter(model, optimizer, meta_loader, net="metainfonet")
    >>> # weights = reweighter.step(x, y, logits)
"""

from .engines import MetaGradient, MetaProblem, get_engine, list_engines, register_engine
from .losses import cross_entropy
from .monitor import CollapseMonitor, WeightCollapseWarning
from .nets import (
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

__version__ = "0.1.0"

__all__ = [
    "MetaReweighter",
    "NonFiniteLossError",
    "CollapseMonitor",
    "WeightCollapseWarning",
    "LossNet",
    "LogitNet",
    "MetaInfoNet",
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
