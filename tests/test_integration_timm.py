"""ReweightClassificationTask: timm's train.py loop (task, optimizer factory, Mixup, CheckpointSaver), offline."""

import copy
import os
import subprocess
import sys

import pytest
import torch

if not os.environ.get("CI"):  # CI installs the extra (".[test]") and must run these tests, never skip them
    pytest.importorskip("timm")

import timm  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.loss import create_classification_loss  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.task import resume_task_checkpoint  # noqa: E402
from timm.utils import CheckpointSaver  # noqa: E402

from reweight import LossNet  # noqa: E402
from reweight.integrations.timm import TASK_STATE_KEY, ReweightClassificationTask, per_sample_criterion  # noqa: E402

CLASSES = 4
CRITERIA = {
    "ce": {},
    "smoothing": {"smoothing": 0.1},
    "mixup": {"soft_targets": True},
    "bce": {"loss_type": "bce", "smoothing": 0.1},
}


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=CLASSES)


def meta_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [images(6, 100), images(6, 101)]


def make_task(net=None, criterion_kwargs=None, meta=None, **kw):
    m = model()
    task = ReweightClassificationTask(
        m,
        meta if meta is not None else meta_batches(),
        criterion_kwargs=criterion_kwargs or {},
        net=net if net is not None else "lossnet",
        seed=0,
        verbose=False,
        **kw,
    )
    optimizer = create_optimizer_v2(m, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    task.bind_optimizer(optimizer)
    return m, task, optimizer


def train_step(task, optimizer, x, y, mixup=None):
    """One iteration of timm's train_one_epoch: mixup, task forward, backward, step."""
    if mixup is not None:
        x, y = mixup(x, y)
    task.train()
    out = task(x, y)
    optimizer.zero_grad()
    out["loss"].backward()
    bare = timm.utils.unwrap_model(task.trainable_module)
    grads = {k: p.grad.clone() for k, p in bare.named_parameters() if p.grad is not None}
    optimizer.step()
    return x, y, grads


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_per_sample_criterion_averages_to_timms_loss(name):
    criterion = create_classification_loss(**CRITERIA[name])
    logits = torch.randn(5, CLASSES)
    targets = torch.softmax(torch.randn(5, CLASSES), -1) if name == "mixup" else torch.randint(0, CLASSES, (5,))
    per_sample = per_sample_criterion(criterion)(logits, targets)
    one_by_one = torch.stack([criterion(logits[i : i + 1], targets[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(per_sample, one_by_one)  # each sample's loss is timm's on that sample alone
    torch.testing.assert_close(per_sample.mean(), criterion(logits, targets))


def test_unsupported_criterion_is_refused():
    with pytest.raises(ValueError, match="loss_fn"):
        per_sample_criterion(torch.nn.MSELoss())


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_gradient_is_the_hand_computed_weighted_gradient(name):
    # a random start and no meta warm-up (below): the one step's weights are not all 1, as they would be from
    # the default uniform start with a warmed-up meta lr
    net = LossNet(hidden=8, uniform_start=False)
    net_before = copy.deepcopy(net.state_dict())
    seen_meta_targets = []

    def meta_loss(logits, targets):
        seen_meta_targets.append(targets)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    m, task, optimizer = make_task(net, CRITERIA[name], meta_loss_fn=meta_loss, meta_warmup=0)
    initial = copy.deepcopy(m)
    mixup = (
        Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=CLASSES) if name == "mixup" else None
    )
    x, y, grads = train_step(task, optimizer, *images(8, 1), mixup=mixup)
    weights = task.last_weights
    assert weights.shape == (8,) and not torch.allclose(weights, torch.ones_like(weights))
    if name == "mixup":
        assert y.ndim == 2  # soft targets reached the task ...
    assert seen_meta_targets and all(t.ndim == 1 for t in seen_meta_targets)  # ... but meta batches stay unmixed

    initial.train()
    criterion = per_sample_criterion(create_classification_loss(**CRITERIA[name]))
    (weights * criterion(initial(x), y)).mean().backward()
    for k, p in initial.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
    assert any(not torch.equal(net_before[k], v) for k, v in task.reweighter.net.state_dict().items())
    assert not any(p is q for p in task.parameters() for q in task.reweighter.net.parameters())


def test_compiled_task_forwards_through_the_compiled_model_and_looks_ahead_on_the_bare_one():
    m, task, optimizer = make_task()
    initial = copy.deepcopy(m)
    task.compile(backend="eager")
    x, y, grads = train_step(task, optimizer, *images(8, 1))
    assert isinstance(task.trainable_module, torch._dynamo.eval_frame.OptimizedModule)
    assert task.reweighter.module is m
    initial.train()
    (task.last_weights * torch.nn.functional.cross_entropy(initial(x), y, reduction="none")).mean().backward()
    for k, p in initial.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_evaluation_runs_no_meta_step():
    m, task, optimizer = make_task()
    train_step(task, optimizer, *images(8, 1))
    steps = task.reweighter.step_count
    x, y = images(8, 2)
    task.eval()
    m.eval()
    with torch.no_grad():
        out = task(x, y)
    assert task.reweighter.step_count == steps
    torch.testing.assert_close(out["loss"], torch.nn.functional.cross_entropy(m(x), y))


def test_state_survives_checkpoint_saver_and_resume(tmp_path):
    batches = [images(8, s) for s in range(4)]
    m, task, optimizer = make_task(criterion_kwargs={"smoothing": 0.1})
    saver = CheckpointSaver(m, optimizer, task=task, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    for x, y in batches[:2]:
        train_step(task, optimizer, x, y)
    saver.save_recovery(epoch=0, batch_idx=1)
    path = saver.find_recovery()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert TASK_STATE_KEY in state["task_state"] and state["task_state"][TASK_STATE_KEY]["step"] == 2
    for x, y in batches[2:]:
        train_step(task, optimizer, x, y)

    m2 = model(seed=7)
    task2 = ReweightClassificationTask(
        m2, meta_batches(), criterion_kwargs={"smoothing": 0.1}, net="lossnet", seed=3, verbose=False
    )
    optimizer2 = create_optimizer_v2(m2, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    resume_task_checkpoint(task2, path, optimizer=optimizer2, log_info=False)
    task2.bind_optimizer(optimizer2)
    for x, y in batches[2:]:
        train_step(task2, optimizer2, x, y)
    assert task2.reweighter.step_count == 4
    for k, v in task.reweighter.net.state_dict().items():
        torch.testing.assert_close(task2.reweighter.net.state_dict()[k], v)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v)


def test_missing_timm_names_the_extra():
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "try:\n    import reweight.integrations.timm\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "reweight[timm]"' in out


def test_example_runs_offline_with_mixup():
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "timm_train.py")
    args = [sys.executable, example, "--epochs", "1", "--limit", "128", "--mixup", "--smoothing", "0.1"]
    out = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test accuracy" in out.stdout and "reweighter at step 2" in out.stdout


def test_head_lookahead_works_from_the_first_step_and_equals_the_reverse_engine_on_the_head():
    x, y = images(8, 1)
    weights = {}
    for name, kwargs in {
        "head": {"lookahead": "head"},
        "reverse": {"lookahead": ["classifier.*"], "engine": "reverse"},
    }.items():
        m, task, optimizer = make_task(**kwargs)
        for step in range(2):
            train_step(task, optimizer, x, y)
            weights[name, step] = task.last_weights
        assert task.reweighter.step_count == 2
    assert not torch.allclose(weights["head", 1], torch.ones(8))
    for step in range(2):
        torch.testing.assert_close(weights["head", step], weights["reverse", step], rtol=1e-4, atol=1e-6)


def test_head_lookahead_survives_compile_after_bind_and_a_rebind_leaves_one_hook():
    torch._dynamo.reset()  # as in a fresh process: the first compiled call traces the head hook
    m, task, optimizer = make_task(lookahead="head")
    train_step(task, optimizer, *images(8, 1))
    first = task.reweighter
    task.compile(backend="eager")
    train_step(task, optimizer, *images(8, 2))
    assert task.reweighter is first and task.reweighter.step_count == 2  # same bare module: kept
    optimizer2 = create_optimizer_v2(m, "sgd", lr=0.01)
    task.bind_optimizer(optimizer2)
    assert task.reweighter is not first and task.reweighter.step_count == 2  # rebuilt, state carried over
    assert len(m.get_classifier()._forward_hooks) == 1  # the first reweighter's hook was removed


def test_weight_stats_are_the_means_since_the_last_call():
    m, task, optimizer = make_task()
    seen = []
    for seed in (1, 2):
        train_step(task, optimizer, *images(8, seed))
        seen.append(task.last_weights)
    stats = task.pop_weight_stats()
    assert stats["weight_std"] == pytest.approx(sum(float(w.std(unbiased=False)) for w in seen) / 2, rel=1e-5)
    assert stats["weight_min"] == pytest.approx(sum(float(w.min()) for w in seen) / 2, rel=1e-5)
    assert stats["weight_max"] == pytest.approx(sum(float(w.max()) for w in seen) / 2, rel=1e-5)
    assert "meta_loss" in stats and task.pop_weight_stats() == {}


def test_timms_positional_order_is_refused_at_construction():
    from timm.loss import SoftTargetCrossEntropy

    with pytest.raises(TypeError, match="pass criterion=... by keyword"):
        ReweightClassificationTask(model(), SoftTargetCrossEntropy())


def test_training_forward_gives_the_weights_and_losses_a_weight_recorder_takes():
    from reweight.diagnostics import WeightRecorder

    _, task, optimizer = make_task()
    recorder = WeightRecorder()
    x, y = images(4, 3)
    task.train()
    out = task(x, y)
    recorder.record(torch.arange(4), out["losses"], out["weights"], step=0)
    assert out["weights"] is task.last_weights and out["losses"] is task.last_losses
    torch.testing.assert_close(out["loss"], (out["weights"] * out["losses"]).mean())
    assert len(recorder) == 4 and not out["losses"].requires_grad
    task.eval()
    with torch.no_grad():
        assert sorted(task(x, y)) == ["loss", "output"]  # evaluation: timm's own result
