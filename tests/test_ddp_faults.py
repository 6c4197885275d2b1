"""Faults on one data-parallel rank: every rank raises promptly, names the failing rank, and changes nothing.

Two gloo processes (CPU, one thread each) train a DDP model. At one step a fault is injected on some ranks
only (labels out of range, a batch whose sizes disagree, a meta loader that fails, a NaN beside an error).
Every rank must raise a ``DistributedStepError`` naming the failing ranks and their messages instead of
waiting in the next collective: the process group's timeout is 30 s, so a hang surfaces as gloo's timeout
error, not as the expected exception. The failing ranks stay alive and both ranks then carry on with good
steps; the model, weighting net, both optimizers and the reweighter's state must be exactly those of a run
that never saw the bad step.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_processes import spawn_ranks
from torch import nn

from reweight import DistributedStepError, MetaReweighter, NonFiniteLossError

WORLD, SHARD, FEATURES, CLASSES, TIMEOUT_S = 2, 6, 5, 3, 30

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _batch(index: int, rank: int, size: int = SHARD, meta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * meta + 10 * index + rank)
    return torch.randn(size, FEATURES, generator=g), torch.randint(0, CLASSES, (size,), generator=g)


class FlakyMetaLoader:
    """Meta batches of one rank; once, at batch ``fail_at`` of a pass, raises (or, with ``bad_label``, yields
    a batch with a label out of range, which only the meta loss detects)."""

    def __init__(self, rank: int, fail_at: int | None = None, bad_label: bool = False) -> None:
        self.batches = [_batch(k, rank, meta=True) for k in range(3)]
        self.fail_at = fail_at
        self.bad_label = bad_label

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for k, batch in enumerate(self.batches):
            if k == self.fail_at:
                self.fail_at = None  # fails once: the retry after the failed step succeeds
                if self.bad_label:
                    x, y = batch
                    yield x, torch.cat([y[:-1], torch.tensor([-1])])
                    continue
                raise RuntimeError(f"meta shard unreadable at batch {k}")
            yield batch


def _inject(fault: str, rank: int, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> tuple:
    """The bad step's inputs on ``rank`` for ``fault`` (unchanged on the healthy ranks)."""
    y = y.clone()
    if fault in ("labels", "nan_and_labels", "labels_and_shape") and rank == 1:
        y[2] = CLASSES + 4  # out of range: the loss's check raises ValueError
    if fault == "shape" and rank == 1:
        y = y[:-1]  # targets shorter than the batch
    if fault == "labels_and_shape" and rank == 0:
        y = y[:-2]
    if fault == "nan_and_labels" and rank == 0:
        logits = logits.detach().clone()
        logits[0, 0] = float("nan")  # with on_nonfinite="skip" rank 0 alone would skip the update
    return x, y, logits


def _state(model: nn.Module, opt: torch.optim.Optimizer, rw: MetaReweighter) -> dict[str, Any]:
    clone = lambda t: t.detach().clone() if torch.is_tensor(t) else t  # noqa: E731
    return {
        "model": {k: clone(v) for k, v in model.state_dict().items()},
        "grads": {k: clone(p.grad) for k, p in model.named_parameters()},
        "opt": {k: {n: clone(t) for n, t in s.items()} for k, s in opt.state_dict()["state"].items()},
        "reweighter": pickle.loads(pickle.dumps(rw.state_dict())),  # net, meta optimizer, step, rng, meta stream
    }


def _run(fault: str | None, rank: int) -> dict[str, Any]:
    """Good step, (bad step), good step, good step on a DDP model; the bad step is skipped when ``fault`` is None."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fail_at = 1 if fault in ("meta", "meta_labels") and rank == 1 else None
    meta = FlakyMetaLoader(rank, fail_at=fail_at, bad_label=fault == "meta_labels")
    on_nonfinite = "skip" if fault == "nan_and_labels" else "raise"
    rw = MetaReweighter(wrapped, opt, meta, net="lossnet", seed=0, on_nonfinite=on_nonfinite, num_classes=CLASSES)
    out: dict[str, Any] = {}
    for t in range(3):
        if t == 1 and fault is not None:
            x, y = _batch(t, rank)
            logits = wrapped(x)
            x, y, logits = _inject(fault, rank, x, y, logits)
            out["before"] = _state(model, opt, rw)
            start = time.monotonic()
            try:
                rw.step(x, y, logits)
                out["error"] = None
            except Exception as err:  # recorded, checked by the tests
                out["seconds"] = time.monotonic() - start
                out["error"] = {
                    "type": type(err).__name__,
                    "distributed": isinstance(err, DistributedStepError),
                    "value_error": isinstance(err, ValueError),
                    "nonfinite": isinstance(err, NonFiniteLossError),
                    "message": str(err),
                    "failures": getattr(err, "failures", None),
                    "rank": getattr(err, "rank", None),
                    "cause": None if err.__cause__ is None else type(err.__cause__).__name__,
                    "pickled": type(pickle.loads(pickle.dumps(err))) is type(err),
                }
            out["after"] = _state(model, opt, rw)
        x, y = _batch(t, rank)
        logits = wrapped(x)
        w = rw.step(x, y, logits)
        opt.zero_grad()
        (w * F.cross_entropy(logits, y, reduction="none")).mean().backward()
        opt.step()
    out["final"] = _state(model, opt, rw)
    return out


FAULTS = ["labels", "shape", "meta", "meta_labels", "labels_and_shape", "nan_and_labels"]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S)
    )
    try:
        results = {fault: _run(fault, rank) for fault in [None, *FAULTS]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return _spawn(tmp)


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    else:
        assert a == b, where


EXPECTED = {  # fault -> failing ranks and the error type and a fragment of the message of each
    "labels": {1: ("ValueError", "labels must lie in [0, 3), got values in [0, 7]")},
    "shape": {1: ("ValueError", "batch sizes disagree: inputs 6, targets 5, outputs 6")},
    "meta": {1: ("RuntimeError", "meta shard unreadable at batch 1")},
    "meta_labels": {1: ("ValueError", "meta batch: labels must lie in [0, 3), got values in [-1, ")},
    "labels_and_shape": {0: ("ValueError", "batch sizes disagree"), 1: ("ValueError", "labels must lie in")},
    "nan_and_labels": {1: ("ValueError", "labels must lie in")},
}


@pytest.mark.parametrize("fault", FAULTS)
def test_every_rank_raises_naming_the_failing_rank(ranks, fault):
    for rank, result in enumerate(ranks):
        error = result[fault]["error"]
        assert error is not None and error["distributed"], (rank, error)
        assert set(error["failures"]) == set(EXPECTED[fault]), error["message"]
        for failing, (kind, fragment) in EXPECTED[fault].items():
            reported = error["failures"][failing]
            assert reported.startswith(f"{kind}: ") and fragment in reported, error["failures"]
            assert f"rank {failing}: {reported}" in error["message"]
        assert error["rank"] == min(EXPECTED[fault])
        assert f"of {WORLD}" in error["message"]
        # the class also derives from the first failing rank's error type, as in one process
        assert error["value_error"] == (EXPECTED[fault][error["rank"]][0] == "ValueError")
        assert not error["nonfinite"]
        # the failing rank chains its own exception; the healthy ranks have no local cause
        failing_here = rank in EXPECTED[fault]
        assert (error["cause"] is not None) == failing_here
        assert error["pickled"]


@pytest.mark.parametrize("fault", FAULTS)
def test_the_failed_step_changes_nothing_on_any_rank(ranks, fault):
    for rank, result in enumerate(ranks):
        _assert_equal(result[fault]["before"], result[fault]["after"], f"rank {rank}")


@pytest.mark.parametrize("fault", FAULTS)
def test_training_continues_as_if_the_bad_step_never_happened(ranks, fault):
    """Both ranks stayed alive and in step: the following good steps match a run without the bad one."""
    for rank, result in enumerate(ranks):
        _assert_equal(result[fault]["final"], ranks[rank][None]["final"], f"rank {rank}")
    _assert_equal(ranks[0][fault]["final"]["reweighter"]["net"], ranks[1][fault]["final"]["reweighter"]["net"])


def _spawn(tmp: str) -> list[dict[str, Any]]:
    return spawn_ranks(_worker, (os.path.join(tmp, "init"), tmp), tmp, WORLD, timeout_s=300)


if __name__ == "__main__":  # python tests/test_ddp_faults.py: how long each rank's failing step() took
    with tempfile.TemporaryDirectory() as tmp:
        results = _spawn(tmp)
    for fault in FAULTS:
        times = ", ".join(f"rank {r}: {res[fault]['seconds'] * 1000:.1f} ms" for r, res in enumerate(results))
        print(f"{fault:18s} {results[0][fault]['error']['type']:34s} {times}")
