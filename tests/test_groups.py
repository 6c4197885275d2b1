"""Learned source weights: ``net="groups"`` (one weight per data source, optionally times a per-sample net).

The group net's meta-gradient must be exact (equal to ``reverse``'s, and to the per-group sums of the per-sample
coefficients), identical across data-parallel ranks and equal to one process, exactly resumable, and every misuse
of ``groups=`` must be refused with a message naming ``groups``.
"""

from __future__ import annotations

import io
import os
import tempfile
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_processes import spawn_ranks
from torch import nn

from reweight import MetaReweighter
from reweight.nets import GroupNet
from reweight.options import group_meta_optimizer

FEATURES, CLASSES, GROUPS = 6, 3, 3


def _mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES)).to(dtype)


def _data(n: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g, dtype=dtype)
    return x, torch.randint(0, CLASSES, (n,), generator=g), torch.randint(0, GROUPS, (n,), generator=g)


def _group_net(within=None, seed: int = 3) -> GroupNet:
    torch.manual_seed(seed)
    net = GroupNet(GROUPS, within=within, num_classes=CLASSES).double()
    with torch.no_grad():
        net.theta.copy_(torch.randn(GROUPS, dtype=torch.float64) * 0.02)  # unequal weights: a general point
    return net


def _sgd(params):
    return torch.optim.SGD(params, lr=0.0)  # the gradient stays in .grad, the net does not move


def _meta_grads(net: nn.Module, engine: str, groups: torch.Tensor | None = None, **kwargs) -> list[torch.Tensor]:
    model = _mlp()
    x, y, g = _data(12, seed=1)
    meta = [_data(10, seed=2)[:2]]
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rw = MetaReweighter(model, opt, meta, net=net, engine=engine, meta_optimizer=_sgd, seed=0, **kwargs)
    rw.step(x, y, model(x), groups=g if groups is None else groups)
    return [p.grad.clone() for p in net.parameters()]


class PerSampleWeights(nn.Module):
    """A 'net' whose weights are its parameter: its gradient is the per-sample coefficient ``c_i = dL_meta/dw_i``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n, dtype=torch.float64))

    def forward(self, loss, logits, targets):
        return self.w


@pytest.mark.parametrize("engine", ["ghost", "ghost_lean", "forward", "finite_difference"])
@pytest.mark.parametrize("within", [None, "lossnet", "metainfonet"])
def test_group_meta_gradient_equals_reverse(engine, within):
    expected = _meta_grads(_group_net(within), "reverse")
    got = _meta_grads(_group_net(within), engine)
    rtol, atol = (1e-4, 1e-9) if engine == "finite_difference" else (1e-7, 1e-12)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
    assert expected[0].abs().max() > 1e-6  # the meta-gradient is not trivially zero


@pytest.mark.parametrize("engine", ["reverse", "ghost"])
def test_group_gradient_is_the_sum_of_per_sample_coefficients(engine):
    """With ``normalization="none"`` the weight of sample i is ``w_{g_i}``, so ``dL/dw_g = sum_{i in g} c_i``."""
    _, _, g = _data(12, seed=1)
    model_net = PerSampleWeights(12)  # at the group net's weights: c depends on where it is taken
    with torch.no_grad():
        model_net.w.copy_(_group_net().group_weights()[g])
    model = _mlp()
    x, y, _ = _data(12, seed=1)
    meta = [_data(10, seed=2)[:2]]
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rw = MetaReweighter(model, opt, meta, net=model_net, engine=engine, meta_optimizer=_sgd, normalization="none")
    rw.step(x, y, model(x))
    coefficients = model_net.w.grad
    per_group = torch.zeros(GROUPS, dtype=torch.float64).index_add_(0, g, coefficients)

    net = _group_net()
    (theta_grad,) = _meta_grads(net, engine, normalization="none")
    jacobian = torch.autograd.functional.jacobian(lambda t: GROUPS * torch.softmax(net.scale * t, 0), net.theta)
    torch.testing.assert_close(theta_grad, jacobian.T @ per_group, rtol=1e-7, atol=1e-12)
    # and with the library's "sum" normalisation it is the same chain rule through the normalisation
    (theta_sum,) = _meta_grads(_group_net(), engine)
    n = torch.tensor(12.0, dtype=torch.float64)

    def normalised(t):
        raw = (GROUPS * torch.softmax(net.scale * t, 0))[g]
        return raw * n / raw.sum()

    with torch.no_grad():
        model_net.w.copy_(normalised(net.theta))
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rw = MetaReweighter(model, opt, meta, net=model_net, engine=engine, meta_optimizer=_sgd, normalization="none")
    rw.step(x, y, model(x))
    jac_sum = torch.autograd.functional.jacobian(normalised, net.theta)
    torch.testing.assert_close(theta_sum, jac_sum.T @ model_net.w.grad, rtol=1e-7, atol=1e-12)


def test_group_weights_start_equal_and_reach_every_sample():
    model = _mlp()
    x, y, g = _data(12, seed=1)
    rw = MetaReweighter(
        model, torch.optim.SGD(model.parameters(), lr=0.1), [_data(10, 2)[:2]], net="groups",
        net_kwargs={"num_groups": GROUPS}, seed=0, interval=1000,
    )  # fmt: skip
    assert torch.equal(rw.group_weights, torch.ones(GROUPS, dtype=torch.float64))
    w = rw.step(x, y, model(x), groups=g)  # one meta update, then weights from the updated net
    gw = rw.group_weights
    assert not torch.allclose(gw, torch.ones_like(gw))
    torch.testing.assert_close(gw.mean(), torch.ones((), dtype=gw.dtype))
    expected = gw[g] * 12 / gw[g].sum()
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize(
    ("net", "net_kwargs", "warmup", "floor"),
    [
        ("groups", {"num_groups": GROUPS}, 0, 0.0),
        ("groups", {"num_groups": GROUPS, "within": "lossnet"}, 300, 0.0),
        ("lossnet", None, 300, 0.2),
        (GroupNet(GROUPS, num_classes=CLASSES), None, 0, 0.0),
    ],
)
def test_warmup_is_off_for_the_group_net_alone_and_the_floor_for_any_group_net(net, net_kwargs, warmup, floor):
    model = _mlp()
    opt, meta = torch.optim.SGD(model.parameters(), lr=0.1), [_data(10, 2)[:2]]
    rw = MetaReweighter(model, opt, meta, net=net, net_kwargs=net_kwargs)
    assert rw.options.meta_warmup == warmup and rw.options.min_ess == floor
    explicit = MetaReweighter(model, opt, meta, net=net, net_kwargs=net_kwargs, meta_warmup=7, min_ess=0.5)
    assert explicit.options.meta_warmup == 7 and explicit.options.min_ess == 0.5


def test_group_net_alone_takes_sgd_steps_from_the_first_update():
    """Its default optimizer is SGD (lr 1e-3) with no warm-up: the first update is ``-1e-3 * gradient``, so groups
    move in proportion to their meta-gradients (Adam would move each by about its lr, whatever the gradient)."""
    x, y, _ = _data(12, seed=1)
    g = torch.arange(12) % GROUPS  # every group present
    meta = [_data(10, 2)[:2]]
    kwargs = {"net": "groups", "net_kwargs": {"num_groups": GROUPS}, "seed": 0}
    model = _mlp()
    probe = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, meta_optimizer=_sgd, **kwargs)
    probe.step(x, y, model(x), groups=g)
    grad = probe.net.theta.grad.detach().clone()
    model = _mlp()
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), meta, **kwargs)
    assert rw.options.meta_optimizer is group_meta_optimizer and rw.options.meta_warmup == 0
    rw.step(x, y, model(x), groups=g)
    torch.testing.assert_close(rw.net.theta.detach(), (-1e-3 * grad).to(rw.net.theta.dtype))
    assert grad.abs().unique().numel() == GROUPS  # unequal gradients: a sign step would not match


def test_fast_preset_scales_each_nets_own_meta_optimizer():
    model = _mlp()
    opt, meta = torch.optim.SGD(model.parameters(), lr=0.1), [_data(10, 2)[:2]]
    for within, cls in ((None, torch.optim.SGD), ("lossnet", torch.optim.AdamW)):
        kwargs = {"num_groups": GROUPS, "within": within}
        rw = MetaReweighter(model, opt, meta, net="groups", net_kwargs=kwargs, preset="fast")
        group = rw.meta_optimizer.param_groups[0]
        assert type(rw.meta_optimizer) is cls and group.get("reweight_lr", group["lr"]) == pytest.approx(6e-3)


def test_within_multiplies_group_and_sample_weights():
    net = _group_net("lossnet")
    loss = torch.rand(8, dtype=torch.float64)
    g = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    out = net(loss, None, None, groups=g)
    torch.testing.assert_close(out, net.group_weights()[g] * net.within(loss))


def test_token_level_outputs_with_group_weights_alone():
    """Without a ``within`` net the group net reads no logits: any per-sample loss works (causal LM)."""
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    tokens = torch.randint(0, 11, (6, 5))
    from reweight.losses import sequence_cross_entropy

    meta = [(tokens[:3], tokens[:3])]
    rw = MetaReweighter(
        emb, opt, meta, net="groups", net_kwargs={"num_groups": 2}, loss_fn=sequence_cross_entropy, seed=0
    )
    w = rw.step(tokens, tokens, emb(tokens), groups=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert w.shape == (6,)
    with pytest.raises(ValueError, match="class logits"):  # a within net on logits still needs class logits
        rw2 = MetaReweighter(
            emb, opt, meta, net="groups", net_kwargs={"num_groups": 2, "within": "logitnet"},
            loss_fn=sequence_cross_entropy, seed=0,
        )  # fmt: skip
        rw2.step(tokens, tokens, emb(tokens), groups=torch.tensor([0, 0, 0, 1, 1, 1]))


class CustomGroupNet(nn.Module):
    requires_groups = True
    num_groups = 2

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))
        self.seen: list[torch.Tensor] = []

    def forward(self, loss, logits, targets, *, groups):
        self.seen.append(groups)
        return torch.sigmoid(self.bias[groups] + 0 * loss)


def test_custom_net_declaring_requires_groups_gets_them():
    model = _mlp(torch.float32)
    net = CustomGroupNet()
    rw = MetaReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), [_data(10, 2, torch.float32)[:2]], net=net)
    x, y, _ = _data(4, 1, torch.float32)
    rw.step(x, y, model(x), groups=torch.tensor([0, 1, 1, 0], dtype=torch.int32))
    assert net.seen and net.seen[0].dtype == torch.long and net.seen[0].tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="groups"):
        rw.step(x, y, model(x), groups=torch.tensor([0, 1, 2, 0]))  # num_groups = 2


@pytest.mark.parametrize("preset", ["exact", "fast"])
@pytest.mark.parametrize("within", [None, "metainfonet"])
def test_resume_is_exact(preset, within):
    def build():
        model = _mlp(torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        meta = [_data(8, k + 10, torch.float32)[:2] for k in range(3)]
        kwargs = {"num_groups": GROUPS, "within": within}
        return model, opt, MetaReweighter(model, opt, meta, net="groups", net_kwargs=kwargs, preset=preset, seed=4)

    def run(model, opt, rw, steps):
        out = []
        for t in steps:
            x, y, g = _data(9, 100 + t, torch.float32)
            logits = model(x)
            w = rw.step(x, y, logits, groups=g)
            out.append(w)
            opt.zero_grad()
            (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
            opt.step()
        return out

    model, opt, rw = build()
    straight = run(model, opt, rw, range(14))
    model2, opt2, rw2 = build()
    run(model2, opt2, rw2, range(7))
    buf = io.BytesIO()
    torch.save({"rw": rw2.state_dict(), "model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model3, opt3, rw3 = build()
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    rw3.load_state_dict(saved["rw"])
    resumed = run(model3, opt3, rw3, range(7, 14))
    for a, b in zip(straight[7:], resumed, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rw.group_weights, rw3.group_weights)
    assert not torch.equal(rw.group_weights, torch.ones(GROUPS))


# ---------------------------------------------------------------- errors name groups


def _reweighter(net="groups", net_kwargs=None, **kwargs):
    model = _mlp(torch.float32)
    if net == "groups" and net_kwargs is None:
        net_kwargs = {"num_groups": GROUPS}
    rw = MetaReweighter(
        model, torch.optim.SGD(model.parameters(), lr=0.1), [_data(8, 2, torch.float32)[:2]], net=net,
        net_kwargs=net_kwargs, seed=0, **kwargs,
    )  # fmt: skip
    x, y, g = _data(6, 1, torch.float32)
    return rw, x, y, g, model(x)


def test_missing_groups_for_the_group_net():
    rw, x, y, g, out = _reweighter()
    with pytest.raises(ValueError, match=r"groups=g"):
        rw.step(x, y, out)
    assert rw.step_count == 0


@pytest.mark.parametrize("net", ["lossnet", "metainfonet", "l2rw"])
def test_groups_given_to_a_net_that_ignores_them(net):
    rw, x, y, g, out = _reweighter(net=net, net_kwargs=None)
    with pytest.raises(ValueError, match=r"groups= was given, but net .* does not read group ids"):
        rw.step(x, y, out, groups=g)


@pytest.mark.parametrize("bad", [torch.tensor([0, 1, 2, 3, 0, 0]), torch.tensor([0, -1, 2, 1, 0, 0])])
def test_group_ids_out_of_range(bad):
    rw, x, y, g, out = _reweighter()
    with pytest.raises(ValueError, match=r"groups holds the id -?\d, out of range for num_groups=3"):
        rw.step(x, y, out, groups=bad)
    assert torch.equal(rw.group_weights, torch.ones(GROUPS))  # the net did not move


def test_group_ids_of_wrong_shape_or_dtype():
    rw, x, y, g, out = _reweighter()
    with pytest.raises(ValueError, match=r"groups must have shape \(6,\)"):
        rw.step(x, y, out, groups=g[:4])
    with pytest.raises(TypeError, match="groups must be an integer tensor"):
        rw.step(x, y, out, groups=g.float())
    with pytest.raises(TypeError, match="groups must be a Tensor"):
        rw.step(x, y, out, groups=[0, 1, 2, 0, 1, 2])


def test_constructor_errors_name_the_groups():
    with pytest.raises(ValueError, match="num_groups"):
        _reweighter(net_kwargs={})
    with pytest.raises(ValueError, match="within must be one of"):
        _reweighter(net_kwargs={"num_groups": 2, "within": "groups"})
    with pytest.raises(ValueError, match="group_names"):
        _reweighter(net_kwargs={"num_groups": 2, "group_names": ["a"]})


# ---------------------------------------------------------------- two-rank DDP

WORLD, SHARD, META_SHARD, STEPS = 2, 6, 5, 5


def _shard(kind: str, index: int, rank: int, size: int):
    g = torch.Generator().manual_seed(100_000 * (kind == "meta") + 100 * index + rank)
    x = torch.randn(size, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (size,), generator=g)
    return x, y, torch.randint(0, GROUPS, (size,), generator=g)


def _batch(kind: str, index: int, rank: int | None, size: int):
    if rank is not None:
        return _shard(kind, index, rank, size)
    shards = [_shard(kind, index, r, size) for r in range(WORLD)]
    return tuple(torch.cat([s[k] for s in shards]) for k in range(3))


DDP_CONFIGS: dict[str, dict[str, Any]] = {
    "groups": {"net_kwargs": {"num_groups": GROUPS}},
    "groups_within_lossnet": {"net_kwargs": {"num_groups": GROUPS, "within": "lossnet"}, "interval": 2},
}


def _train(config: dict[str, Any], rank: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    wrapped = model if rank is None else nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = [_batch("meta", k, rank, META_SHARD)[:2] for k in range(3)]
    rw = MetaReweighter(
        wrapped, opt, meta, net="groups", seed=0, meta_optimizer=lambda p: torch.optim.SGD(p, lr=5.0), **config
    )
    weights, history = [], []
    for t in range(STEPS):
        x, y, g = _batch("train", t, rank, SHARD)
        logits = wrapped(x)
        w = rw.step(x, y, logits, groups=g)
        weights.append(w)
        history.append(rw.group_weights.clone())
        opt.zero_grad()
        (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    return {
        "net": {k: v.clone() for k, v in rw.net.state_dict().items()},
        "weights": torch.cat(weights),
        "group_weights": torch.stack(history),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        results: dict[str, Any] = {name: _train(config, rank) for name, config in DDP_CONFIGS.items()}
        results["bad_ids"] = _bad_ids_on_one_rank(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bad_ids_on_one_rank(rank: int) -> str:
    """An out-of-range id on one rank only: every rank raises, none hangs. A function of its own, so that the
    DDP wrapper and the graph of its forward are freed before the process group is destroyed (a gloo rank
    aborts at exit otherwise)."""
    model = nn.Sequential(nn.Linear(FEATURES, CLASSES))
    wrapped = nn.parallel.DistributedDataParallel(model)
    rw = MetaReweighter(
        wrapped, torch.optim.SGD(model.parameters(), lr=0.1), [_batch("meta", 0, rank, 4)[:2]],
        net="groups", net_kwargs={"num_groups": GROUPS}, seed=0,
    )  # fmt: skip
    x, y, g = _batch("train", 0, rank, SHARD)
    if rank == 1:
        g = g.clone()
        g[0] = GROUPS
    try:
        rw.step(x, y, wrapped(x), groups=g)
    except ValueError as err:
        return str(err)
    return "accepted"


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:
        return spawn_ranks(_worker, (os.path.join(tmp, "init"), tmp), tmp, WORLD, timeout_s=240)


@pytest.mark.parametrize("name", list(DDP_CONFIGS))
def test_ddp_group_weights_identical_across_ranks_and_equal_one_process(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert torch.equal(a["group_weights"], b["group_weights"])
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]), key
    single = _train(DDP_CONFIGS[name], rank=None)
    torch.testing.assert_close(a["group_weights"], single["group_weights"], rtol=0, atol=1e-5)
    per_step = [torch.cat([r[name]["weights"].view(STEPS, SHARD)[t] for r in ranks]) for t in range(STEPS)]
    torch.testing.assert_close(torch.cat(per_step), single["weights"], rtol=0, atol=1e-5)
    assert (single["group_weights"][-1] - 1).abs().max() > 1e-3  # the group weights moved


def test_ddp_out_of_range_ids_on_one_rank_raise_on_every_rank(ranks):
    for r in ranks:
        assert "groups" in r["bad_ids"] and "out of range" in r["bad_ids"], r["bad_ids"]
