"""The static check ``auto`` uses: whether ``ghost`` is exact for a model, from the rules' declared modules.

Exact needs samples that do not interact and a rule for every layer that holds a look-ahead parameter.
Each module goes to the first registered rule that covers it (:meth:`Rule.covers`), which may name a
problem (:meth:`Rule.module_problem`: batch norm in train mode, sequence-first attention, an embedding
with ``max_norm``); a layer (a module without submodules) that no rule covers is refused when it holds a
look-ahead parameter. Frozen layers never need a rule: their output gradients pass by ordinary autograd.
Parameters held by modules with submodules (a ViT's ``pos_embed`` and ``cls_token``) are followed
operation by operation, and so are the operations inside a covered layer (HF's hand-written RMSNorm).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from .rules import Rule, registered_rules

__all__ = ["ghost_exactness_problem"]


def _covering(module: nn.Module, rules: list[Rule]) -> Rule | None:
    return next((rule for rule in rules if rule.covers(module)), None)


def ghost_exactness_problem(model: nn.Module, params: Mapping[str, Tensor] | Iterable[str]) -> str | None:
    """Why ``"ghost"`` may not be exact for ``model`` with look-ahead parameters ``params`` (by name; names
    alone are looked up in the model), or ``None``. The reason names the module:
    ``"layers.0.bn (BatchNorm1d) normalises over the batch in train mode"``."""
    if not isinstance(params, Mapping):
        named = dict(model.named_parameters())
        params = {k: named[k] for k in params if k in named}
    lookahead = {id(p) for p in params.values()}
    rules = registered_rules()
    for prefix, module in model.named_modules():
        where = f"{prefix or 'model'} ({type(module).__name__})"
        holds = any(id(p) in lookahead for p in module.parameters(recurse=False))
        rule = _covering(module, rules)
        if rule is not None:
            reason = rule.module_problem(module, holds)
            if reason is not None:
                return f"{where} {reason}"
        elif holds and next(module.children(), None) is None:
            return f"{where} is a layer without a rule holding look-ahead parameters"
    return None if lookahead else "no look-ahead parameter"
