"""Models sharded by FSDP: two gloo ranks on the CPU.

FSDP2 models (``fully_shard`` per unit, then the root) trained for a few steps with the ``ghost`` engine
must match one process on the concatenated batches (weights, weighting net, model) and the step must leave
the user's shards, ``.grad`` and optimizer state as they were: an MLP with LayerNorm (per Linear), a
transformer with an embedding, a bare position table and ``nn.MultiheadAttention`` (per block; also with
one block called twice, and with ``reshard_after_forward=False``), a GroupNorm CNN (per conv block), and
peft LoRA on the MLP and the transformer (frozen base weights and trained adapters in one unit), whose
look-ahead must move the adapters alone. What is not exact is refused when the reweighter is built, on
every rank, with an error that names the sharding and the alternative (DistributedDataParallel): an engine
without FSDP2 support (``forward``, ``lookahead="head"``), and a model under the legacy
``FullyShardedDataParallel`` wrapper (flattened shards). The look-ahead would otherwise differentiate the
shards, a wrong answer that raises nothing.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_processes import spawn_ranks
from torch import nn

from reweight import MetaInfoNet, MetaReweighter

WORLD, FEATURES, HIDDEN, CLASSES, SHARD, META_SHARD, STEPS = 2, 6, 16, 3, 6, 5, 3
VOCAB, LENGTH, DIM = 11, 5, 8

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.LayerNorm(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


class _Block(nn.Module):
    """A pre-norm transformer block: ``nn.MultiheadAttention`` (batch first) and a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm1(h)
        h = h + self.attn(x, x, x, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class _Transformer(nn.Module):
    """Token embedding plus a bare position table (an ``nn.Parameter`` of the root), two blocks (or, with
    ``shared``, one block applied twice), a final LayerNorm, mean pooling over the sequence and a Linear head."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(0.5 * torch.randn(1, LENGTH, DIM))
        self.blocks = nn.ModuleList(_Block() for _ in range(1 if shared else 2))
        self.order = [0, 0] if shared else [0, 1]
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        for i in self.order:
            h = self.blocks[i](h)
        return self.head(self.norm(h).mean(1))


def _transformer(shared: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return _Transformer(shared)


def _cnn() -> nn.Module:
    """Two Conv2d + GroupNorm + ReLU blocks on 3x8x8 images, average pooling and a Linear head."""
    torch.manual_seed(0)

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(2, cout), nn.ReLU())

    return nn.Sequential(block(3, 4, 1), block(4, 6, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, CLASSES))


def _shard_units(model: nn.Module, units: list[nn.Module], reshard_after_forward: bool = True) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
    return fully_shard(model, reshard_after_forward=reshard_after_forward)


def _lora(build: Callable[[], nn.Module], targets: list[str]) -> nn.Module:
    """``build()`` under peft's LoRA on ``targets`` (rank 2), its base weights frozen; LoRA's B starts at zero,
    so it is drawn here for the adapters to do something."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    return model


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], list[nn.Module]]]] = {
    # the single-process model, and the sub-modules fully_shard makes units of (then the root)
    "mlp": (_mlp, lambda m: [layer for layer in m if isinstance(layer, nn.Linear)]),
    "transformer": (_transformer, lambda m: list(m.blocks)),
    # one unit called twice per forward (its parameters gathered twice)
    "shared_transformer": (lambda: _transformer(shared=True), lambda m: list(m.blocks)),
    "cnn": (_cnn, lambda m: [m[0], m[1]]),
    # LoRA: each adapted Linear a unit (its frozen base weight and trained adapters together), then the root
    "lora_mlp": (lambda: _lora(_mlp, ["0", "3"]), _lora_layers),
    # LoRA on the blocks' MLPs: each block a unit of frozen attention and norms and trained adapters
    "lora_transformer": (lambda: _lora(_transformer, ["mlp.0", "mlp.2"]), lambda m: list(m.base_model.model.blocks)),
}
HAS_PEFT = importlib.util.find_spec("peft") is not None


def _inputs(model: str, size: int, g: torch.Generator) -> torch.Tensor:
    if model.endswith("transformer"):
        return torch.randint(0, VOCAB, (size, LENGTH), generator=g)
    if model == "cnn":
        return torch.randn(size, 3, 8, 8, generator=g)
    return torch.randn(size, FEATURES, generator=g)


def _meta(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(5, FEATURES, generator=g), torch.randint(0, CLASSES, (5,), generator=g))]


class ZeroNoiseMetaInfoNet(MetaInfoNet):
    """MetaInfoNet without sampling noise, so its KL penalty's share can be compared across world sizes."""

    def sample_noise(self, mu: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(mu)


def _shard(model: str, kind: str, index: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100_000 * (kind == "meta") + 100 * index + rank)
    return _inputs(model, size, g), torch.randint(0, CLASSES, (size,), generator=g)


def _batch(model: str, kind: str, index: int, rank: int | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s shard, or (``rank=None``) the concatenation of every rank's shard."""
    if rank is not None:
        return _shard(model, kind, index, rank, size)
    shards = [_shard(model, kind, index, r, size) for r in range(WORLD)]
    return torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])


LOSSNET = {"net": "lossnet", "meta_sgd": True}  # SGD, not Adam, sees the scale of the net's gradient
# Adam on the MetaInfoNet runs: normalised weights make some of the net's gradient zero up to rounding, and
# within classes (the default for a net that reads the logits) more of it, which Adam's first steps turn into
# full-lr moves of either sign; so these runs normalise over the batch, and the class normalisation is checked
# with LossNet's SGD meta optimizer (SGD at this lr makes the bottleneck's KL term diverge)
METAINFONET = {"net": "metainfonet-zero-noise", "virtual_step": "optimizer", "momentum": 0.9, "normalization": "sum"}
CONFIGS: dict[str, dict[str, Any]] = {  # each run: a model of MODELS and the reweighter's options
    "lossnet": {"model": "mlp", **LOSSNET},
    "metainfonet": {"model": "mlp", **METAINFONET},
    "cnn_lossnet_class": {"model": "cnn", **LOSSNET, "normalization": "class"},
    "lossnet_interval": {"model": "mlp", "net": "lossnet", "interval": 2, "meta_sgd": True, "lookahead_lr": 0.05},
    # linear_head has no FSDP2 path (auto takes ghost there); the single process runs ghost too
    "head": {"model": "mlp", "net": "lossnet", "lookahead": "head", "engine": "ghost", "meta_sgd": True},
    "transformer_lossnet": {"model": "transformer", **LOSSNET},
    "transformer_metainfonet": {"model": "transformer", **METAINFONET},
    # every unit keeps its parameters gathered from the forward to the backward
    "transformer_kept_lossnet": {"model": "transformer", "reshard_after_forward": False, **LOSSNET},
    "shared_transformer_lossnet": {"model": "shared_transformer", **LOSSNET},
    "cnn_lossnet": {"model": "cnn", **LOSSNET},
    "cnn_metainfonet": {"model": "cnn", **METAINFONET},
    # each sample's loss history, gathered over ranks: samples return on the other rank on later steps
    "lossnet_history": {"model": "mlp", **LOSSNET, "loss_history": True},
}
if HAS_PEFT:
    CONFIGS["lora_mlp_lossnet"] = {"model": "lora_mlp", **LOSSNET}
    CONFIGS["lora_transformer_metainfonet"] = {"model": "lora_transformer", **METAINFONET}


def _full(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def _train(config: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """``STEPS`` steps as rank ``rank`` of an FSDP2 model, or (``rank=None``) as one process on all data."""
    config = dict(config)
    name = config.pop("model")
    reshard_after_forward = config.pop("reshard_after_forward", True)
    momentum = config.pop("momentum", 0.0)
    meta_opt = torch.optim.SGD if config.pop("meta_sgd", False) else torch.optim.Adam
    meta_lr = 2.0 if meta_opt is torch.optim.SGD else 0.05
    # as tests/test_ddp.py: a random start and no meta warm-up, so that every layer of the net has a gradient
    # to sum over ranks from the first step and the net moves at its full lr; the SGD lr suits the normalised
    # coefficients (sum |c| = 1). From the uniform start, normalised weights make the last bias's gradient zero
    # up to rounding, which Adam's first step turns into a full-lr move of either sign on each side.
    if config["net"] == "metainfonet-zero-noise":
        torch.manual_seed(1)
        config["net"] = ZeroNoiseMetaInfoNet(CLASSES, kl_weight=1.0, uniform_start=False)
    else:
        config.setdefault("net", "lossnet")
        config["net_kwargs"] = {"uniform_start": False}
    build, units = MODELS[name]
    model = build()
    if rank is not None:
        model = _shard_units(model, units(model), reshard_after_forward)
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters alone
    opt = torch.optim.SGD(trained, lr=0.1, momentum=momentum, weight_decay=5e-4 if momentum else 0.0)
    meta = [_batch(name, "meta", k, rank, META_SHARD) for k in range(3)]
    rw = MetaReweighter(
        model,
        opt,
        meta,
        seed=0,
        meta_optimizer=lambda p: meta_opt(p, lr=meta_lr),
        meta_warmup=0,
        num_classes=CLASSES,
        **config,
    )
    weights, untouched, moved = [], [], []
    for t in range(STEPS):
        x, y = _batch(name, "train", t, rank, SHARD)
        logits = model(x)
        before = _local_state(model, opt)
        ids = None
        if config.get("loss_history"):  # 2 * SHARD of 16 sample ids, shifted by 5 a step; this rank's shard
            ids = (torch.arange(2 * SHARD) + 5 * t) % 16
            ids = ids if rank is None else ids[rank * SHARD : (rank + 1) * SHARD]
        with _watching_moves(model, moved):
            w = rw.step(x, y, logits, sample_ids=ids)
        untouched.append(_same(before, _local_state(model, opt)))
        weights.append(w)
        opt.zero_grad(set_to_none=t % 2 == 0)  # stale zero .grad on odd steps: the step must keep them
        (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    return {
        "model": _full(model.state_dict()),
        "net": {k: v.clone() for k, v in rw.net.state_dict().items()},
        "weights": torch.cat(weights),
        "engine": rw.engine_name,
        "untouched": untouched,
        "moved": moved,
    }


@contextmanager
def _watching_moves(model: nn.Module, moved: list[set[str]]) -> Iterator[None]:
    """Record in ``moved``, for each look-ahead of a sharded step, the names of the parameters whose local
    shard the look-ahead changed (as the meta batch's forward sees them)."""
    import reweight.engines.ghost.sharded as ghost_sharded

    original = ghost_sharded.moved_shards

    @contextmanager
    def watched(params: Any, grads: Any, step: Any) -> Iterator[None]:
        before = {n: p.to_local().clone() for n, p in model.named_parameters()}
        with original(params, grads, step):
            moved.append({n for n, p in model.named_parameters() if not torch.equal(p.to_local(), before[n])})
            yield

    ghost_sharded.moved_shards = watched  # type: ignore[assignment]
    try:
        yield
    finally:
        ghost_sharded.moved_shards = original


def _local_state(model: nn.Module, opt: torch.optim.Optimizer) -> list[Any]:
    def local(t: Any) -> Any:
        if t is None:
            return None
        t = t.to_local() if hasattr(t, "to_local") else t
        return (t.detach().clone(), t.data_ptr())

    # the optimizer's parameters: the DTensor shards (the root unit's module attributes stay gathered after
    # the caller's forward until the step reshards them; FSDP gathers them again for the backward)
    state = [(local(p), local(p.grad)) for g in opt.param_groups for p in g["params"]]
    state += [(k, local(v)) for s in opt.state.values() for k, v in s.items() if isinstance(v, torch.Tensor)]
    return state


def _same(a: list[Any], b: list[Any]) -> bool:
    def equal(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, tuple | list):
            return type(x) is type(y) and len(x) == len(y) and all(equal(u, v) for u, v in zip(x, y))
        return x == y

    return equal(a, b)


def _fully_sharded() -> nn.Module:
    model = _mlp()
    return _shard_units(model, MODELS["mlp"][1](model))


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
    out["fully_shard_forward"] = _construction_error(model, rank, engine="forward")
    out["fully_shard_head"] = _construction_error(model, rank, lookahead="head", engine="linear_head")
    out["fully_shard_kinds"] = sorted({type(p).__name__ for p in model.parameters()})
    out["legacy"] = _construction_error(_legacy_wrapped(), rank)
    return out


def _dropout_masks(rank: int) -> dict[str, Any]:
    """One meta update of an FSDP2 MLP with dropout: the masks its forwards drew inside ``step``, in order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Dropout(0.5), nn.Linear(HIDDEN, CLASSES))
    model = _shard_units(model, [model[0], model[3]])
    masks: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda module, args, out: masks.append((args[0] != 0) & (out == 0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = [_batch("mlp", "meta", 0, rank, META_SHARD)]
    rw = MetaReweighter(model, opt, meta, net="lossnet", seed=0, meta_warmup=0, net_kwargs={"uniform_start": False})
    x, y = _batch("mlp", "train", 0, rank, SHARD)
    logits = model(x)
    masks.clear()
    weights = rw.step(x, y, logits)
    return {"masks": masks, "weights": weights, "engine": rw.engine_name}


def _run(name: str, rank: int) -> dict[str, Any]:
    """``_train`` of one run, or the traceback of its failure (the other runs go on)."""
    try:
        return _train(CONFIGS[name], rank)
    except Exception:  # noqa: BLE001  (reported by the test of this run)
        return {"error": traceback.format_exc()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {name: _run(name, rank) for name in CONFIGS}
        results["refusals"] = _refusals(rank)
        results["dropout"] = _dropout_masks(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Run the 2-process group once for every test of this module; returns each rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        return spawn_ranks(_worker, (os.path.join(tmp, "init"), tmp), tmp, WORLD, timeout_s=120)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_matches_single_process_on_concatenated_batches(ranks, name):
    for rank in ranks:
        assert "error" not in rank[name], rank[name]["error"]
    single = _train(CONFIGS[name], rank=None)
    assert single["engine"] == "ghost" and {r[name]["engine"] for r in ranks} == {"ghost"}
    for rank in ranks:  # every rank holds the same net, and the same gathered model
        for key, value in single["model"].items():
            torch.testing.assert_close(rank[name]["model"][key], value, rtol=0, atol=1e-5, msg=f"model {key}")
        for key, value in single["net"].items():
            torch.testing.assert_close(rank[name]["net"][key], value, rtol=0, atol=1e-5, msg=f"net {key}")
    for key in ranks[0][name]["net"]:
        assert torch.equal(ranks[0][name]["net"][key], ranks[1][name]["net"][key]), key
    per_step = [torch.cat([r[name]["weights"].view(STEPS, SHARD)[t] for r in ranks]) for t in range(STEPS)]
    torch.testing.assert_close(torch.cat(per_step), single["weights"], rtol=0, atol=1e-5)
    assert single["weights"].std() > 1e-3  # the run is not trivial: the weights vary within the batches


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_step_leaves_shards_grads_and_optimizer_state_untouched(ranks, name):
    for rank in ranks:
        assert rank[name]["untouched"] == [True] * STEPS


def test_fsdp2_second_training_forward_replays_the_first_ones_dropout_masks(ranks):
    for rank in ranks:
        result = rank["dropout"]
        assert result["engine"] == "ghost"
        train = [m for m in result["masks"] if m.shape == (SHARD, HIDDEN)]  # the meta batch has META_SHARD rows
        assert len(train) == 2 and len(result["masks"]) == 3  # G's forward, the weighted gradient's, the meta's
        assert torch.equal(train[0], train[1]) and 0.2 < train[0].float().mean() < 0.8
        assert torch.isfinite(result["weights"]).all() and result["weights"].std() > 0


@pytest.mark.parametrize("name", [name for name in CONFIGS if name.startswith("lora")])
def test_fsdp2_lora_lookahead_moves_the_adapters_alone(ranks, name):
    for rank in ranks:
        assert "error" not in rank[name], rank[name]["error"]
    adapters = {key for key in ranks[0][name]["model"] if ".lora_" in key}
    frozen = set(ranks[0][name]["model"]) - adapters
    assert adapters and any(key.endswith("base_layer.weight") for key in frozen)
    # every look-ahead (one per step) moved every adapter (on one rank's shard or the other) and nothing else
    moved = [set().union(*(rank[name]["moved"][t] for rank in ranks)) for t in range(STEPS)]
    assert moved == [adapters] * STEPS, moved


def test_fully_shard_without_a_sharded_engine_is_refused_at_construction(ranks):
    for rank in ranks:
        assert rank["refusals"]["fully_shard_kinds"] == ["DTensor"]  # the parameters really are sharded
        for key, engine in (("fully_shard_forward", "forward"), ("fully_shard_head", "linear_head")):
            message = rank["refusals"][key]
            assert "DTensor shards of FSDP2's fully_shard" in message, message
            assert f"engine {engine!r} does not support them (engines that do: ['ghost'])" in message, message
            assert "DistributedDataParallel" in message, message


def test_legacy_fsdp_wrapper_is_refused_at_construction(ranks):
    for rank in ranks:
        message = rank["refusals"]["legacy"]
        assert "FullyShardedDataParallel" in message and "DistributedDataParallel" in message, message
        assert message.startswith("the model is wrapped in FullyShardedDataParallel"), message
