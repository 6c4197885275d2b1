"""Which parameters the look-ahead moves: all of them, the final Linear head, name patterns, or a submodule.

Restricting the virtual update holds the other parameters fixed in the look-ahead (as Fast Sample
Reweighting and FaMUS do): the meta-gradient is then that of the restricted problem, and much cheaper.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._batch import Inputs, call_model
from ._compat import compiled_in_place, eager_calls, from_compiled_graph

__all__ = [
    "LookaheadSpec",
    "find_head",
    "lookahead_parameter_names",
    "untrained_lookahead",
    "LookaheadParams",
    "HeadCapture",
]

LookaheadSpec = str | Sequence[str] | nn.Module


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: ``model.get_classifier()`` (timm) if it is a Linear, else the last ``nn.Linear``.

    Raises:
        ValueError: if the model has no ``nn.Linear``.
    """
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        for name, module in model.named_modules():
            if module is head and isinstance(module, nn.Linear):
                return name, module
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("lookahead='head' needs a final nn.Linear layer; the model has none")
    return linears[-1]


def lookahead_parameter_names(model: nn.Module, spec: LookaheadSpec) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters the look-ahead moves.

    Args:
        model: the bare module.
        spec: ``"full"``, ``"head"``, a list of ``fnmatch`` patterns (``["layer4.*", "fc.*"]``), or a
            submodule of ``model``.

    Raises:
        ValueError: for an unknown string, patterns matching nothing, or a module that is not a submodule.
        TypeError: for any other kind of ``spec``.
    """
    names = [name for name, _ in model.named_parameters()]
    if isinstance(spec, str):
        if spec == "full":
            return set(names)
        if spec == "head":
            return lookahead_parameter_names(model, find_head(model)[1])
        raise ValueError(f"lookahead must be 'full', 'head', a list of name patterns or a submodule; got {spec!r}")
    if isinstance(spec, nn.Module):
        for prefix, module in model.named_modules():
            if module is spec:
                prefix = f"{prefix}." if prefix else ""
                return {prefix + n for n, _ in module.named_parameters()}
        raise ValueError(f"lookahead module {type(spec).__name__} is not a submodule of the model")
    if isinstance(spec, Sequence) and all(isinstance(p, str) for p in spec):
        chosen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in spec)}
        if not chosen:
            raise ValueError(f"lookahead patterns {list(spec)} match no parameter; parameters are e.g. {names[:5]}")
        return chosen
    raise TypeError(f"lookahead must be a string, a list of strings or an nn.Module, got {type(spec).__name__}")


def untrained_lookahead(model: nn.Module, trained: set[str]) -> ValueError:
    """The error for a look-ahead that selects no trained parameter, naming a pattern that selects some.

    Under LoRA the body and ``lm_head`` are frozen and only the adapters train: the cheap partial look-ahead
    is then the last block's adapters (``["*layers.1.*lora*"]`` for a two-block model), whose cost is a
    backward through that block only (docs/llm_finetuning.md).
    """
    message = "lookahead selects no parameter that the optimizer trains (requires_grad and in a group)"
    names = [n for n, _ in model.named_parameters() if n in trained]
    if not names:
        return ValueError(message)
    blocks = [int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.", n))]
    if blocks and any("lora" in n for n in names):
        hint = f'["*layers.{max(blocks)}.*lora*"] (the last block\'s LoRA adapters)'
    elif blocks:
        hint = f'["*layers.{max(blocks)}.*"] (the last block\'s trained parameters)'
    else:
        hint = f"[{names[-1].rsplit('.', 1)[0] + '.*'!r}] (the last trained module)"
    return ValueError(
        f"{message}; the trained parameters are e.g. {names[-3:]}: look ahead on some of them, e.g. "
        f"lookahead={hint}, or lookahead='full' (see docs/llm_finetuning.md)"
    )


class LookaheadParams:
    """The look-ahead parameters by name: those of ``names`` that require grad and that ``optimizer`` holds.

    Called every step (by the reweighter and the ghost capture), so the selection is cached and rebuilt only
    when what it depends on changed: a param group added or a parameter list changed (their lengths and
    identities), or the ``requires_grad`` of a parameter of ``names`` that the optimizer holds flipped (a
    layer frozen or unfrozen during training).
    """

    def __init__(self, module: nn.Module, names: set[str], optimizer: torch.optim.Optimizer) -> None:
        self.module, self.names, self.optimizer = module, names, optimizer
        self._signature: tuple[Any, ...] | None = None
        self._params: dict[str, Tensor] = {}
        self._candidates: list[Tensor] = []
        self.groups: dict[str, dict[str, Any]] = {}  # each selected parameter's param group

    def _current_signature(self) -> tuple[Any, ...]:
        groups = tuple((id(g["params"]), len(g["params"])) for g in self.optimizer.param_groups)
        return groups, tuple(p.requires_grad for p in self._candidates)

    def __call__(self) -> dict[str, Tensor]:
        if self._signature is None or self._signature != self._current_signature():
            group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
            chosen = [(n, p) for n, p in self.module.named_parameters() if n in self.names and id(p) in group_of]
            self._candidates = [p for _, p in chosen]  # frozen ones too: unfreezing one is seen
            self._params = {name: p for name, p in chosen if p.requires_grad}
            self.groups = {name: group_of[id(p)] for name, p in self._params.items()}
            self._signature = self._current_signature()
        return self._params


class HeadCapture:
    """Keeps the input of the model's final Linear from the latest forward (a removable forward hook).

    The linear-head engine needs the training batch's penultimate features from the user's own forward,
    so that the look-ahead costs no extra forward of the training batch. The hook stores a reference,
    not a copy, and never changes the forward; :meth:`features_for` checks what it caught.

    A compiled forward runs the hook only when it was registered before that forward's first compilation
    (torch does not recompile for hooks added later); for logits from a compiled graph whose forward the hook
    did not see, :meth:`features_for` runs one no-grad eager forward of the bare model on the batch instead.
    """

    def __init__(self, model: nn.Module) -> None:
        self.root = model
        self.name, self.module = find_head(model)
        prefix = f"{self.name}." if self.name else ""
        self.weight_name, self.bias_name = (
            prefix + "weight",
            (prefix + "bias" if self.module.bias is not None else None),
        )
        self.features: Tensor | None = None
        self._verified = False
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.features = inputs[0]

    def features_for(self, logits: Tensor, inputs: Inputs | None = None) -> Tensor:
        """The detached input of the head from the forward that produced ``logits``.

        The first call also checks that ``logits`` are the head's outputs on those features (the model
        returns its final Linear's outputs unchanged); later calls check the batch size only. When the hook
        caught no forward of this batch and ``logits`` come from a compiled graph, the features are those
        of a no-grad eager forward of ``inputs`` (buffers cloned).

        Raises:
            ValueError: if no forward was caught, it was of another batch, or the outputs are not the head's.
        """
        features = self.features
        if not self._fits(features, logits) and inputs is not None and from_compiled_graph(logits):
            with torch.no_grad(), eager_calls(compiled_in_place(self.root)):
                call_model(self.root, {}, inputs, lambda out: logits)
            features = self.features
        if not self._fits(features, logits):
            raise ValueError("lookahead='head': call step() right after the model's forward on this batch")
        assert features is not None
        if not self._verified:
            with torch.no_grad():
                recomputed = self.module(features)
            if recomputed.shape != logits.shape or not torch.allclose(
                recomputed, logits.detach(), rtol=1e-3, atol=1e-4
            ):
                raise ValueError(
                    f"lookahead='head' needs the model's outputs to be those of its final Linear layer "
                    f"({self.name!r}); pass a list of parameter patterns or a submodule instead"
                )
            self._verified = True
        return features.detach()

    @staticmethod
    def _fits(features: Tensor | None, logits: Tensor) -> bool:
        return features is not None and features.ndim > 0 and features.shape[0] == logits.shape[0]

    def remove(self) -> None:
        """Remove the hook from the model."""
        self._handle.remove()
