"""The registry of per-op rules, keyed by torch function: the capture and the engine look rules up here.

One rule object per op family (:class:`Rule`, one file each); an operation whose function has no rule gets
:data:`FALLBACK`, the JVP and VJP of that one operation, so every operation has a rule. The static
exactness check reads the registered rules' declared modules. A rule from outside the package (a custom
op, a function of one's own) is one call::

    class MyScale(Rule):
        functions = (my_scale,)          # what the capture sees (``torch.overrides`` dispatch)
        modules = (MyScaleLayer,)        # what the static check may then accept
        ...                              # closed forms; anything left out is the generic path

    register_rule(MyScale())
"""

from __future__ import annotations

from collections.abc import Callable

from .additive import AdditiveRule
from .attention import AttentionRule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .fallback import FALLBACK, Rule
from .linear import LinearRule
from .norm import BatchNormRule, GroupNormRule, LayerNormRule
from .rmsnorm import RMSNormRule
from .scale import ScaleRule

__all__ = ["Rule", "FALLBACK", "register_rule", "unregister_rule", "rule_for", "registered_rules"]

_RULES: dict[Callable, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Register ``rule`` for each of its ``functions`` (replacing what was registered for them); returns it."""
    if not rule.functions:
        raise ValueError(f"{type(rule).__name__} declares no functions")
    for func in rule.functions:
        _RULES[func] = rule
    return rule


def unregister_rule(rule: Rule) -> None:
    """Remove ``rule`` from the functions it is registered for (they go back to :data:`FALLBACK`)."""
    for func in rule.functions:
        if _RULES.get(func) is rule:
            del _RULES[func]


def rule_for(func: Callable) -> Rule:
    """The rule registered for ``func``, else :data:`FALLBACK`."""
    return _RULES.get(func, FALLBACK)


def registered_rules() -> list[Rule]:
    """Every registered rule once, in registration order."""
    return list(dict.fromkeys(_RULES.values()))


for _rule in (
    LinearRule(),
    ConvRule(),
    EmbeddingRule(),
    LayerNormRule(),
    GroupNormRule(),
    BatchNormRule(),
    RMSNormRule(),
    AttentionRule(),
    ScaleRule(),
    AdditiveRule(),
):
    register_rule(_rule)
