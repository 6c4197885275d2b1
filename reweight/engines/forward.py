"""Exact meta-gradient with one forward-mode directional derivative, no second-order backward.

``theta_hat`` is linear in the weights, so ``dL_meta/dw_i = -<scale * v, g_i> / n`` with
``v = grad L_meta(theta_hat)``; the ``n`` inner products are one JVP of the per-sample losses.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._batch import call_model
from .._compat import load_jvp_decompositions
from .._profiling import phase
from .base import MetaGradient, MetaProblem, detached_params, lookahead, register_engine

__all__ = ["forward_meta_gradient"]


@register_engine(
    "forward", description="exact: one forward-mode JVP of the per-sample losses", auto=1, coordinate_scales=True
)
def forward_meta_gradient(problem: MetaProblem) -> MetaGradient:
    """Meta-gradient from a JVP of ``theta -> [L_1 .. L_n]`` along ``scale * v`` (``torch.autograd.forward_ad``)."""
    load_jvp_decompositions()
    meta_losses, tangent = lookahead(problem)
    params = detached_params(problem)
    with ExitStack() as stack:
        stack.enter_context(phase("jvp"))
        stack.enter_context(torch.no_grad())
        stack.enter_context(fwAD.dual_level())
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))  # the fused attention kernels have no JVP
        if any(isinstance(m, nn.RNNBase) for m in problem.model.modules()):
            # oneDNN's RNN kernels have no forward-AD formula; the native ones do.
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        duals = {k: fwAD.make_dual(p, tangent[k]) for k, p in params.items()}
        losses = problem.loss_fn(call_model(problem.model, duals, problem.inputs, problem.logits_fn), problem.targets)
        jvp = fwAD.unpack_dual(losses).tangent
    if jvp is None:  # no look-ahead parameter influences the losses
        jvp = torch.zeros_like(problem.weights)
    return MetaGradient(-jvp / problem.global_batch_size, meta_losses)
