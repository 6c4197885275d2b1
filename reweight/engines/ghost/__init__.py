"""The ``ghost`` engine: the exact meta-gradient from each layer's inputs and output gradients.

The per-sample inner products ``<J out_i [scale * v], G_i>`` of every operation that takes a look-ahead
parameter, from one backward of the unweighted losses (DP-SGD's ghost clipping, applied to the meta
gradient). The package:

- :mod:`.records`: what a captured operation is (its record, bound arguments, per-sample gradients).
- :mod:`.capture`: :class:`LayerCapture` records the training forward's operations, asking the rule
  registry how to run each; :class:`ForwardCapture` captures the caller's own forward for reuse.
- :mod:`.rules`: one rule per op family (linear, conv, embedding, layer/group/batch norm, RMS norm, scale,
  add, multi-head attention) keyed by torch function; any other operation gets the JVP/VJP of that one
  operation (:data:`.rules.FALLBACK`). :func:`register_rule` adds one.
- :mod:`.engine`: the passes (output gradients, weighted gradients, inner products, coefficients) and the
  registered engine.
- :mod:`.exactness`: :func:`ghost_exactness_problem`, the static check ``auto`` uses.
"""

from .capture import ForwardCapture, LayerCapture, captured
from .engine import (
    _returned_records,  # noqa: F401  (tests call it)
    coefficients_from,
    ghost_meta_gradient,
    inner_products,
    layer_output_gradients,
    weighted_gradients,
)
from .exactness import ghost_exactness_problem
from .records import LayerGradient, Record, SampleGradients
from .rules import FALLBACK, Rule, register_rule, registered_rules, rule_for, unregister_rule

__all__ = [
    "ghost_meta_gradient",
    "ghost_exactness_problem",
    "ForwardCapture",
    "LayerCapture",
    "captured",
    "layer_output_gradients",
    "weighted_gradients",
    "inner_products",
    "coefficients_from",
    "LayerGradient",
    "Record",
    "SampleGradients",
    "Rule",
    "FALLBACK",
    "register_rule",
    "unregister_rule",
    "rule_for",
    "registered_rules",
]
