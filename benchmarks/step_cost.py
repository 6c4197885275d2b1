"""Cost of a reweighted training step relative to a plain one, per engine, look-ahead and interval.

Every timing is a ratio measured in one process: each repeat times a plain step and then the variant's
step(s) on identical copies of the model, and the table reports the median of the per-repeat ratios,
so machine load that drifts during the run cancels out. Peak memory is measured per variant in a fresh
subprocess, as the growth of the resident set over the RSS after setup and as the peak of live tensor
bytes (from the profiler's allocation events, independent of the C allocator). ``--allocator retain``
keeps glibc from returning freed memory to the kernel (see :func:`retain_freed_memory`).

Every measurement is appended as a row of ``benchmarks/results/step_cost.jsonl`` (``_store``), under the
run name given by ``--run``, with the options and provenance of the run; the tables printed are rendered
from those rows, and ``--report RUN ...`` renders them again from the table alone.

``--modes eager compiled`` adds each plain and reweighting variant with the model under ``torch.compile``
(inductor; the reweighter gets the compiled wrapper), timed against a compiled plain step; with
``--components`` it adds the parts of a compiled model's ghost step. ``--model`` also takes ``mlp``, ``vit``
(timm's ViT-Tiny on 32x32 images) and ``llama_lora`` (a tiny random Llama with LoRA adapters, causal LM loss).

    python benchmarks/step_cost.py --model resnet32 transformer --repeats 7 --memory --run my-machine
    python benchmarks/step_cost.py --report my-machine
    python benchmarks/step_cost.py --model llama_lora --only ghost/full/k=1 forward/full/k=1 --exact \
        --modes eager compiled --batch 16 --meta-batch 16 --clock cpu --run my-compile
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _store  # noqa: E402
from _models import MODELS, make_problem, per_sample_loss  # noqa: E402

from reweight import MetaReweighter  # noqa: E402
from reweight.presets import PRESETS  # noqa: E402

LR = 0.1
TABLE = _store.RESULTS / "step_cost.jsonl"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "plain", "reference", "floor", "floor-in-place" or "reweight"
    engine: str = "-"
    lookahead: str = "-"
    interval: int = 1
    meta_batch: int = 100
    preset: str | None = None  # MetaReweighter(preset=...): engine, look-ahead and interval from the preset
    compiled: bool = False  # the model under torch.compile (the reweighter gets the compiled wrapper)
    net: str = "lossnet"  # the reweighter's net (--net; the gated net, the default, reads the logits too)
    loss_history: bool = False  # MetaReweighter(loss_history=True), the batch's sample ids given to each step
    veto_evidence: float | None = None  # MetaReweighter(veto_evidence=...) when given (0: no evidence kept)


def compiled_variant(variant: Variant) -> Variant:
    """``variant`` with the model compiled: timed against a compiled plain step (a plain step's compiled
    variant against the eager plain step)."""
    return replace(variant, name=f"{variant.name} compiled", compiled=True)


def variants() -> list[Variant]:
    out = [Variant("plain", "plain"), Variant("reference flow (MW-Net code)", "reference", engine="reverse*")]
    for meta in (100, 25):
        out.append(Variant(f"head floor (plain + no-grad meta fwd), m={meta}", "floor", meta_batch=meta))
    # the same passes in the order a reweighted step runs them: the meta forward while the batch's graph is alive
    out.append(Variant("head floor in place (fwd, no-grad meta fwd, bwd), m=100", "floor-in-place"))
    for lookahead, engines in [
        ("full", ["ghost", "ghost_lean", "forward", "reverse", "finite_difference", "higher"]),
        ("head", ["linear_head", "forward", "reverse", "finite_difference", "higher"]),
    ]:
        for engine in engines:
            for interval in (1, 10):
                out.append(Variant(f"{engine}/{lookahead}/k={interval}", "reweight", engine, lookahead, interval))
    out.append(Variant("linear_head/head/k=1, m=25", "reweight", "linear_head", "head", 1, 25))
    out.append(Variant("forward/full/k=1, m=25", "reweight", "forward", "full", 1, 25))
    out.append(Variant("ghost/full/k=1, m=25", "reweight", "ghost", "full", 1, 25))
    for preset in PRESETS:
        interval = PRESETS[preset].get("interval", PRESETS["exact"]["interval"])
        out.append(Variant(f"preset={preset}", "reweight", "auto", "full", interval, preset=preset))
        name = f"preset={preset}, loss history"
        out.append(Variant(name, "reweight", "auto", "full", interval, preset=preset, loss_history=True))
        name = f"preset={preset}, veto from the first update"  # veto_evidence=0: no evidence of label noise kept
        out.append(Variant(name, "reweight", "auto", "full", interval, preset=preset, veto_evidence=0.0))
    return out


class Setup:
    """A model, its optimizer and batches; ``plain_step`` and the variant's step act on their own copies.

    ``loss`` is the model's per-sample loss of its output (:func:`_models.per_sample_loss`; a Hugging Face
    output's ``logits``), ``call`` calls a model on inputs (keyword arguments when they are a dict)."""

    def __init__(self, model_name: str, meta_batch: int, batch: int = 100, device: str | torch.device = "cpu") -> None:
        self.model, (self.x, self.y), (self.xm, self.ym), self.k = make_problem(model_name, batch, meta_batch)
        self.model.to(device).train()
        self.x, self.y, self.xm, self.ym = (_to(t, device) for t in (self.x, self.y, self.xm, self.ym))
        self.loss_fn = per_sample_loss(model_name) if model_name == "llama_lora" else None
        self._loss = per_sample_loss(model_name)

    def loss(self, out, y: torch.Tensor) -> torch.Tensor:
        return self._loss(out if isinstance(out, torch.Tensor) else out.logits, y)

    @staticmethod
    def call(model: Callable, x):
        return model(**x) if isinstance(x, dict) else model(x)

    def fresh(self):
        model = copy.deepcopy(self.model)
        trained = [p for p in model.parameters() if p.requires_grad]  # a LoRA model's adapters
        return model, torch.optim.SGD(trained, lr=LR, momentum=0.9, weight_decay=5e-4)


def _to(t, device):
    return {k: v.to(device) for k, v in t.items()} if isinstance(t, dict) else t.to(device)


def make_step(setup: Setup, variant: Variant) -> Callable[[], None]:
    model, opt = setup.fresh()
    x, y, xm, ym = setup.x, setup.y, setup.xm, setup.ym
    forward = torch.compile(model) if variant.compiled else model
    if variant.kind in ("floor", "reference") and (variant.compiled or setup.loss_fn is not None):
        raise NotImplementedError(f"{variant.kind} variants run on eager classifiers only")

    def weighted_update(weights):
        loss = (weights * setup.loss(logits_holder[0], y)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    logits_holder: list[torch.Tensor] = []

    if variant.kind == "plain":

        def step():
            loss = setup.loss(setup.call(forward, x), y).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    if variant.kind == "floor":

        def step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                buffers = {k: b.clone() for k, b in model.named_buffers()}
                functional_call(model, buffers, (xm,))

        return step

    if variant.kind == "floor-in-place":

        def step():
            logits = model(x)
            with torch.no_grad():
                buffers = {k: b.clone() for k, b in model.named_buffers()}
                functional_call(model, buffers, (xm,))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    if variant.kind == "reference":
        vnet = torch.nn.Sequential(
            torch.nn.Linear(1, 100), torch.nn.ReLU(), torch.nn.Linear(100, 1), torch.nn.Sigmoid()
        )
        vopt = torch.optim.Adam(vnet.parameters(), lr=1e-3, weight_decay=1e-4)

        def step():
            meta_model = copy.deepcopy(setup.model)  # the reference builds a new network every step
            meta_model.load_state_dict(model.state_dict())
            params = dict(meta_model.named_parameters())
            cost = F.cross_entropy(meta_model(x), y, reduction="none")
            w = vnet(cost.detach().unsqueeze(1)).squeeze(1)
            grads = torch.autograd.grad((cost * w).sum() / len(cost), list(params.values()), create_graph=True)
            fast = {k: p - LR * g for (k, p), g in zip(params.items(), grads)}
            fast.update({k: b for k, b in meta_model.named_buffers()})
            meta_loss = F.cross_entropy(functional_call(meta_model, fast, (xm,)), ym)
            vopt.zero_grad()
            meta_loss.backward()
            vopt.step()
            logits = model(x)  # the third forward
            cost = F.cross_entropy(logits, y, reduction="none")
            with torch.no_grad():
                w = vnet(cost.unsqueeze(1)).squeeze(1)
                w = w / (w.sum() + (w.sum() == 0).float())
            loss = (cost * w).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    kw = {} if setup.loss_fn is None else {"loss_fn": setup.loss_fn}
    kw["loss_history"] = variant.loss_history
    if variant.veto_evidence is not None:
        kw["veto_evidence"] = variant.veto_evidence
    ids = torch.arange(setup.y.shape[0]) if variant.loss_history else None  # the same samples each step
    if variant.preset is not None:
        reweighter = MetaReweighter(forward, opt, [(xm, ym)], net=variant.net, preset=variant.preset, seed=0, **kw)
    else:
        reweighter = MetaReweighter(
            forward,
            opt,
            [(xm, ym)],
            net=variant.net,
            engine=variant.engine,
            lookahead=variant.lookahead if variant.lookahead in ("full", "head") else [variant.lookahead],
            interval=variant.interval,
            seed=0,
            **kw,
        )

    def step():
        logits_holder[:] = [setup.call(forward, x)]
        weighted_update(reweighter.step(x, y, logits_holder[0], sample_ids=ids))

    return step


def _run(model: Callable, state: dict, inputs) -> torch.Tensor:
    """``model``'s logits run statelessly with ``state`` (inputs as keyword arguments when a dict)."""
    if isinstance(inputs, dict):
        out = functional_call(model, state, args=(), kwargs=inputs)
    else:
        out = functional_call(model, state, (inputs,))
    return out if isinstance(out, torch.Tensor) else out.logits


def components(setup: Setup, compiled: bool = False) -> dict[str, Callable[[], None]]:
    """The passes an exact meta step is made of, each runnable alone (for the cost accounting). With
    ``compiled``, also what a ``torch.compile``d model's reweighted step is made of: the compiled plain step,
    the meta pass through the compiled model, the eager forward of the batch with grad, the ghost engine's
    captured forward and weighted gradient, and whole ghost steps, eager and compiled. The look-ahead
    parameters are the trained ones (a LoRA model's adapters)."""
    model = copy.deepcopy(setup.model)
    x, y, xm, ym = setup.x, setup.y, setup.xm, setup.ym
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    tangent = {k: 1e-3 * torch.randn_like(p) for k, p in params.items()}

    def buffers():
        return {k: b.clone() for k, b in model.named_buffers()}

    def plain():
        loss = setup.loss(setup.call(model, x), y).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()

    def forward_no_grad():
        with torch.no_grad():
            _run(model, buffers(), x)

    def forward_and_weighted_gradient():  # the user's forward, then grad of mean(w * L) with retain_graph
        losses = setup.loss(setup.call(model, x), y)
        torch.autograd.grad(losses.mean(), [p for p in model.parameters() if p.requires_grad], retain_graph=True)

    def meta_forward_backward():
        leaves = {k: p.clone().requires_grad_() for k, p in params.items()}
        loss = setup.loss(_run(model, {**leaves, **buffers()}, xm), ym).mean()
        torch.autograd.grad(loss, list(leaves.values()))

    def jvp() -> torch.Tensor:
        import torch.autograd.forward_ad as fwAD

        with torch.no_grad(), fwAD.dual_level():
            duals = {k: fwAD.make_dual(p, tangent[k]) for k, p in params.items()}
            losses = setup.loss(_run(model, {**duals, **buffers()}, x), y)
            return fwAD.unpack_dual(losses).tangent

    parts = {
        "plain step (forward + backward)": plain,
        "no-grad forward of the batch": forward_no_grad,
        "forward + weighted gradient (retain_graph)": forward_and_weighted_gradient,
        "meta forward + backward at theta_hat": meta_forward_backward,
        "JVP of the per-sample losses": jvp,
    } | ghost_components(setup, model, tangent, compiled)
    if compiled:
        compiled_model = torch.compile(copy.deepcopy(setup.model))

        def compiled_plain():
            loss = setup.loss(setup.call(compiled_model, x), y).mean()
            compiled_model.zero_grad(set_to_none=True)
            loss.backward()

        def forward_with_grad():
            setup.loss(setup.call(model, x), y)

        def compiled_meta_forward_backward():  # the meta pass through the compiled model (the engine's is eager)
            leaves = {f"_orig_mod.{k}": p.clone().requires_grad_() for k, p in params.items()}
            state = {**leaves, **{f"_orig_mod.{k}": b for k, b in buffers().items()}}
            loss = setup.loss(_run(compiled_model, state, xm), ym).mean()
            torch.autograd.grad(loss, list(leaves.values()))

        ghost = Variant("ghost/full/k=1", "reweight", "ghost", "full", 1, len(ym))
        parts |= {
            "compiled plain step (forward + backward)": compiled_plain,
            COMPILED_META: compiled_meta_forward_backward,
            "forward of the batch with grad": forward_with_grad,
            "ghost/full/k=1 step": make_step(setup, ghost),
            "ghost/full/k=1 compiled step": make_step(setup, compiled_variant(ghost)),
        }
    return parts


def ghost_components(setup: Setup, model: torch.nn.Module, tangent: dict, accounting: bool = False) -> dict:
    """The ghost engine's own passes: its backward of the unweighted losses to the recorded layer outputs,
    and the per-layer inner products (on a capture of one forward with grad, made once here); with
    ``accounting``, also its captured forward of the batch and its weighted gradient."""
    from types import SimpleNamespace

    from reweight.engines.ghost import LayerCapture, layer_output_gradients, weighted_gradients
    from reweight.engines.ghost import inner_products as ghost_inner_products
    from reweight.losses import cross_entropy

    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return {}  # ghost refuses BatchNorm in train mode
    x, y = setup.x, setup.y
    roots, n = (list(x.values()) if isinstance(x, dict) else [x]), len(y)

    def captured_forward() -> tuple[LayerCapture, torch.Tensor]:  # the engine's own forward of the batch, recorded
        leaves = {k: p.detach().requires_grad_() for k, p in model.named_parameters() if p.requires_grad}
        capture = LayerCapture(leaves, roots, n)
        with capture:
            logits = _run(model, {**leaves, **{k: b.clone() for k, b in model.named_buffers()}}, x)
        return capture, logits

    capture, logits = captured_forward()
    loss_fn = setup.loss_fn or cross_entropy
    problem = SimpleNamespace(train_logits=logits, loss_fn=loss_fn, targets=y)  # what the function reads
    grads: list = []
    coef = torch.full((n,), 1.0 / n)

    def weighted_gradient():
        with torch.no_grad():
            weighted_gradients(capture, grads, coef)

    def backward_to_layer_outputs():  # with the per-sample gradients formed on the way, as the engine does
        grads[:] = layer_output_gradients(problem, capture, retain=True)  # type: ignore[arg-type]

    def inner_products():
        with torch.no_grad():
            ghost_inner_products(capture, tangent, grads)

    backward_to_layer_outputs()
    parts = {
        "ghost: backward to the layer outputs, with the per-sample gradients it keeps": backward_to_layer_outputs,
        "ghost: per-layer inner products": inner_products,
    }
    if accounting:
        parts["ghost: its own forward of the batch, captured"] = captured_forward
        parts["ghost: weighted gradient from the layer gradients"] = weighted_gradient
    return parts


def time_components(setup: Setup, repeats: int, compiled: bool = False) -> dict[str, dict[str, float]]:
    """Median cost of each pass relative to an interleaved (eager) plain step, and its median time in ms; a
    pass torch cannot run on the model (forward AD through a CPU flash attention) is left out."""
    parts = components(setup, compiled)
    plain = parts["plain step (forward + backward)"]
    for name, fn in list(parts.items()):
        try:
            fn()
        except NotImplementedError as err:
            print(f"{name}: not applicable ({str(err).splitlines()[0]})", file=sys.stderr)
            del parts[name]
    for _ in range(2 if compiled else 0):  # further warm-up (compilation)
        for fn in parts.values():
            fn()
    ratios: dict[str, list[float]] = {name: [] for name in parts}
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            p = timed(plain, 1)
            times[name].append(timed(fn, 1))
            ratios[name].append(times[name][-1] / p)
    median = statistics.median
    return {name: {"ratio": median(ratios[name]), "ms": 1e3 * median(times[name])} for name in parts}


CLOCK: Callable[[], float] = time.perf_counter  # --clock cpu: time.process_time


def timed(fn: Callable[[], None], calls: int) -> float:
    start = CLOCK()
    for _ in range(calls):
        fn()
    return (CLOCK() - start) / calls


def time_variant(setup: Setup, variant: Variant, repeats: int, block: int = 1) -> dict:
    """Median per-repeat ratio of the variant's step time to a plain step's; each repeat times ``block``
    consecutive plain steps, then ``block`` consecutive variant steps (times its interval: amortised). A
    compiled variant is timed against a compiled plain step, the compiled plain step against the eager one."""
    if variant.compiled:
        torch.compiler.reset()  # earlier variants' compiled code counts against the recompile limit
    plain = make_step(setup, Variant("plain", "plain", compiled=variant.compiled and variant.kind != "plain"))
    step = make_step(setup, variant)
    calls = block * variant.interval
    for _ in range(3 if variant.compiled else 1):  # warm-up: compilation, allocator, oneDNN primitives, lazy imports
        plain(), step()
    ratios, plain_times, times = [], [], []
    for _ in range(repeats):
        p = timed(plain, block)
        t = timed(step, calls)
        plain_times.append(p)
        times.append(t)
        ratios.append(t / p)
    return {
        "plain_ms": 1e3 * statistics.median(plain_times),
        "step_ms": 1e3 * statistics.median(times),
        "ratio": statistics.median(ratios),
    }


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def live_by_phase(fn: Callable[[], None]) -> dict[str, tuple[float, float]]:
    """Bytes held by live tensors (MiB over those held when ``fn`` starts) as each ``reweight.<phase>``
    profiler range begins and at its highest inside it, for the first run of each phase in ``fn``; the
    key ``"step"`` covers all of ``fn``.

    Counted from the profiler's allocation and free events (``profile_memory``), so unlike the RSS it
    does not depend on what the C allocator keeps or returns: the memory a caching device allocator
    would have to provide.
    """
    from bisect import bisect_left, bisect_right

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    times, live, total = [], [], 0
    for e in events:
        if e.name() == "[memory]":
            total += e.nbytes()
            times.append(e.start_ns())
            live.append(total)
    ranges: dict[str, tuple[int, int]] = {}
    for e in events:
        if e.name().startswith("reweight.") and e.name() not in ranges:
            ranges[e.name()] = (e.start_ns(), e.start_ns() + e.duration_ns())
    out = {"step": (0.0, max([0, *live]) / 2**20)}
    for name, (begin, end) in ranges.items():
        i, j = bisect_left(times, begin), bisect_right(times, end)
        at_start = live[i - 1] if i else 0
        out[name.removeprefix("reweight.")] = (at_start / 2**20, max([at_start, *live[i:j]]) / 2**20)
    return out


def live_peak_mb(fn: Callable[[], None]) -> float:
    """Peak bytes held by live tensors while ``fn`` runs, over those held when it starts (MiB)."""
    return live_by_phase(fn)["step"][1]


def render_phases(model_name: str, phases: dict[str, dict[str, tuple[float, float]]]) -> str:
    lines = [
        f"### {model_name}: live tensor MiB in one step (over the step's start; the user's forward first)",
        "",
        "| variant | phase | at its start | highest in it |",
        "| --- | --- | --- | --- |",
    ]
    for name, by_phase in phases.items():
        for phase, (at_start, peak) in by_phase.items():
            lines.append(f"| {name} | {phase} | {at_start:.1f} | {peak:.1f} |")
    return "\n".join(lines)


def measure_memory(model_name: str, variant: Variant, batch: int = 100) -> tuple[float, float, float]:
    """Peak RSS growth over the RSS after setup, the process's peak RSS, and the peak of live tensor
    bytes (:func:`live_peak_mb`), in MiB, over ``max(3, interval)`` steps of ``variant``; run in a fresh
    process.

    The RSS peak is the kernel's high-water mark ``VmHWM``, reset after setup through ``/proc/self/clear_refs``
    (``ru_maxrss`` is no use here: Linux carries it over from the parent across ``exec``). The live-bytes
    peak is taken afterwards, over as many further steps.
    """
    setup = Setup(model_name, variant.meta_batch, batch)
    step = make_step(setup, variant)
    steps = max(3, variant.interval)
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    for _ in range(steps):
        step()
    peak = _status_mb("VmHWM")

    def more_steps() -> None:
        for _ in range(steps):
            step()

    return peak - before, peak, live_peak_mb(more_steps)


def memory_in_subprocess(model_name: str, variant: Variant, allocator: str, batch: int = 100) -> tuple[float, ...]:
    cmd = [sys.executable, __file__, "--model", model_name, "--allocator", allocator, "--batch", str(batch)]
    out = subprocess.run(cmd + ["--memory-of", json.dumps(asdict(variant))], capture_output=True, text=True, check=True)
    return tuple(float(v) for v in out.stdout.strip().splitlines()[-1].split())


def retain_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    By default large blocks are unmapped or trimmed when freed, and touching them again costs page
    faults (kernel time): a reweighted step, which allocates and frees several times a plain step's
    activations, pays for them far more than a plain step does. jemalloc or tcmalloc, or the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``, do the same for any program.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as err:
        raise SystemExit(f"--allocator retain needs glibc ({err})") from err
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("--allocator retain: mallopt refused the thresholds")


def render(model_name: str, rows: list[dict]) -> str:
    lines = [
        f"### {model_name}",
        "",
        "| variant | engine | look-ahead | k | meta | step ms | x plain | step MiB | x plain | peak MiB | x plain "
        "| live MiB | x plain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    plain = next((r for r in rows if r["kind"] == "plain"), {})

    def cells(r: dict, key: str) -> str:
        if r.get(key) is None or not plain.get(key):
            return "- | -"
        return f"{r[key]:.0f} | {r[key] / plain[key]:.2f}"

    for r in rows:
        lines.append(
            f"| {r['name']} | {r['engine']} | {r['lookahead']} | {r['interval']} | {r['meta_batch']} | "
            + (f"{r['step_ms']:.0f} | {r['ratio']:.2f} | " if "step_ms" in r else "- | - | ")
            + f"{cells(r, 'mem')} | {cells(r, 'peak_rss')} | {cells(r, 'live')} |"
        )
    return "\n".join(lines)


def render_components(model_name: str, results: dict[str, dict[str, float]], repeats) -> str:
    lines = [f"### {model_name}: cost of each pass, x a plain step (median of {repeats})", ""]
    if all("ms" in r for r in results.values()):
        lines += ["| pass | x plain step | ms |", "| --- | --- | --- |"]
        lines += [f"| {name} | {r['ratio']:.2f} | {r['ms']:.1f} |" for name, r in results.items()]
    else:
        lines += ["| pass | x plain step |", "| --- | --- |"]
        lines += [f"| {name} | {r['ratio']:.2f} |" for name, r in results.items()]
    return "\n".join(lines)


def report(table: Path, runs: list[str]) -> str:
    """The tables of ``runs`` (timings and memory per variant, pass costs, phases), rendered from the table's
    rows alone, each run with the code versions behind it."""
    out = []
    for run in runs:
        rs = [r for r in _store.latest(table) if r["key"]["run"] == run]
        if not rs:
            raise SystemExit(f"no rows of run {run!r} in {table}")
        models = list(dict.fromkeys(r["key"]["model"] for r in rs))
        opts = rs[0].get("options") or {}
        out.append(f"## {run}\n\nOptions: " + ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) + ".")
        for model in models:
            mine = [r for r in rs if r["key"]["model"] == model]
            measures = {r["key"]["measure"] for r in mine}
            if measures & {"timing", "memory"}:
                by = {}
                for r in mine:  # timing and memory rows of a variant are one line
                    by.setdefault(r["key"]["variant"], {**r["variant"]}).update(r["result"])
                out.append(render(model, list(by.values())))
            if "component" in measures:
                results = {r["key"]["variant"]: r["result"] for r in mine if r["key"]["measure"] == "component"}
                out.append(render_components(model, results, opts.get("repeats", "?")))
            if "phase" in measures:
                phases: dict[str, dict[str, tuple[float, float]]] = {}
                for r in mine:
                    if r["key"]["measure"] == "phase":
                        res = r["result"]
                        by_phase = phases.setdefault(r["key"]["variant"], {})
                        by_phase[r["key"]["phase"]] = (res["start_mib"], res["peak_mib"])
                out.append(render_phases(model, phases))
        out.append(_store.provenance_note(rs))
    return "\n\n".join(out)


def compile_report(table: Path, runs: list[str]) -> str:
    """Eager against compiled, per model and variant of ``runs`` (``--modes eager compiled``): each step's ms,
    its ratio to its own plain step (the compiled plain step's: to the eager one) and the ms it adds."""
    lines = [
        "| model | variant | eager ms | x eager plain | added ms | compiled ms | x compiled plain | added ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rs = [r for r in _store.latest(table) if r["key"]["run"] in runs and r["key"]["measure"] == "timing"]
    if not rs:
        raise SystemExit(f"no timing rows of runs {runs} in {table}")
    in_order = sorted(rs, key=lambda r: runs.index(r["key"]["run"]))  # the runs' order, then the rows'
    for run, model in dict.fromkeys((r["key"]["run"], r["key"]["model"]) for r in in_order):
        by = {r["key"]["variant"]: r["result"] for r in rs if (r["key"]["run"], r["key"]["model"]) == (run, model)}
        for name in [n for n in by if not n.endswith(" compiled")]:
            e, c = by[name], by.get(f"{name} compiled")
            added = "-" if name == "plain" else f"{e['step_ms'] - e['plain_ms']:.1f}"
            cells = [f"{e['step_ms']:.1f}", f"{e['ratio']:.2f}", added]
            if c is None:
                cells += ["-", "-", "-"]
            else:
                added = "-" if name == "plain" else f"{c['step_ms'] - c['plain_ms']:.1f}"
                cells += [f"{c['step_ms']:.1f}", f"{c['ratio']:.2f}", added]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    opts = rs[0].get("options") or {}
    head = f"Runs {', '.join(runs)}; options: " + ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) + "."
    return "\n".join([head, "", *lines, "", _store.provenance_note(rs)])


ACCOUNTING = [  # (part, its component in the eager step, in the compiled step)
    ("the user's forward and backward (a plain step)", "plain step (forward + backward)",
     "compiled plain step (forward + backward)"),
    ("ghost: its own forward of the batch, captured", None, "ghost: its own forward of the batch, captured"),
    ("the capture of the user's forward (captured forward less a forward with grad)", "capture", None),
    ("ghost: backward to the layer outputs", "ghost: backward to the layer outputs, with the per-sample gradients "
     "it keeps", "same"),
    ("ghost: weighted gradient from the layer gradients", "ghost: weighted gradient from the layer gradients", "same"),
    ("meta forward + backward at theta_hat", "meta forward + backward at theta_hat", "same"),
    ("ghost: per-layer inner products", "ghost: per-layer inner products", "same"),
]  # fmt: skip


COMPILED_META = "meta forward + backward at theta_hat, through the compiled model"


def compile_accounting(table: Path, run: str) -> str:
    """Where a ghost step's time goes, eager and with the model compiled, from the components of ``run``
    (``--components --modes compiled``): each part's median ms, the rest (the step less its parts: the
    weighting net's passes and update, RNG isolation, checks), and each step's ratio to its plain step."""
    rs = [r for r in _store.latest(table) if r["key"]["run"] == run and r["key"]["measure"] == "component"]
    if not rs:
        raise SystemExit(f"no component rows of run {run!r} in {table}")
    out = []
    for model in dict.fromkeys(r["key"]["model"] for r in rs):
        ms = {r["key"]["variant"]: r["result"]["ms"] for r in rs if r["key"]["model"] == model}
        ms["capture"] = ms["ghost: its own forward of the batch, captured"] - ms["forward of the batch with grad"]
        steps = (ms["ghost/full/k=1 step"], ms["ghost/full/k=1 compiled step"])
        lines = [f"### {model}", "", "| part | eager step ms | compiled step ms |", "| --- | ---: | ---: |"]
        totals = [0.0, 0.0]
        for part, eager, compiled in ACCOUNTING:
            cells = []
            for i, name in enumerate((eager, eager if compiled == "same" else compiled)):
                cells.append("-" if name is None else f"{ms[name]:.1f}")
                totals[i] += 0.0 if name is None else ms[name]
            lines.append(f"| {part} | {cells[0]} | {cells[1]} |")
        rest = [f"{step - total:.1f}" for step, total in zip(steps, totals)]
        plains = (ms[ACCOUNTING[0][1]], ms[ACCOUNTING[0][2]])
        lines.append(f"| the rest (the step less the parts above) | {rest[0]} | {rest[1]} |")
        lines.append(f"| the reweighted step (ghost/full/k=1) | {steps[0]:.1f} | {steps[1]:.1f} |")
        lines.append(f"| x its plain step | {steps[0] / plains[0]:.2f} | {steps[1] / plains[1]:.2f} |")
        forward, meta = ms["forward of the batch with grad"], ms[COMPILED_META]
        lines.append(f"| not in the steps: a forward of the batch with grad | {forward:.1f} | {forward:.1f} |")
        lines.append(f"| not in the steps: the meta forward + backward through the compiled model | - | {meta:.1f} |")
        out.append("\n".join(lines))
    opts = rs[0].get("options") or {}
    head = f"Run {run}; options: " + ", ".join(f"{k}={v}" for k, v in sorted(opts.items()))
    head += "; median ms of each part."
    return "\n\n".join([head, *out, _store.provenance_note(rs)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        nargs="+",
        default=["resnet32", "resnet32gn", "transformer"],
        choices=MODELS,
    )
    parser.add_argument("--batch", type=int, default=100, help="training batch size (default: 100)")
    parser.add_argument(
        "--meta-batch", type=int, default=None, help="meta batch size of every variant (default: each variant's own)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["eager"],
        choices=["eager", "compiled"],
        help="eager, and/or the plain and reweighting variants with the model under torch.compile (inductor)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall-clock time, or this process's CPU time (steadier on a machine shared with other jobs; "
        "with one thread the two agree on an idle machine)",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=1,
        help="consecutive steps per timed block (default 1: plain and variant steps alternate; a training "
        "loop runs reweighted steps back to back, which the C allocator may treat differently)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="substrings selecting variants by name")
    parser.add_argument("--exact", action="store_true", help="--only names variants in full (plain always runs)")
    parser.add_argument(
        "--lookahead",
        default=None,
        metavar="PATTERN",
        help="the full look-ahead's variants move only the parameters matching PATTERN (MetaReweighter's "
        "lookahead=, e.g. '*layers.1.*lora*'); their names say so",
    )
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, one subprocess per variant")
    parser.add_argument("--table", type=Path, default=TABLE, help="the table rows are appended to and read from")
    parser.add_argument(
        "--run", default=None, help="name of this run's rows in the table (default: step-cost-<UTC date and time>)"
    )
    parser.add_argument("--report", nargs="+", default=None, metavar="RUN", help="render these runs' tables and exit")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables printed to this file")
    parser.add_argument("--components", action="store_true", help="time each pass of a meta step instead")
    parser.add_argument("--memory-only", action="store_true", help="measure memory only (no timing)")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="live tensor memory at each phase of one step (the library's profiler ranges) instead",
    )
    parser.add_argument(
        "--allocator",
        choices=["system", "retain"],
        default="system",
        help="glibc malloc as configured (system), or told to keep freed memory (retain: no page faults "
        "from re-touching returned memory; see retain_freed_memory)",
    )
    parser.add_argument(
        "--net", default="lossnet", help="the weighting net of the reweighted variants (default: lossnet)"
    )
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch != 100 and args.phases:
        parser.error("--phases runs at batch 100")
    if args.report:
        print(report(args.table, args.report))
        return
    from tqdm import tqdm  # only the command line shows progress: importing this module needs torch alone

    torch.set_num_threads(args.threads)
    if args.allocator == "retain":
        retain_freed_memory()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    if args.memory_of:
        print(*measure_memory(args.model[0], Variant(**json.loads(args.memory_of)), args.batch))
        return

    run = args.run or "step-cost-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    prov = _store.provenance([__file__, *(sys.argv[1:] if argv is None else argv)])
    options = {"repeats": args.repeats, "clock": args.clock, "allocator": args.allocator, "block": args.block}
    options["threads"] = args.threads
    if args.batch != 100 or args.meta_batch is not None or args.modes != ["eager"]:
        options.update(batch=args.batch, meta_batch=args.meta_batch, modes=args.modes)
    if args.net != "lossnet":
        options["net"] = args.net
    rows = []

    def add(model_name: str, name: str, measure: str, result: dict, variant: Variant | None = None, **key) -> None:
        row = {"key": {"run": run, "model": model_name, "variant": name, "measure": measure, **key}}
        if variant is not None:
            row["variant"] = asdict(variant)
        rows.append({**row, "options": options, "result": result, "provenance": prov})

    def chosen(v: Variant) -> bool:
        if args.only is None or v.name == "plain":
            return True
        return v.name in args.only if args.exact else any(s in v.name for s in args.only + ["plain"])

    selected = [v for v in variants() if chosen(v)]
    if args.lookahead is not None:  # a partial look-ahead: the full look-ahead's variants, renamed
        selected = [
            replace(v, lookahead=args.lookahead, name=v.name.replace("/full/", f"/{args.lookahead}/"))
            if v.lookahead == "full" and v.preset is None
            else v
            for v in selected
        ]
    if args.meta_batch is not None:
        selected = [replace(v, meta_batch=args.meta_batch) for v in selected]
    if args.net != "lossnet":
        selected = [replace(v, net=args.net) if v.kind == "reweight" else v for v in selected]
    compiled = [compiled_variant(v) for v in selected if v.kind in ("plain", "reweight") and v.preset is None]
    selected = (selected if "eager" in args.modes else []) + (compiled if "compiled" in args.modes else [])
    if args.components:
        for model_name in args.model:
            setup = Setup(model_name, args.meta_batch or 100, args.batch)
            for name, result in time_components(setup, args.repeats, "compiled" in args.modes).items():
                add(model_name, name, "component", result)
    elif args.phases:
        for model_name in args.model:
            for variant in tqdm([v for v in selected if v.kind == "reweight"], desc=model_name):
                step = make_step(Setup(model_name, variant.meta_batch), variant)
                step(), step()  # warm-up; the third step is the one measured
                for phase, (at_start, peak) in live_by_phase(step).items():
                    add(model_name, variant.name, "phase", {"start_mib": at_start, "peak_mib": peak}, phase=phase)
    else:
        for model_name in args.model:
            setups: dict[int, Setup] = {}
            for variant in tqdm(selected, desc=model_name):
                if variant.meta_batch not in setups:
                    setups[variant.meta_batch] = Setup(model_name, variant.meta_batch, args.batch)
                setup = setups[variant.meta_batch]
                try:
                    timing = {} if args.memory_only else time_variant(setup, variant, args.repeats, args.block)
                    if args.memory:
                        mem = memory_in_subprocess(model_name, variant, args.allocator, args.batch)
                except (NotImplementedError, subprocess.CalledProcessError) as err:  # ghost on a BatchNorm model
                    tqdm.write(f"{variant.name:45s} not applicable: {str(err).splitlines()[0]}")
                    continue
                if timing:
                    add(model_name, variant.name, "timing", timing, variant)
                    tqdm.write(f"{variant.name:45s} {timing['step_ms']:8.0f} ms  x{timing['ratio']:.2f}")
                if args.memory:
                    add(model_name, variant.name, "memory", dict(zip(("mem", "peak_rss", "live"), mem)), variant)
    _store.append(args.table, rows)
    text = report(args.table, [run])
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
