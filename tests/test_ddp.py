"""Data-parallel training: two CPU processes on gloo reproduce a single process on the concatenated batches.

Each rank trains a DDP-wrapped model on its shard of every global batch and draws meta batches from its
own shard of the meta set. After a few steps the weighting nets must be bit-identical across ranks, and
the model must match one process that trains on the concatenated batches with the concatenated meta
batches. The model has no BatchNorm: per-shard batch statistics differ from the global batch's, so a
BatchNorm model is not expected to match (see docs/distributed.md). A SyncBatchNorm model is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_processes import spawn_ranks
from torch import nn

from reweight import MetaInfoNet, MetaReweighter, NonFiniteLossError

WORLD, SHARD, META_SHARD, STEPS, FEATURES, CLASSES = 2, 6, 5, 5, 6, 3

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class ZeroNoiseMetaInfoNet(MetaInfoNet):
    """MetaInfoNet without sampling noise, so its KL penalty's share can be compared across world sizes."""

    def sample_noise(self, mu: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(mu)


def _model(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if batchnorm:
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, CLASSES))
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def _shard(kind: str, index: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100_000 * (kind == "meta") + 100 * index + rank)
    x = torch.randn(size, FEATURES, generator=g)
    return x, torch.randint(0, CLASSES, (size,), generator=g)


def _batch(kind: str, index: int, rank: int | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s shard, or (``rank=None``) the concatenation of every rank's shard."""
    if rank is not None:
        return _shard(kind, index, rank, size)
    shards = [_shard(kind, index, r, size) for r in range(WORLD)]
    return torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])


CONFIGS: dict[str, dict[str, Any]] = {
    "lossnet": {"net": "lossnet", "meta_sgd": True},  # SGD, not Adam, sees the scale of the net's gradient
    "metainfonet": {"net": "metainfonet-zero-noise", "virtual_step": "optimizer", "momentum": 0.9},
    "logitnet": {"net": "logitnet", "interval": 2, "normalization": "none", "lookahead_lr": 0.05},
    "l2rw": {"net": "l2rw"},
    # a floor that binds on every batch: its blend is computed over the global batch (the veto from the first update,
    # veto_evidence=0, as the test was written: waiting, the veto never acts and the run ends 1.1e-5 from one
    # process's, float noise past this test's 1e-5)
    "lossnet_ess_floor": {"net": "lossnet", "meta_sgd": True, "min_ess": 0.999, "veto_evidence": 0},
    "linear_head": {"net": "lossnet", "lookahead": "head", "meta_sgd": True},
    "finite_difference": {"net": "lossnet", "engine": "finite_difference", "meta_sgd": True},
    # the reweighter gets the bare module and the group explicitly, as under Lightning's strategies
    "bare_module_process_group": {"net": "lossnet", "meta_sgd": True, "bare": True},
    # each sample's loss history: the samples are dealt to the other rank on later steps, so each rank's net
    # reads the history its batch got on both ranks (the global batch's losses are gathered each step)
    "lossnet_history": {"net": "lossnet", "meta_sgd": True, "loss_history": True},
    # a veto that binds on every batch: its threshold is the global batch's mean |c| (LossNet's read at the warm-up
    # factor of the step with veto_warmup=2: the first step's is 1/2)
    # (veto_evidence=0: from the first update, not waiting for evidence of label noise)
    "lossnet_veto": {"net": "lossnet", "meta_sgd": True, "veto": 0.5, "veto_warmup": 2, "veto_evidence": 0},
    "logitnet_class_veto": {
        "net": "logitnet", "meta_sgd": True, "normalization": "class", "veto": 0.5, "veto_center": False,
        "veto_evidence": 0,
    },
    # the veto against each class's (the batch's) weighted mean over the global batch (veto_center)
    "logitnet_class_veto_center": {
        "net": "logitnet", "meta_sgd": True, "normalization": "class", "veto": 0.5, "veto_center": True,
        "veto_evidence": 0,
    },
    "lossnet_veto_center": {"net": "lossnet", "meta_sgd": True, "veto": 0.5, "veto_center": True, "veto_evidence": 0},
    # a class's kept samples take its vetoed share up to 1.2 times their weights, the global batch the rest
    "logitnet_class_veto_refill": {
        "net": "logitnet", "meta_sgd": True, "normalization": "class", "veto": 0.5, "veto_center": True,
        "veto_evidence": 0, "veto_refill": 1.2,
    },
    # the veto waiting for evidence of label noise: the global meta batch's quantile and the global batch's share
    # (training inputs scaled up so that their losses exceed the meta batch's and the threshold is reached within
    # the run: the veto then acts)
    "lossnet_veto_evidence": {
        "net": "lossnet", "meta_sgd": True, "veto": 0.5, "veto_warmup": 0, "veto_evidence": 1e-3, "train_scale": 4.0,
    },
    # under normalization="class" each loss is read against its own class's meta losses, gathered with their labels
    "logitnet_class_veto_evidence": {
        "net": "logitnet", "meta_sgd": True, "normalization": "class", "veto": 0.5, "veto_center": False,
        "veto_warmup": 0, "veto_evidence": 1e-3, "train_scale": 4.0,
    },
    # and waiting for the model's competence on the global meta batch (its accuracy's counts summed over ranks):
    # on these random labels the model stays at chance, and the veto waits although the evidence is shown
    "logitnet_class_veto_competence": {
        "net": "logitnet", "meta_sgd": True, "normalization": "class", "veto": 0.5, "veto_center": False,
        "veto_warmup": 0, "veto_evidence": 1e-3, "veto_competence": 0.05, "train_scale": 4.0,
    },
}
# net="auto" under a loss of the user's: every rank settles it from its first batch (the gated net on these labels)
# and builds it then; MetaInfoNet's sampling noise is drawn per rank, so these are compared with the gated net
# named under the library's loss, in the same group, rather than with one process
SETTLED: dict[str, dict[str, Any]] = {
    "auto_own_loss": {"net": "auto", "loss_fn": "own", "meta_sgd": True},
    "gated_named": {"net": "gated", "uniform_start": True, "meta_sgd": True},
}


def _own_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def _ids(index: int, rank: int | None) -> torch.Tensor:
    """Step ``index``'s sample ids: 12 of 16 samples, shifted by 5 a step, so that a sample returns on the other
    rank; rank ``rank``'s shard, or the whole global batch."""
    ids = (torch.arange(WORLD * SHARD) + 5 * index) % 16
    return ids if rank is None else ids[rank * SHARD : (rank + 1) * SHARD]


def _train(config: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """Train for ``STEPS`` steps as rank ``rank`` of a DDP group, or (``rank=None``) as one process on all data."""
    config = {"veto_competence": 0, **config}  # the random labels here never make the model competent
    momentum = config.pop("momentum", 0.0)
    train_scale = config.pop("train_scale", 1.0)
    meta_opt = torch.optim.SGD if config.pop("meta_sgd", False) else torch.optim.Adam
    meta_lr = 2.0 if meta_opt is torch.optim.SGD else 0.05
    # a random start and no meta warm-up: every layer of the net has a gradient to sum over ranks from the
    # first step and the net moves at its full lr (from the default uniform start, warmed up, it barely moves
    # in STEPS steps); SGD's lr suits the normalised coefficients (sum |c| = 1 over the global batch)
    if config["net"] == "metainfonet-zero-noise":
        torch.manual_seed(1)
        config["net"] = ZeroNoiseMetaInfoNet(CLASSES, kl_weight=1.0, uniform_start=False)
    elif config["net"] not in ("l2rw", "auto") and not config.pop("uniform_start", False):
        config["net_kwargs"] = {"uniform_start": False}
    if config.get("loss_fn") == "own":
        config["loss_fn"] = _own_cross_entropy
    model = _model()
    wrapped = model if rank is None else nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=5e-4 if momentum else 0.0)
    meta = [_batch("meta", k, rank, META_SHARD) for k in range(3)]
    if config.pop("bare", False):
        config["process_group"] = None if rank is None else dist.group.WORLD
        target = model
    else:
        target = wrapped
    rw = MetaReweighter(
        target,
        opt,
        meta,
        seed=0,
        meta_optimizer=lambda p: meta_opt(p, lr=meta_lr),
        meta_warmup=0,
        num_classes=CLASSES,
        **config,
    )
    weights = []
    for t in range(STEPS):
        x, y = _batch("train", t, rank, SHARD)
        x = train_scale * x
        logits = wrapped(x)
        ids = _ids(t, rank) if config.get("loss_history") else None
        w = rw.step(x, y, logits, sample_ids=ids)
        weights.append(w)
        opt.zero_grad()
        (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    net = {} if rw.net is None else {k: v.clone() for k, v in rw.net.state_dict().items()}
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "net": net,
        "weights": torch.cat(weights),
        "engine": rw.engine_name,
        "history": _history_tensors(rw.state_dict()["loss_history"]),
        "evidence": _evidence_tensor(rw),
    }


def _evidence_tensor(rw: MetaReweighter) -> torch.Tensor | None:
    """``[level, shown]`` of the veto's evidence of label noise, then of the model's competence on the meta set if
    the veto waits for it (``None`` when the veto does not wait for evidence)."""
    evidence, competence = rw.noise_evidence, rw.meta_competence
    if evidence is None or evidence.level is None:
        return None
    gates = [evidence] if competence is None else [evidence, competence]
    return torch.stack([t.double() for gate in gates for t in (gate.level, gate.shown)])


def _history_tensors(history: dict[str, Any] | None) -> dict[str, torch.Tensor] | None:
    """The loss history's tensors (every value of a run's result is a tensor or a dict of them: gpu_check)."""
    return None if history is None else {"average": history["average"], "seen": history["seen"]}


def _nonfinite_agreement(rank: int) -> dict[str, Any]:
    """Only rank 0 sees a NaN loss: every rank must take the same decision (no hang, identical nets)."""
    out: dict[str, Any] = {}
    for mode in ("skip", "raise"):
        model = _model()
        wrapped = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        meta = [_batch("meta", 0, rank, META_SHARD)]
        rw = MetaReweighter(wrapped, opt, meta, net="lossnet", seed=0, on_nonfinite=mode)
        x, y = _batch("train", 0, rank, SHARD)
        logits = wrapped(x).detach()
        if rank == 0:
            logits[1, 0] = float("nan")
        try:
            w = rw.step(x, y, logits)
            out[mode] = {"skipped": rw.last_update_skipped, "weights": w, "net": rw.net.state_dict()}
        except NonFiniteLossError:
            out[mode] = "raised"
    return out


def _syncbn(rank: int) -> dict[str, str]:
    """SyncBatchNorm is refused on every rank, for every look-ahead (DDP refuses it on CPU modules itself, so
    the reweighter gets the bare module and the group, as under Lightning)."""
    out = {}
    for lookahead in ("full", "head"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(_model(batchnorm=True))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        meta = [_batch("meta", 0, rank, META_SHARD)]
        try:
            MetaReweighter(model, opt, meta, lookahead=lookahead, process_group=dist.group.WORLD, seed=0)
            out[lookahead] = "accepted"
        except ValueError as err:
            out[lookahead] = str(err)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        results = {name: _train(config, rank) for name, config in {**CONFIGS, **SETTLED}.items()}
        results["nonfinite"] = _nonfinite_agreement(rank)
        results["syncbn"] = _syncbn(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Run the 2-process group once for every test of this module; returns each rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        return spawn_ranks(_worker, (os.path.join(tmp, "init"), tmp), tmp, WORLD, timeout_s=240)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nets_bit_identical_across_ranks(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert a["net"].keys() == b["net"].keys()
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]), key
    for key in a["model"]:  # DDP keeps the model identical too
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_matches_single_process_on_concatenated_batches(ranks, name):
    single = _train(CONFIGS[name], rank=None)
    ddp = ranks[0][name]
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=1e-5, msg=f"model {key}")
    for key, value in single["net"].items():
        torch.testing.assert_close(ddp["net"][key], value, rtol=0, atol=1e-5, msg=f"net {key}")
    # the weights each rank returned are the global batch's weights, shard by shard
    per_step = [torch.cat([r[name]["weights"].view(STEPS, SHARD)[t] for r in ranks]) for t in range(STEPS)]
    torch.testing.assert_close(torch.cat(per_step), single["weights"], rtol=0, atol=1e-5)
    if single["evidence"] is not None:  # the same evidence of label noise (shown within the run at 1e-3)
        torch.testing.assert_close(ddp["evidence"], single["evidence"], rtol=0, atol=1e-9)
        assert bool(single["evidence"][1]) == (CONFIGS[name].get("veto_evidence") == 1e-3)
        waits = "veto_competence" in CONFIGS[name]  # random labels: the model stays at chance on the meta set
        assert len(single["evidence"]) == (4 if waits else 2) and not (waits and bool(single["evidence"][3]))
    # the run is not trivial: the weights vary within the batches (and a veto sets some to zero)
    assert single["weights"].std() > 1e-3
    assert "veto" not in CONFIGS[name] or bool((single["weights"] == 0).any()) != ("veto_competence" in CONFIGS[name])


def test_auto_under_an_own_loss_settles_on_every_rank_as_naming_the_net(ranks):
    for rank in ranks:
        own, named = rank["auto_own_loss"], rank["gated_named"]
        assert own["net"].keys() == named["net"].keys()
        for part in ("model", "net"):
            for key, value in named[part].items():
                assert torch.equal(own[part][key], value), (part, key)
        assert torch.equal(own["weights"], named["weights"]) and named["weights"].std() > 1e-3
    for key, value in ranks[0]["auto_own_loss"]["net"].items():
        assert torch.equal(ranks[1]["auto_own_loss"]["net"][key], value), key


def test_every_rank_keeps_the_global_loss_history(ranks):
    """Each rank's history holds every sample of the global batches, as one process on all the data does."""
    single = _train(CONFIGS["lossnet_history"], rank=None)["history"]
    for rank in ranks:
        history = rank["lossnet_history"]["history"]
        assert torch.equal(history["seen"], single["seen"]) and bool(history["seen"].all())
        torch.testing.assert_close(history["average"], single["average"], rtol=0, atol=1e-6)


def test_auto_engine_under_ddp_is_ghost_where_exact(ranks):
    """The configurations without an engine or head look-ahead ran the ghost engine on every rank."""
    expected = {"linear_head": "linear_head", "finite_difference": "finite_difference"}
    for name in CONFIGS:
        assert {r[name]["engine"] for r in ranks} == {expected.get(name, "ghost")}, name


def test_nonfinite_decision_is_global(ranks):
    """A NaN loss on one rank only: every rank skips (or raises) together instead of deadlocking."""
    a, b = ranks[0]["nonfinite"], ranks[1]["nonfinite"]
    assert a["raise"] == b["raise"] == "raised"
    assert a["skip"]["skipped"] and b["skip"]["skipped"]
    for key in a["skip"]["net"]:
        assert torch.equal(a["skip"]["net"][key], b["skip"]["net"][key])
    assert a["skip"]["weights"][1] == 0 and torch.isfinite(a["skip"]["weights"]).all()
    assert torch.isfinite(b["skip"]["weights"]).all()


def test_syncbatchnorm_is_refused_naming_the_alternative(ranks):
    for rank in ranks:
        for message in rank["syncbn"].values():
            assert "SyncBatchNorm layers ('1')" in message and "plain BatchNorm" in message, message
    # in one process SyncBatchNorm is plain BatchNorm, and accepted
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_model(batchnorm=True))
    MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [_batch("meta", 0, 0, META_SHARD)], seed=0)


@pytest.mark.torchrun
def test_example_launches_with_torchrun():
    """examples/ddp_train.py under ``torchrun --standalone --nproc_per_node=2`` (one epoch).

    Not in the default run: under torch 2.14.1 one rank occasionally aborts at exit inside the full suite
    ("terminate called without an active exception") after training and the cross-rank check completed;
    it has not been reproduced in isolation (docs/distributed.md).
    """
    pytest.importorskip("sklearn")
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(root / "examples" / "ddp_train.py"), "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2" in out.stdout and "weighting net identical on all ranks" in out.stdout
