"""The trainer integrations with FSDP2 configured: two gloo processes on the CPU.

- Lightning's ``ModelParallelStrategy`` (FSDP2; ``configure_model`` applies ``fully_shard`` on the strategy's
  data-parallel mesh, per Linear then the network): the callback's reweighter takes the sharded ghost path,
  and model and weighting net equal one process (the core ``MetaReweighter``) on the concatenated batches.
- Hugging Face ``Trainer`` with ``fsdp=True, fsdp_config={"version": 2, ...}`` and ``use_cpu=True``: accelerate
  enables its FSDP plugin only on accelerator devices, and on the CPU trains under DistributedDataParallel,
  silently (docs/distributed.md); the test pins that, so that the docs are revisited when it changes, and
  checks that the reweighter is exact there too.

Lightning's legacy ``FSDPStrategy`` (FSDP1) refuses the CPU in the Trainer's constructor; a model under the
``FullyShardedDataParallel`` wrapper is refused by the reweighter (tests/test_fsdp.py).
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if not os.environ.get("CI"):  # CI installs the extras (".[test]") and must run these tests, never skip them
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")

from rank_processes import free_port, launcher_env, spawn_ranks  # noqa: E402
from test_ddp_integrations import (  # noqa: E402
    HF_LOOKAHEAD_LR,
    NET,
    _assert_states,
    _cat,
    _hf_meta,
    _mlp,
    _mlp_meta,
    _single_process,
    _state,
    fit_lightning,
)
from test_integration_transformers import bert, make_trainer, text_dataset  # noqa: E402

WORLD, STEPS = 2, 3

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in module.state_dict().items()
    }


def _lightning_fsdp2(rank: int, tmp: str) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from reweight.integrations.lightning import MetaReweightCallback, reweight_step

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.batches: list[Any] = []

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            weights = reweight_step(self, x, y, logits)
            self.batches.append(((x.clone(), y.clone()), weights.clone()))
            return (weights * F.cross_entropy(logits, y, reduction="none")).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    module = Lit()
    callback = MetaReweightCallback(_mlp_meta(rank), seed=0, **NET)
    fit_lightning(module, callback, ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1), tmp)
    return {
        "kinds": sorted({type(p).__name__ for p in module.parameters()}),
        "engine": callback.reweighter.engine_name,
        "batches": module.batches,
        "model": _full_state(module.net),
        "net": _state(callback.reweighter.net),
    }


def _hf_fsdp2_config(rank: int, tmp: str) -> dict[str, Any]:
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
    model = bert("eager")
    trainer = make_trainer(
        os.path.join(tmp, f"hf-{rank}"),
        model,
        text_dataset(24, 1),
        None,
        steps=STEPS,
        args=fsdp,
        meta_loader=_hf_meta(rank),
        lookahead_lr=HF_LOOKAHEAD_LR,
        reweight_kwargs={"seed": 0, **NET},
    )
    trainer.train()
    return {
        "wrapped": type(trainer.model_wrapped).__name__,
        "batches": trainer.batches,
        "model": _state(model),
        "net": _state(trainer.reweighter.net),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    launcher_env(rank, WORLD, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        results = {"lightning": _lightning_fsdp2(rank, out_dir), "hf": _hf_fsdp2_config(rank, out_dir)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return spawn_ranks(_worker, (free_port(), tmp), tmp, WORLD, timeout_s=300)


@pytest.mark.parametrize("name", ["lightning", "hf"])
def test_nets_and_models_bit_identical_across_ranks(ranks, name):
    for part in ("net", "model"):
        for key, value in ranks[0][name][part].items():
            assert torch.equal(value, ranks[1][name][part][key]), (part, key)


def test_lightning_model_parallel_strategy_fsdp2_matches_one_process(ranks):
    for rank in ranks:  # the network really is sharded, and the reweighter took the sharded path
        assert rank["lightning"]["kinds"] == ["DTensor"] and rank["lightning"]["engine"] == "ghost"
    steps = [_cat([r["lightning"]["batches"][t][0] for r in ranks]) for t in range(STEPS)]
    assert not torch.equal(steps[0][0][:4], steps[0][0][4:])  # each rank saw its own data
    model = _mlp()
    rw = _single_process(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        _mlp_meta(None),
        lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
        steps,
        lambda m, x: m(x),
    )
    _assert_states(ranks[0]["lightning"]["model"], _state(model), "model", rtol=1e-5)
    _assert_states(ranks[0]["lightning"]["net"], _state(rw.net), "net", rtol=1e-5)
    weights = torch.cat([torch.cat([r["lightning"]["batches"][t][1] for r in ranks]) for t in range(STEPS)])
    assert weights.std() > 1e-3


def test_hugging_face_fsdp2_config_trains_under_ddp_on_the_cpu_and_matches_one_process(ranks):
    from reweight.integrations.transformers import per_sample_loss

    # accelerate drops the FSDP plugin on the CPU; when this fails, it shards there: update docs/distributed.md
    assert [r["hf"]["wrapped"] for r in ranks] == ["DistributedDataParallel"] * WORLD
    steps = []
    for t in range(STEPS):
        batch = _cat([r["hf"]["batches"][t][0] for r in ranks])
        steps.append((batch, batch.pop("labels")))
    model = bert("eager")
    rw = _single_process(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        [(dict(b), b["labels"]) for b in _hf_meta(None)],
        per_sample_loss("sequence_classification"),
        steps,
        lambda m, inputs: m(**inputs),
        lookahead_lr=HF_LOOKAHEAD_LR,
    )
    _assert_states(ranks[0]["hf"]["model"], _state(model), "model")
    _assert_states(ranks[0]["hf"]["net"], _state(rw.net), "net")
    assert torch.cat([w for _, w in ranks[0]["hf"]["batches"]]).std() > 1e-3
