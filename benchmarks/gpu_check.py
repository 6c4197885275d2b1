"""One run on a CUDA machine: the machine, the step-cost table timed on the GPU, host synchronisations per
reweighted step, the attention (SDPA) kernel each pass ran, and, on two GPUs, the DDP and FSDP2 equality checks
on NCCL.

    python benchmarks/gpu_check.py --out gpu_check --budget-s 420
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/gpu_check   # the same code, tiny, on the CPU

Writes ``gpu_check.json`` (everything, rewritten after each item) and ``gpu_check.md`` (a summary) to ``--out``.
Each item (one variant timed, one engine's syncs counted, ...) is recorded as ok, not applicable, error or
skipped; an item that fails is recorded and the rest go on; past ``--budget-s`` (counted from the start) the
remaining items are skipped and recorded so. Needs torch, numpy and this repository only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
sys.path.append(str(ROOT / "tests"))  # rank_processes, test_ddp and test_fsdp, for the equality checks only
NO_CUDA = "no CUDA device: nothing to check"
MODELS = ["transformer", "resnet32gn", "resnet32"]
SMOKE_MODELS = ["transformer", "resnet32"]  # the ResNet with BatchNorm: the engines that refuse it are recorded so
DTYPES = {"float32": None, "bf16": torch.bfloat16}  # bf16: the steps run under torch.autocast
SYNC_ENGINES = [("ghost", "full"), ("ghost_lean", "full"), ("forward", "full"), ("reverse", "full"),
                ("finite_difference", "full"), ("linear_head", "head")]


def variants() -> list:
    """The step-cost table's rows timed here (step_cost.Variant), plain first."""
    from step_cost import PRESETS, Variant

    fast = PRESETS["fast"].get("interval", PRESETS["exact"]["interval"])
    rows = [Variant("plain", "plain")]
    rows += [Variant(e, "reweight", e, "full") for e in ("ghost", "ghost_lean", "forward", "reverse")]
    return rows + [Variant("preset=fast", "reweight", "auto", "full", fast, preset="fast"),
                   Variant("lookahead=head", "reweight", "auto", "head")]


def autocast(device: str, dtype: str):
    return torch.autocast(device, dtype=DTYPES[dtype]) if DTYPES[dtype] else contextlib.nullcontext()


def now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()  # the time read after the work queued so far has run
    return time.perf_counter()


@contextlib.contextmanager
def around_reweighter_step(wrap):
    """Run every ``MetaReweighter.step`` as ``wrap(reweighter, call)``, so that a step_cost closure can be observed."""
    from reweight import MetaReweighter

    original = MetaReweighter.step
    MetaReweighter.step = lambda self, *a, **k: wrap(self, lambda: original(self, *a, **k))  # type: ignore[method-assign]
    try:
        yield
    finally:
        MetaReweighter.step = original  # type: ignore[method-assign]


def time_variant(setup, variant, dtype: str, repeats: int, warmup: int) -> dict:
    """Median wall time of a plain step and of the variant's step (amortised over its interval), alternating."""
    from step_cost import Variant, make_step

    cuda, engine = setup.x.is_cuda, {}
    plain, step = make_step(setup, Variant("plain", "plain")), make_step(setup, variant)
    calls = variant.interval

    def engine_of(rw, call):  # the engine that ran: "auto" may fall back from ghost during the first step
        weights = call()
        engine["name"] = rw.engine_name
        return weights

    with autocast(setup.x.device.type, dtype):
        with around_reweighter_step(engine_of):
            for _ in range(warmup):
                plain()
                for _ in range(calls):
                    step()
        plain_s, step_s = [], []
        for _ in range(repeats):
            t0 = now(cuda)
            plain()
            t1 = now(cuda)
            for _ in range(calls):
                step()
            plain_s.append(t1 - t0)
            step_s.append((now(cuda) - t1) / calls)
    plain_ms, step_ms = 1e3 * statistics.median(plain_s), 1e3 * statistics.median(step_s)
    return {
        "engine": engine.get("name", "-"), "interval": calls, "plain_ms": plain_ms, "step_ms": step_ms,
        "ratio": step_ms / plain_ms, "paired_ratio": statistics.median(s / p for s, p in zip(step_s, plain_s)),
        "plain_ms_min": 1e3 * min(plain_s), "step_ms_min": 1e3 * min(step_s), "repeats": repeats, "warmup": warmup,
    }


_SYNC_CALLS = {  # as tests/test_host_sync.py: the calls that wait for the device
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.item,
    torch.Tensor.tolist, torch.Tensor.numpy, torch.equal, torch.allclose, torch.is_nonzero,
}
_HOST_SIDE = ("torch/optim/", "_draw_seed")  # CPU scalars by construction (optimizer step counts, the seed draws)


def _site(stack) -> str:
    frame = next((f for f in reversed(stack) if "/torch/" not in f.filename), stack[-1])
    return f"{Path(frame.filename).name}:{frame.lineno}"


class SyncCounter(TorchFunctionMode):
    """Host synchronisations while active: the Python calls that wait for the device (as tests/test_host_sync.py,
    on any device) and, on CUDA, every synchronising operation ``torch.cuda.set_sync_debug_mode`` warns of."""

    def __init__(self, cuda: bool) -> None:
        super().__init__()
        self.cuda, self.calls, self.warned = cuda, [], []
        self._stack = contextlib.ExitStack()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_CALLS:
            stack = traceback.extract_stack()[:-1]
            if not any(h in f.filename or h == f.name for f in stack for h in _HOST_SIDE):
                self.calls.append(_site(stack))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        if self.cuda:
            self.warned = self._stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, 0)
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._stack.close()

    def sites(self) -> list[str]:
        """The synchronisations so far: CUDA's own report on CUDA, else the counted calls."""
        if not self.cuda:
            return list(self.calls)
        return [f"{Path(w.filename).name}:{w.lineno}" for w in self.warned if "synchroniz" in str(w.message)]


def count_syncs(setup, variant, steps: int) -> dict:
    """Syncs in each of ``steps`` steps: inside ``MetaReweighter.step`` and in the whole step (the user's forward,
    the step, the weighted backward and the optimizer step)."""
    from step_cost import make_step

    step, counter, engine = make_step(setup, variant), SyncCounter(setup.x.is_cuda), {}
    inside, whole, calls, sites = [], [], [], Counter()

    def wrap(rw, call):
        engine["name"], before, before_calls = rw.engine_name, counter.sites(), len(counter.calls)
        try:
            return call()
        finally:
            new = counter.sites()[len(before) :]
            inside.append(len(new))
            calls.append(len(counter.calls) - before_calls)
            sites.update(new)

    with around_reweighter_step(wrap):
        for _ in range(steps):
            with counter:
                start = len(counter.sites())
                step()
            whole.append(len(counter.sites()) - start)
    return {
        "engine": engine.get("name"), "method": "cuda sync debug mode" if setup.x.is_cuda else "counted calls",
        "per_step": max(inside[1:] or inside), "first_step": inside[0], "whole_per_step": max(whole[1:] or whole),
        "reweighter_step": inside, "whole_step": whole,
        "counted_calls": calls, "sites": dict(sites.most_common(8)),
    }


def sdpa_kernels(setup, variant, dtype: str) -> dict:
    """The attention operators each part of one meta step ran (profiler op names), by the innermost range
    around them: the user's forward or backward, or the library's ``reweight.<phase>`` ranges."""
    from step_cost import make_step
    from torch.profiler import ProfilerActivity, profile, record_function

    step = make_step(setup, variant)
    with autocast(setup.x.device.type, dtype):
        for _ in range(variant.interval):  # warm-up, ending where the next step makes a meta update
            step()

        def wrap(rw, call):
            with record_function("gpu_check.reweighter_step"):
                return call()

        with around_reweighter_step(wrap), profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("gpu_check.step"):
                step()
    try:  # the raw events, as step_cost.live_by_phase reads them: prof.events() takes seconds to build
        raw = prof.profiler.kineto_results.events()
        events = [(e.name(), e.start_ns(), e.start_ns() + e.duration_ns()) for e in raw]
    except AttributeError:
        events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()]
    ranges = [e for e in events if e[0].startswith(("reweight.", "gpu_check."))]
    found: dict[str, Counter] = {}
    for name, start, _ in events:
        if "attention" not in name.lower() or name.startswith("autograd::engine"):
            continue
        inner = min((r for r in ranges if r[1] <= start < r[2]), key=lambda r: r[2] - r[1], default=None)
        if inner is None or inner[0] == "gpu_check.step":
            where = "user backward" if "backward" in name.lower() else "user forward"
        else:
            where = "engine" if inner[0] == "gpu_check.reweighter_step" else inner[0]
        found.setdefault(where, Counter())[name] += 1
    return {where: dict(ops) for where, ops in found.items()}


def _to_cpu(result: dict) -> dict:
    return {k: ({n: t.cpu() for n, t in v.items()} if isinstance(v, dict) else v.cpu() if torch.is_tensor(v) else v)
            for k, v in result.items()}


@contextlib.contextmanager
def ddp_on(device: torch.device):
    """tests/test_ddp.py's model and batches, on ``device``."""
    import test_ddp

    model, batch = test_ddp._model, test_ddp._batch
    test_ddp._model = lambda batchnorm=False: model(batchnorm).to(device)
    test_ddp._batch = lambda *a: tuple(t.to(device) for t in batch(*a))
    try:
        yield test_ddp
    finally:
        test_ddp._model, test_ddp._batch = model, batch


@contextlib.contextmanager
def fsdp_on(device: torch.device):
    """tests/test_fsdp.py's models and batches, on ``device``."""
    import test_fsdp

    models, batch = dict(test_fsdp.MODELS), test_fsdp._batch
    test_fsdp.MODELS.update({k: (lambda b=b: b().to(device), units) for k, (b, units) in models.items()})
    test_fsdp._batch = lambda *a: tuple(t.to(device) for t in batch(*a))
    try:
        yield test_fsdp
    finally:
        test_fsdp.MODELS.update(models)
        test_fsdp._batch = batch


# the runs of each equality check: every configuration of tests/test_ddp.py; of tests/test_fsdp.py, one per model
EQUALITY = {
    "ddp": (ddp_on, None),
    "fsdp2": (fsdp_on, ("lossnet", "metainfonet", "transformer_lossnet", "transformer_metainfonet", "cnn_lossnet")),
}


def _equality_worker(rank: int, init_file: str, out_dir: str, backend: str, kind: str) -> None:
    import torch.distributed as dist

    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    context, names = EQUALITY[kind]
    try:
        with context(device) as t:
            results = {name: _to_cpu(t._train(t.CONFIGS[name], rank)) for name in names or t.CONFIGS}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def equality_check(kind: str, backend: str, timeout_s: float) -> dict:
    """The equality checks of tests/test_ddp.py (``kind="ddp"``) or tests/test_fsdp.py (``"fsdp2"``) on two ranks:
    weighting nets and (gathered) models bit-identical across ranks, and the model, net and weights within 1e-5 of
    one process trained on the concatenated batches."""
    from rank_processes import spawn_ranks

    with tempfile.TemporaryDirectory() as tmp:
        args = (os.path.join(tmp, "init"), tmp, backend, kind)
        ranks = spawn_ranks(_equality_worker, args, tmp, 2, timeout_s=timeout_s)
    out = {"backend": backend}
    context, _ = EQUALITY[kind]
    with context(torch.device("cuda:0" if backend == "nccl" else "cpu")) as t:
        for name in ranks[0]:
            single, (a, b) = _to_cpu(t._train(t.CONFIGS[name], None)), (r[name] for r in ranks)
            same = all(torch.equal(a[p][k], b[p][k]) for p in ("net", "model") for k in a[p])
            weights = torch.cat([torch.cat([r[name]["weights"].view(t.STEPS, t.SHARD)[s] for r in ranks])
                                 for s in range(t.STEPS)])
            diffs = [(a[p][k] - single[p][k]).abs().max().item() for p in ("net", "model") for k in single[p]]
            diff = max(diffs + [(weights - single["weights"]).abs().max().item()])
            ok = same and diff <= 1e-5 and a["engine"] == b["engine"]
            out[name] = {"ranks_identical": same, "max_diff_to_single": diff, "engine": a["engine"], "ok": ok}
    return out


def _try(fn, default="unknown"):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a description field must never stop the run
        return f"{default} ({type(err).__name__}: {err})"


def _command(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True, cwd=ROOT).stdout.strip()


def describe(cuda: bool, commit: str | None = None) -> dict:
    import numpy

    cpu = _try(lambda: next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line))
    info = {
        "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
        "cpu_affinity": _try(lambda: len(os.sched_getaffinity(0))), "torch_threads": torch.get_num_threads(),
        "git_commit": commit or _try(lambda: _command("git", "rev-parse", "HEAD")),
        "git_dirty": _try(lambda: bool(_command("git", "status", "--porcelain", "--untracked-files=no"))),
        "reweight": _try(lambda: __import__("reweight").__version__), "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if cuda:
        props = [_try(lambda i=i: torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count())]
        info["gpus"] = [_try(lambda p=p: {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib":
                                          round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count})
                        for p in props]
        info["nvidia_smi"] = _try(lambda: _command("nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                   "--format=csv,noheader"))
        info["cuda_driver_api"] = _try(lambda: torch._C._cuda_getDriverVersion())
        info["cudnn"] = _try(lambda: torch.backends.cudnn.version())
        info["nccl"] = _try(lambda: ".".join(map(str, torch.cuda.nccl.version())))
        backends = torch.backends
        info["tf32"] = _try(lambda: {"matmul": backends.cuda.matmul.allow_tf32, "conv": backends.cudnn.allow_tf32,
                                     "matmul_precision": torch.get_float32_matmul_precision()})
        info["sdpa_enabled"] = _try(lambda: {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                                             for k in ("flash", "mem_efficient", "cudnn", "math")})
    return info


class ItemTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise ItemTimeout("the time budget ran out during this item")


class Check:
    def __init__(self, args, cuda: bool) -> None:
        self.args, self.cuda, self.deadline = args, cuda, START + args.budget_s
        self.report: dict = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                             "started": _utc(), "items": []}

    def item(self, section: str, key: tuple, fn, need_s: float = 2.0):
        """Run ``fn`` as one item and store its result in ``report[section][key...]``; never raises."""
        name, entry = f"{section} " + " ".join(map(str, key)), {"section": section, "key": list(key)}
        left, t0 = self.deadline - time.monotonic(), time.monotonic()
        result: object = None
        if left < need_s:
            entry.update(status="skipped", reason=f"time budget: {max(left, 0):.0f} s left")
        else:
            if hasattr(signal, "setitimer"):
                signal.signal(signal.SIGALRM, _alarm)
                signal.setitimer(signal.ITIMER_REAL, left)
            try:
                result, entry["status"] = fn(), "ok"
            except ItemTimeout as err:
                entry.update(status="timed out", error=str(err))
            except NotImplementedError as err:  # an engine refusing a model (ghost on BatchNorm): the message says
                entry.update(status="not applicable" if str(err).startswith("engine") else "error", error=str(err))
            except Exception as err:  # noqa: BLE001 - recorded; the other items go on
                entry.update(status="error", error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-3000:])
                if self.cuda:
                    _try(torch.cuda.empty_cache)
            finally:
                if hasattr(signal, "setitimer"):
                    signal.setitimer(signal.ITIMER_REAL, 0)
        entry["seconds"] = round(time.monotonic() - t0, 2)
        self.report["items"].append({"item": name, **entry})
        node = self.report.setdefault(section, {})
        for k in key[:-1]:
            node = node.setdefault(str(k), {})
        node[str(key[-1])] = result if entry["status"] == "ok" else {k: v for k, v in entry.items() if k != "trace"}
        summary = _summary(result) if entry["status"] == "ok" else f"{entry['status']}: {_why(entry)}"
        print(f"[{time.monotonic() - START:6.1f}s] {name}: {summary.splitlines()[0][:150]}", flush=True)
        self.save()
        return result

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - START, 1)
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "gpu_check.json").write_text(json.dumps(self.report, indent=1, default=str))


def _why(entry: dict) -> str:
    return entry.get("error", entry.get("reason", ""))


def _utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _summary(result) -> str:
    if isinstance(result, dict) and "ratio" in result:
        r = result
        return f"{r['step_ms']:.2f} ms vs plain {r['plain_ms']:.2f} ms: x{r['ratio']:.2f} ({r['engine']})"
    if isinstance(result, dict) and "per_step" in result:
        return f"{result['per_step']} per step, {result['first_step']} in the first ({result['engine']})"
    return json.dumps(result, default=str)[:150]


def run(check: Check) -> None:
    args, cuda, device = check.args, check.cuda, "cuda" if check.cuda else "cpu"
    check.report["machine"] = describe(cuda, args.commit)
    print(json.dumps(check.report["machine"], indent=1, default=str), flush=True)
    import step_cost

    setups: dict = {}

    def setup(model: str, batch: int):
        if (model, batch) not in setups:
            setups.clear()  # one model's tensors on the device at a time
            setups[(model, batch)] = step_cost.Setup(model, args.meta_batch, batch, device)
        return setups[(model, batch)]

    def timing(batch: int, dtype: str) -> None:
        for model in args.models:
            for v in variants():
                check.item("timing", (f"batch={batch}", dtype, model, v.name),
                           lambda m=model, v=v: time_variant(setup(m, batch), v, dtype, args.repeats, args.warmup))

    batch = args.batch
    timing(batch, "float32")
    for model in args.models:
        for engine, lookahead in SYNC_ENGINES:
            v = step_cost.Variant(engine, "reweight", engine, lookahead)
            check.item("syncs", (model, engine), lambda m=model, v=v: count_syncs(setup(m, batch), v, args.sync_steps))
    if "transformer" in args.models:
        for dtype in args.dtypes:
            for v in variants():
                check.item("sdpa", (dtype, v.name), lambda d=dtype, v=v: sdpa_kernels(setup(MODELS[0], batch), v, d))
    for dtype in args.dtypes[1:]:
        timing(args.batch, dtype)
    gpus = torch.cuda.device_count() if cuda else 0
    backend = "nccl" if cuda else "gloo"
    for kind in EQUALITY:
        if cuda and gpus < 2:
            check.report[kind] = {"status": "skipped: one GPU" if gpus == 1 else f"skipped: {gpus} GPUs"}
        elif not cuda and not args.ddp:
            check.report[kind] = {"status": "skipped: --device cpu without --ddp"}
        else:
            left = check.deadline - time.monotonic()  # the ranks are killed well before the item's own deadline
            check.item(kind, (backend,), lambda k=kind, s=left: equality_check(k, backend, s - 20), 40)
    if args.large_batch:
        for dtype in args.dtypes:
            timing(args.large_batch, dtype)
    check.report["finished"] = _utc()


def _cell(row) -> str:
    if not isinstance(row, dict):
        return "-"
    if "ratio" in row:
        return f"{row['step_ms']:.2f} | {row['ratio']:.2f}"
    return f"{row.get('status', '?')} | -"


def markdown(report: dict) -> str:
    m = report.get("machine", {})
    lines = ["# GPU check", "", f"`{report.get('command')}`: {report.get('started')}, {report.get('elapsed_s')} s", "",
             "| machine | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in m.items()]
    for batch, by_dtype in report.get("timing", {}).items():
        for dtype, by_model in by_dtype.items():
            models = list(by_model)
            lines += ["", f"## Step cost, {batch}, {dtype}: ms per step and x the plain step timed beside it", "",
                      "| variant | " + " | ".join(f"{m} ms | x plain" for m in models) + " |",
                      "| --- |" + " --- | --- |" * len(models)]
            for v in dict.fromkeys(v for rows in by_model.values() for v in rows):
                lines.append(f"| {v} | " + " | ".join(_cell(by_model[m].get(v)) for m in models) + " |")
    syncs = report.get("syncs", {})
    if syncs:
        models = list(syncs)
        lines += ["", "## Host synchronisations in `MetaReweighter.step`: per step (first step; whole step)", "",
                  "| engine | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
        for engine in dict.fromkeys(e for rows in syncs.values() for e in rows):
            cells = [syncs[m].get(engine, {}) for m in models]
            lines.append(f"| {engine} | " + " | ".join(
                f"{c['per_step']} ({c['first_step']}; {c['whole_per_step']})" if "per_step" in c
                else c.get("status", "-") for c in cells) + " |")
    if report.get("sdpa"):
        lines += ["", "## Attention operators per pass (transformer; the profiler's op names, with calls)", "",
                  "| dtype | variant | pass: operators |", "| --- | --- | --- |"]
        for dtype, rows in report["sdpa"].items():
            for v, found in rows.items():
                text = "; ".join(f"{w}: " + ", ".join(f"{op.removeprefix('aten::')} x{n}" for op, n in ops.items()
                                                      if op != "aten::scaled_dot_product_attention")
                                 for w, ops in found.items()) if "status" not in found else found["status"]
                lines.append(f"| {dtype} | {v} | {text} |")
    for kind, title in (("ddp", "DDP"), ("fsdp2", "FSDP2")):
        source = f"tests/test_{kind.rstrip('2')}.py"
        lines += ["", f"## {title} equality checks ({source}'s configurations on two ranks)", ""]
        for backend, rows in report.get(kind, {}).items():
            if not isinstance(rows, dict) or "status" in rows:  # skipped, or the item's failure
                lines.append(f"{backend}: {rows if not isinstance(rows, dict) else rows['status'] + ': ' + _why(rows)}")
                continue
            lines += ["| config | ranks identical | max diff to one process | engine | ok |", "| --- |" + " --- |" * 4]
            lines += [f"| {n} | {c['ranks_identical']} | {c['max_diff_to_single']:.2g} | {c['engine']} | {c['ok']} |"
                      for n, c in rows.items() if isinstance(c, dict)]
    bad = [i for i in report["items"] if i["status"] not in ("ok", "not applicable")]
    lines += ["", f"## Items not run or failed ({len(bad)} of {len(report['items'])})", ""]
    lines += [f"- {i['item']}: {i['status']}: {_why(i)}".splitlines()[0] for i in bad]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.json and .md")
    parser.add_argument("--budget-s", type=float, default=420, help="time budget from the start (default 420 s)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the same code on the CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny batches and repeats (a test of the script)")
    parser.add_argument("--models", nargs="+", choices=MODELS, help=f"default {MODELS}; --smoke: {SMOKE_MODELS}")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch", type=int, default=100, help="training batch (step_cost's 100)")
    parser.add_argument("--large-batch", type=int, default=1024, help="timed again at this batch last; 0: not")
    parser.add_argument("--meta-batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per variant (medians)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (each x the interval) before timing")
    parser.add_argument("--sync-steps", type=int, default=4, help="steps whose synchronisations are counted")
    parser.add_argument("--ddp", action="store_true", help="with --device cpu: run the DDP and FSDP2 checks on gloo")
    parser.add_argument("--commit", help="the tree's commit, recorded instead of git's answer (a copy without .git)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.meta_batch, args.large_batch, args.repeats, args.warmup, args.sync_steps = 2, 2, 0, 1, 1, 2
    args.models = args.models or (SMOKE_MODELS if args.smoke else MODELS)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        return 0
    if not cuda:
        torch.set_num_threads(1)
    check, code = Check(args, cuda), 0
    try:
        run(check)
    except BaseException as err:  # noqa: BLE001 - whatever stopped the run, what it measured is written
        check.report["fatal"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
        print(check.report["fatal"], file=sys.stderr, flush=True)
        code = 1
    check.save()
    try:
        text = markdown(check.report)
    except Exception:  # noqa: BLE001 - the JSON holds everything
        text = f"The summary failed; gpu_check.json holds the results.\n\n```\n{traceback.format_exc()}```\n"
    (args.out / "gpu_check.md").write_text(text)
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md in {time.monotonic() - START:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
