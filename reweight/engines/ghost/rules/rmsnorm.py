"""RMS normalisation: ``F.rms_norm`` (``nn.RMSNorm``) of data, and the hand-written form of HF models.

``F.rms_norm(x, shape, weight)`` of data keeps per sample ``sum G * x_hat`` over the positions, as a layer
norm does (:class:`~.norm.AffineNormRule`). HF Llama, Mistral, Qwen and Gemma write their RMSNorm as
``weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))``: only the last ``mul`` takes the
parameter, and it is a scale of data (:class:`~.scale.ScaleRule`, exact); so this rule also covers, for the
static check, every layer whose class name ends in ``RMSNorm``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..records import Record, bind
from .norm import AffineNormRule

__all__ = ["RMSNormRule"]


class RMSNormRule(AffineNormRule):
    functions = (F.rms_norm,)
    modules = (nn.RMSNorm,)
    signature = (("input", "normalized_shape", "weight", "eps"), (None, None))

    def covers(self, module: nn.Module) -> bool:
        return isinstance(module, self.modules) or type(module).__name__.endswith("RMSNorm")

    def arguments(self, rec: Record) -> list:
        x, shape, weight, eps = bind(rec.args, rec.kwargs, *self.signature)
        return [x, shape, weight, None, eps]

    def normalise(self, x: Tensor, shape: object, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        """``F.rms_norm`` (it has no bias: none is ever passed but the engine's zero)."""
        return F.rms_norm(x, shape, weight, eps)  # type: ignore[arg-type]

    def positions(self, rec: Record, b: list) -> list[int]:
        return [d for d in range(b[0].ndim - len(b[1])) if d != rec.batch_dim]

    def record_problem(self, args: tuple, kwargs: dict, out: Tensor, batch_dim: int) -> str | None:
        shape = bind(args, kwargs, *self.signature)[1]
        return "rms_norm normalises over the batch dimension" if batch_dim >= out.ndim - len(shape) else None
