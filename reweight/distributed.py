"""Data-parallel ranks as the meta step sees them: a no-op for one process, all-reduces under DDP.

Under ``DistributedDataParallel`` every rank reweights its own shard of the global batch. The
look-ahead must be the one of the global batch and every rank must keep an identical weighting net:

- the weighted training gradient and the meta gradient ``v`` are averaged across ranks, so
  ``theta_hat`` and ``v`` are those of the concatenated batches;
- weight normalisation divides by the global sum of raw weights (a differentiable all-reduce);
- the weighting net's gradients are summed across ranks (each rank holds its samples' share);
- the net's initial parameters are broadcast from rank 0;
- the decision to skip (or raise on) a non-finite loss or meta-gradient is taken jointly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DataParallelGroup", "data_parallel_group"]


class DataParallelGroup:
    """The process group of a DDP-wrapped model; every method is a no-op when ``world_size == 1``."""

    def __init__(self, process_group: object | None = None) -> None:
        self.process_group = process_group
        if process_group is None:
            self.world_size, self.rank = 1, 0
        else:
            import torch.distributed as dist

            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def mean(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Average each tensor across ranks (returns new tensors; not differentiable)."""
        if not self.active:
            return dict(tensors)
        import torch.distributed as dist

        out = {}
        for name, t in tensors.items():
            t = t.detach().clone()
            dist.all_reduce(t, group=self.process_group)
            out[name] = t / self.world_size
        return out

    def all_(self, flag: Tensor) -> bool:
        """Whether ``flag`` holds on every rank (one host sync), so that all ranks take the same branch.

        A rank that skipped a meta update (or raised) while another ran it would leave the collectives
        of the two mismatched and hang; every data-dependent decision of the step goes through here.
        """
        if not self.active:
            return bool(flag)
        import torch.distributed as dist

        t = flag.detach().to(dtype=torch.int32, copy=True).reshape(())  # on the model's device, as NCCL needs
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.process_group)
        return bool(t)

    def sum_differentiable(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over ranks, differentiable (the gradient is summed back)."""
        if not self.active:
            return t
        return _AllReduceSum.apply(t, self.process_group)

    def sum_grads_(self, params: Iterable[nn.Parameter]) -> None:
        """Sum ``.grad`` of ``params`` across ranks, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.process_group)

    def broadcast_(self, tensors: Iterable[Tensor]) -> None:
        """Copy rank 0's values into ``tensors`` on every rank, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, src=src, group=self.process_group)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward sums the incoming gradients over ranks as well.

    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated.)
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: object | None) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def data_parallel_group(model: nn.Module, process_group: object | None = None) -> DataParallelGroup:
    """The data-parallel ranks: ``process_group`` if given, else those of a ``DistributedDataParallel``
    wrapper, else a single process.

    Pass ``process_group`` when the reweighter is given the bare module while the forward runs through a
    wrapper it cannot see (Lightning's strategies, for example).
    """
    if process_group is not None:
        return DataParallelGroup(process_group)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DataParallelGroup(model.process_group)
    return DataParallelGroup(None)
