"""Models sharded by FSDP: two gloo ranks on the CPU.

A model whose parameters are FSDP2 ``DTensor`` shards (``fully_shard`` per Linear, then the root), or a model
under the legacy ``FullyShardedDataParallel`` wrapper (flattened shards), is refused when the reweighter is
built, on every rank, with an error that names the sharding and the alternative (DistributedDataParallel):
the look-ahead would otherwise differentiate the shards, a wrong answer that raises nothing.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rank_processes import spawn_ranks
from torch import nn

from reweight import MetaReweighter

WORLD, FEATURES, HIDDEN, CLASSES = 2, 6, 16, 3

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.LayerNorm(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def _meta(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(5, FEATURES, generator=g), torch.randint(0, CLASSES, (5,), generator=g))]


def _fully_sharded() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _legacy_wrapped() -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(_mlp(), device_id=torch.device("cpu"))


def _construction_error(model: nn.Module, rank: int, **kwargs: Any) -> str:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        MetaReweighter(model, opt, _meta(rank), seed=0, **kwargs)
    except ValueError as err:
        return str(err)
    return "accepted"


def _refusals(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = _fully_sharded()
    out["fully_shard"] = _construction_error(model, rank)
    out["fully_shard_head"] = _construction_error(model, rank, lookahead="head")
    out["fully_shard_kinds"] = sorted({type(p).__name__ for p in model.parameters()})
    out["legacy"] = _construction_error(_legacy_wrapped(), rank)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        torch.save(_refusals(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Run the 2-process group once for every test of this module; returns each rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        return spawn_ranks(_worker, (os.path.join(tmp, "init"), tmp), tmp, WORLD, timeout_s=120)


def test_fully_shard_model_is_refused_at_construction(ranks):
    for rank in ranks:
        assert rank["fully_shard_kinds"] == ["DTensor"]  # the parameters really are sharded
        for key in ("fully_shard", "fully_shard_head"):
            message = rank[key]
            assert "parameter '0.weight' is a DTensor" in message, message
            assert "FSDP2's fully_shard" in message and "DistributedDataParallel" in message, message


def test_legacy_fsdp_wrapper_is_refused_at_construction(ranks):
    for rank in ranks:
        message = rank["legacy"]
        assert "FullyShardedDataParallel" in message and "DistributedDataParallel" in message, message
        assert message.startswith("the model is wrapped in FullyShardedDataParallel"), message
