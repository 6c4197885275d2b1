"""Data-parallel ranks as the meta step sees them: a no-op for one process, all-reduces under DDP.

Under ``DistributedDataParallel`` every rank reweights its own shard of the global batch. The
look-ahead must be the one of the global batch and every rank must keep an identical weighting net:

- the weighted training gradient and the meta gradient ``v`` are averaged across ranks, so
  ``theta_hat`` and ``v`` are those of the concatenated batches;
- weight normalisation divides by the global sum of raw weights (a differentiable all-reduce);
- the weighting net's gradients are summed across ranks (each rank holds its samples' share);
- the net's initial parameters are broadcast from rank 0;
- the decision to skip (or raise on) a non-finite loss or meta-gradient is taken jointly;
- an error raised by one rank's local checks reaches every rank: the first collective of a step carries
  an error flag (no extra collective while every rank is healthy), and every rank then raises a
  :class:`DistributedStepError` naming the failing ranks and their errors.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # torch.distributed may be missing at run time (builds without it)
    from torch.distributed import ProcessGroup

__all__ = [
    "DataParallelGroup",
    "DistributedStepError",
    "check_parameter_kinds",
    "check_sync_batchnorm",
    "data_parallel_group",
]

_MAX_MESSAGE = 2000  # characters of each failing rank's message that travel to the other ranks


class DistributedStepError(RuntimeError):
    """A data-parallel step failed on some rank; raised on every rank of the group.

    Every rank raises an instance whose class also derives from the failing rank's error type when that
    type can be found on this rank (for example ``ValueError`` or
    :class:`~reweight.NonFiniteLossError`), so ``except ValueError`` catches it on every rank exactly as it
    would in one process. On the failing rank the original exception is chained as ``__cause__``.

    Attributes:
        failures: ``{rank: "ErrorType: message"}`` for every rank that failed (ranks in the group).
        world_size: the number of ranks in the group.

    Example:
        >>> err = DistributedStepError({1: "ValueError: labels must lie in [0, 3)"}, world_size=2)
        >>> err.rank, str(err).split(" (")[0]
        (1, 'step() failed on rank 1 of 2')
    """

    def __init__(self, failures: Mapping[int, str], world_size: int) -> None:
        self.failures = dict(sorted(failures.items()))
        self.world_size = world_size
        ranks = ", ".join(map(str, self.failures))
        detail = "; ".join(f"rank {r}: {m}" for r, m in self.failures.items())
        plural = "s" if len(self.failures) > 1 else ""
        super().__init__(
            f"step() failed on rank{plural} {ranks} of {world_size} ({detail}); every rank raises this error "
            "and the step changed nothing"
        )

    @property
    def rank(self) -> int:
        """The lowest failing rank."""
        return next(iter(self.failures))

    def __reduce__(self) -> tuple[Any, ...]:  # the combined classes are made at run time
        base = next((c for c in type(self).__mro__[1:] if c not in _COMBINED_BASES), RuntimeError)
        return _rebuild_step_error, (self.failures, self.world_size, base)


_COMBINED: dict[type, type] = {}
_COMBINED_BASES = frozenset({DistributedStepError, RuntimeError, Exception, BaseException, object})


def _combined(base: type | None) -> type[DistributedStepError]:
    """``DistributedStepError`` that is also a ``base`` (cached); the plain class when that is impossible."""
    if base is None or not issubclass(base, Exception) or issubclass(base, DistributedStepError):
        return DistributedStepError
    if issubclass(DistributedStepError, base):
        return DistributedStepError
    if base not in _COMBINED:
        try:
            cls = type(f"DistributedStepError[{base.__name__}]", (DistributedStepError, base), {})
        except TypeError:  # incompatible instance layouts (OSError, ...)
            cls = DistributedStepError
        cls.__module__ = __name__
        _COMBINED[base] = cls
    return _COMBINED[base]


def _rebuild_step_error(failures: Mapping[int, str], world_size: int, base: type) -> DistributedStepError:
    cls = _combined(base)
    err = cls.__new__(cls)
    DistributedStepError.__init__(err, failures, world_size)
    return err


def _describe(error: BaseException) -> tuple[list[tuple[str, str]], str]:
    """What travels to the other ranks: the error's classes (module, qualname) and a short message."""
    classes = [(c.__module__, c.__qualname__) for c in type(error).__mro__ if issubclass(c, Exception)]
    message = f"{type(error).__name__}: {error}"
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return classes, message


def _resolve(classes: Iterable[tuple[str, str]]) -> type | None:
    """The first of ``classes`` already imported in this process (nothing is imported here)."""
    for module, qualname in classes:
        obj: Any = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and issubclass(obj, Exception):
            return obj
    return None


class DataParallelGroup:
    """The process group of a DDP-wrapped model; every method is a no-op when ``world_size == 1``."""

    def __init__(self, process_group: ProcessGroup | None = None) -> None:
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

    def all_(self, flag: Tensor | None, error: BaseException | None = None, *, device: Any = None) -> bool:
        """Whether ``flag`` holds on every rank (one host sync), so that all ranks take the same branch.

        A rank that skipped a meta update (or raised) while another ran it would leave the collectives
        of the two mismatched and hang; every data-dependent decision of the step goes through here.

        The same all-reduce carries an error flag: a rank whose local checks raised passes ``error``
        (``flag`` is then ignored), and every rank raises a :class:`DistributedStepError` naming the failing
        ranks and their messages. Only then does a second collective gather those messages.

        Args:
            flag: a boolean scalar tensor on the model's device (or a bool), or ``None`` with ``error``.
            error: this rank's exception from checks made before the step's first collective.
            device: where to build the flag when ``flag`` is ``None`` (NCCL needs the model's device).

        Raises:
            DistributedStepError: on every rank, if some rank passed an ``error``; ``error`` itself
                (unchanged) in a single process.
        """
        if not self.active:
            if error is not None:
                raise error
            return bool(flag)
        import torch.distributed as dist

        # 1 (or 0) where the flag holds (or not); ``rank - world`` (< 0) where the rank failed; MIN over ranks
        if error is None:
            assert flag is not None
            code = torch.as_tensor(flag, device=device).detach().to(dtype=torch.int32, copy=True).reshape(())
        else:
            if device is None and isinstance(flag, Tensor):
                device = flag.device
            code = torch.full((), self.rank - self.world_size, dtype=torch.int32, device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MIN, group=self.process_group)
        value = int(code)
        if value < 0:
            self._raise_failures(error)
        return bool(value)

    def _raise_failures(self, error: BaseException | None) -> None:
        """Gather every failing rank's error (a second collective, on failure only) and raise it here."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, None if error is None else _describe(error), group=self.process_group)
        failures = {r: g[1] for r, g in enumerate(gathered) if g is not None}
        first = gathered[min(failures)]
        raise _combined(_resolve(first[0]))(failures, self.world_size) from error

    def cat(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` concatenated in rank order along the first dimension, whose sizes may differ (two
        collectives; one host sync, for the sizes); ``t`` itself in a single process."""
        if not self.active:
            return t
        import torch.distributed as dist

        size = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.process_group)
        counts = torch.cat(sizes).tolist()
        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.process_group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

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
    def forward(ctx: Any, t: Tensor, group: ProcessGroup | None) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def check_sync_batchnorm(module: nn.Module, group: DataParallelGroup) -> None:
    """Refuse a model with ``SyncBatchNorm`` layers under data parallelism.

    The look-ahead runs the model statelessly, under forward-mode AD (``"forward"``, which
    ``SyncBatchNorm``'s autograd function does not support) or inside the engines between their own
    all-reduces; its exactness under DDP is untested (``SyncBatchNorm`` needs GPUs, the tests run on CPU).

    Raises:
        ValueError: naming the layers and the alternative.

    Example:
        >>> check_sync_batchnorm(nn.SyncBatchNorm(4), DataParallelGroup())  # one process: plain BatchNorm
    """
    if not group.active:
        return
    names = [name for name, m in module.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if names:
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(
            f"the model has SyncBatchNorm layers ({shown}), which the data-parallel look-ahead does not support; "
            "keep plain BatchNorm (each rank normalises by its shard's batch statistics, see docs/distributed.md): "
            "do not call nn.SyncBatchNorm.convert_sync_batchnorm (Lightning: sync_batchnorm=False; timm: no --sync-bn)"
        )


def _legacy_fsdp_type() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a torch built without distributed
        return None
    return FullyShardedDataParallel


def check_parameter_kinds(model: nn.Module, module: nn.Module, lookahead: Iterable[tuple[str, Tensor]]) -> bool:
    """Refuse parameters the look-ahead cannot use, before anything is built; whether they are FSDP2 shards.

    A model under the ``FullyShardedDataParallel`` wrapper (flattened shards), ``DTensor`` parameters that are
    not FSDP2's plain ``Shard(0)`` on a 1-D mesh (tensor parallelism, HSDP, a mixed-precision or offload
    policy: :func:`reweight.sharded.sharded_layout_problem`), or a look-ahead parameter of a tensor subclass it
    does not know would give a meta-gradient of the shards or of the subclass's storage: a wrong answer that
    raises nothing. FSDP2 shards themselves are accepted here (``True``): the engine selection then keeps
    the engines that declare ``sharded`` (:class:`~reweight.engines.base.EngineSpec`).

    Raises:
        ValueError: naming the parameter or wrapper and the alternative.
    """
    from .sharded import ALTERNATIVE, dtensor_type, sharded_layout_problem

    legacy = _legacy_fsdp_type()
    if legacy is not None and any(isinstance(m, legacy) for m in (model, *module.modules())):
        raise ValueError(
            "the model is wrapped in FullyShardedDataParallel, whose flattened parameter shards the look-ahead "
            f"cannot use; use FSDP2's fully_shard (engine 'ghost'), or {ALTERNATIVE}"
        )
    sharded = dtensor_type()
    names = [] if sharded is None else [name for name, p in module.named_parameters() if isinstance(p, sharded)]
    if names:
        problem = sharded_layout_problem(module)
        if problem is not None:
            raise ValueError(
                f"parameter {names[0]!r} is a DTensor the look-ahead cannot use exactly: {problem}; {ALTERNATIVE}"
            )
        return True
    for name, p in lookahead:
        if type(p) not in (nn.Parameter, Tensor):
            raise ValueError(
                f"look-ahead parameter {name!r} is a {type(p).__name__}, a tensor subclass the look-ahead does "
                "not support; exclude it with lookahead= (name patterns or a submodule) or freeze it"
            )
    return False


def data_parallel_group(model: nn.Module, process_group: ProcessGroup | None = None) -> DataParallelGroup:
    """The data-parallel ranks: ``process_group`` if given, else those of a ``DistributedDataParallel``
    wrapper, else those of an FSDP2 model's device mesh, else a single process.

    Pass ``process_group`` when the reweighter is given the bare module while the forward runs through a
    wrapper it cannot see (Lightning's strategies, for example).
    """
    if process_group is not None:
        return DataParallelGroup(process_group)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DataParallelGroup(model.process_group)
    from .sharded import fsdp_process_group

    return DataParallelGroup(fsdp_process_group(model))
