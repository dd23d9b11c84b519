"""Where a training step's time goes: a profiler pass whose time is attributed to the parts of the model.

`profile_steps(step, model, n, device)` runs `step()` n times under torch.profiler and splits the step's
time into COMPONENTS. While it runs, forward hooks wrap every attention (MLA), MoE, router, routed-experts,
MLP (dense layer or shared experts), RMSNorm and head module's forward (and the trainer's chunked head +
loss) in a `record_function` range
(`deepmoe::attention`, ...). The hooks exist only inside `profile_steps`: the model's code carries no
labels, so unprofiled training pays nothing. Time is the device's kernel time on CUDA (what is left of
the step is "device idle": the GPU waiting for the host) and the ops' own CPU time on CPU (an op's time
without its children's, so nothing counts twice; on CPU the Python between ops is the step range's own
time, in "other").

The attribution rule, for each op, first match wins:
1. optimizer: inside `Optimizer.step` or `Optimizer.zero_grad`, or a `_foreach_*` / fused Adam op
   (gradient clipping's norms and scaling).
2. casts: a dtype conversion (`aten::to` / `aten::_to_copy` and what runs under it): autocast's bf16 copies
   of the fp32 weights and their gradients' copies back, the fp32 copy of the logits, the norms' upcasts.
   On CUDA a host<->device copy (`Memcpy HtoD`, `DtoH`) counts as other.
3. backward: an op run by an autograd node takes the label of the forward op that made the node. The
   profiler records autograd's sequence number on both (the node's and the forward op's), which is how
   backward time lands in the component whose forward pass caused it.
4. forward, by the innermost module range around the op, with GEMMs (`mm`, `addmm`, `bmm`, `matmul`,
   `linear`, `_grouped_mm` and what runs under them) told apart:
   - attention: GEMMs (the projections) → dense GEMMs; the rest (SDPA, RoPE, splits and concatenations)
     → attention
   - MLP (dense layers, shared experts): GEMMs → dense GEMMs; the rest (silu · mul) → activations
   - routed experts: GEMMs → expert GEMMs; silu and mul between the first and the last GEMM → activations;
     the rest (sort by expert, counts, offsets, gathering the token copies, weighting, the gather
     back) → dispatch/combine; so is what MoE does outside its children (adding the shared experts' output)
   - router: everything (its fp32 logits GEMM included) → router; RMSNorm → norms; lm_head → head + loss
   - outside every range: cross-entropy (`log_softmax`, `nll_loss`) → head + loss; a GEMM → dense GEMMs;
     the rest (the embedding, residual adds, the balancing counts and bias update, metrics, the batch
     fetch) → other
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity

from deepmoe.model.attention import MLA
from deepmoe.model.experts import Experts
from deepmoe.model.moe import MLP, MoE
from deepmoe.model.norm import RMSNorm
from deepmoe.model.router import Gate

ATTENTION, ROUTER, DISPATCH, EXPERT_GEMMS, DENSE_GEMMS = (
    "attention", "router", "dispatch/combine", "expert GEMMs", "dense GEMMs")
ACTIVATIONS, NORMS, CASTS, HEAD, OPTIMIZER, OTHER = (
    "activations", "norms", "casts", "head + loss", "optimizer", "other")
COMPONENTS = (ATTENTION, ROUTER, DISPATCH, EXPERT_GEMMS, DENSE_GEMMS, ACTIVATIONS, NORMS, CASTS, HEAD,
              OPTIMIZER, OTHER)

RANGE = "deepmoe::"  # prefix of the ranges the hooks open; "deepmoe::step" wraps each profiled step
MODULE_RANGES = ((MLA, "attention"), (Gate, "router"), (Experts, "experts"), (MoE, "moe"), (MLP, "mlp"),
                 (RMSNorm, "norm"))
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_grouped_mm", "aten::_scaled_mm", "aten::_scaled_grouped_mm", "aten::mv", "aten::addmv"}
CAST_OPS = {"aten::to", "aten::_to_copy"}
ACTIVATION_OPS = {"aten::silu", "aten::mul"}
LOSS_FRAGMENTS = ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "nllloss")
BACKWARD_SCOPE, USER_SCOPE = 1, 7  # RecordScope: an autograd node's event; a record_function range
ENGINE_PREFIX = "autograd::engine::evaluate_function: "  # the engine's event around each node


@dataclass
class Breakdown:
    steps: int  # steps profiled
    step_ms: float  # wall time of one step under the profiler
    ms: dict[str, float]  # per step, for every component
    idle_ms: float | None  # CUDA: the part of the step no kernel ran in; None on CPU

    @property
    def clock(self) -> str:
        return "CPU time of the ops themselves" if self.idle_ms is None else "CUDA kernel time"

    @property
    def attributed_ms(self) -> float:
        return sum(self.ms.values()) + (self.idle_ms or 0.0)


@contextlib.contextmanager
def module_ranges(model: torch.nn.Module) -> Iterator[None]:
    """Each labelled module's forward inside a `deepmoe::<label>` range, for as long as the context lasts."""
    open_ranges: list[record_function] = []  # forwards nest, so the innermost open range closes first

    def enter(label: str):
        def hook(module, args):
            r = record_function(RANGE + label)
            r.__enter__()
            open_ranges.append(r)
        return hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    labelled = [(model.lm_head, "head")]
    for m in model.modules():
        label = next((label for cls, label in MODULE_RANGES if isinstance(m, cls)), None)
        if label is not None:
            labelled.append((m, label))
    handles = [h for m, label in labelled
               for h in (m.register_forward_pre_hook(enter(label)), m.register_forward_hook(leave))]
    # the trainer runs the head inside its chunked loss (train/fused_ce.py), which reads lm_head's weight and
    # never calls the module: its range comes from wrapping that function where the step looks it up
    from deepmoe.train import loop
    fused = loop.linear_cross_entropy

    def head_loss(*args, **kwargs):
        with record_function(RANGE + "head"):
            return fused(*args, **kwargs)

    loop.linear_cross_entropy = head_loss
    try:
        yield
    finally:
        loop.linear_cross_entropy = fused
        for h in handles:
            h.remove()


def profile_steps(step: Callable[[], object], model: torch.nn.Module, n: int, device: torch.device) -> Breakdown:
    """Run step() n times under the profiler (warm up first: the first steps pay one-off costs) and split
    its time into COMPONENTS."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with module_ranges(model), torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            with record_function(RANGE + "step"):
                step()
                if cuda:  # the step's window must hold its kernels
                    torch.cuda.synchronize(device)
    return attribute(prof.events(), n, cuda)


def label_ops(events) -> list[tuple[object, str]]:
    """Every host op of a profile taken inside `module_ranges` (torch's FunctionEvents, parent links built:
    `prof.events()`), with its component."""
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and not e.is_async]
    activations = _expert_activations(host)
    forward = _forward_labels(host, activations)
    return [(e, _label(e, forward, activations)) for e in host]


def attribute(events, n_steps: int, cuda: bool) -> Breakdown:
    """Split the time of the profiled `deepmoe::step` ranges in `events` into COMPONENTS, per step."""
    ops = label_ops(events)
    windows = [(e.time_range.start, e.time_range.end) for e, _ in ops if e.name == RANGE + "step"]
    if len(windows) != n_steps:
        raise RuntimeError(f"expected {n_steps} profiled steps, found {len(windows)} {RANGE}step ranges")
    # a range may show on the device timeline too (under its own name), spanning kernels counted already
    ranges = {e.name for e, _ in ops if e.scope == USER_SCOPE}
    total = dict.fromkeys(COMPONENTS, 0.0)  # µs
    for e, label in ops:
        if not any(a <= e.time_range.start <= b for a, b in windows):
            continue
        if not cuda:
            total[label] += e.self_cpu_time_total
            continue
        for k in e.kernels:
            if k.name in ranges:
                continue
            memcpy = k.name.startswith(("Memcpy HtoD", "Memcpy DtoH"))
            total[OTHER if memcpy else label] += k.duration
    step_us = sum(b - a for a, b in windows)
    idle = (step_us - sum(total.values())) / n_steps / 1e3 if cuda else None
    return Breakdown(n_steps, step_us / n_steps / 1e3, {c: t / n_steps / 1e3 for c, t in total.items()}, idle)


def _chain(e) -> list:
    out = []
    while e is not None:
        out.append(e)
        e = e.cpu_parent
    return out


def _is_backward(e) -> bool:
    return e.scope == BACKWARD_SCOPE or e.name.startswith(ENGINE_PREFIX)


def _forward_labels(host: list, activations: set[int]) -> dict:
    """(thread, sequence number) → label, for the forward op that created each autograd node. Several ops
    may record one sequence number (autograd's counter is read by every op, and moves on only when a node
    is made); the one that made the node is the last of them to start. The counter is per thread; the
    sequence number alone is a key too, for a profile whose backward events name the forward thread
    differently (the forward runs on one thread here)."""
    latest: dict = {}
    for e in host:
        if e.sequence_nr < 0:
            continue
        chain = _chain(e)
        if any(_is_backward(c) for c in chain):
            continue
        label = _label(e, {}, activations, chain)
        for key in ((e.thread, e.sequence_nr), e.sequence_nr):
            if key not in latest or e.time_range.start >= latest[key][0]:
                latest[key] = (e.time_range.start, label)
    return {k: label for k, (_, label) in latest.items()}


def _expert_activations(host: list) -> set[int]:
    """ids of the silu and mul ops between the first and the last GEMM of each routed-experts forward."""
    out: set[int] = set()
    for e in host:
        if e.name != RANGE + "experts":
            continue
        children = sorted(e.cpu_children, key=lambda c: c.time_range.start)
        gemms = [i for i, c in enumerate(children) if c.name in GEMM_OPS]
        if gemms:
            out |= {id(c) for c in children[gemms[0] + 1:gemms[-1]] if c.name in ACTIVATION_OPS}
    return out


def _label(e, forward: dict, activations: set[int], chain: list | None = None) -> str:
    chain = chain or _chain(e)
    names = [c.name for c in chain]
    if any(n.startswith("Optimizer.") or "_foreach_" in n or "_fused_adam" in n for n in names):
        return OPTIMIZER
    if any(n in CAST_OPS for n in names):
        return CASTS
    for c in chain:
        if _is_backward(c):
            return (forward.get((c.fwd_thread, c.sequence_nr)) or forward.get(c.sequence_nr)
                    or _by_name(names, gemm=False))
    gemm = False
    for c in chain:
        gemm = gemm or c.name in GEMM_OPS
        if c.name.startswith(RANGE) and c.name != RANGE + "step":
            return _in_module(c.name[len(RANGE):], gemm, any(id(x) in activations for x in chain))
    return _by_name(names, gemm)


def _in_module(module: str, gemm: bool, activation: bool) -> str:
    if module == "experts":
        return EXPERT_GEMMS if gemm else ACTIVATIONS if activation else DISPATCH
    if module in ("attention", "mlp"):
        return DENSE_GEMMS if gemm else ATTENTION if module == "attention" else ACTIVATIONS
    return {"moe": DISPATCH, "router": ROUTER, "norm": NORMS, "head": HEAD}[module]


def _by_name(names: list[str], gemm: bool) -> str:
    if any(f in n.lower() for n in names for f in LOSS_FRAGMENTS):
        return HEAD
    return DENSE_GEMMS if gemm else OTHER


def format_breakdown(b: Breakdown, flops: dict[str, float] | None = None, unprofiled_ms: float | None = None
                     ) -> str:
    """The table: component, ms/step, % of the profiled step, and where `flops` (model FLOPs per step by
    component) gives them, the FLOPs and the rate they were done at."""
    head = (f"where a step's time goes: {b.clock}, {b.steps} profiled steps, {b.step_ms:.1f} ms/step under the "
            f"profiler" + (f" ({unprofiled_ms:.1f} ms/step unprofiled)" if unprofiled_ms else ""))
    unit, scale = ("GFLOP/s", 1e9) if b.idle_ms is None else ("TFLOP/s", 1e12)  # CPU or GPU rates
    lines = [head, f"  {'component':<18} {'ms/step':>9} {'% of step':>10} {'GFLOP/step':>11} {unit:>9}"]
    rows = [(c, b.ms[c]) for c in COMPONENTS] + ([("device idle", b.idle_ms)] if b.idle_ms is not None else [])
    for name, ms in rows:
        line = f"  {name:<18} {ms:9.2f} {ms / b.step_ms:10.1%}"
        if flops and flops.get(name) and ms > 0:
            line += f" {flops[name] / 1e9:11.1f} {flops[name] / (ms / 1e3) / scale:9.1f}"
        lines.append(line)
    lines.append(f"  {'total':<18} {b.attributed_ms:9.2f} {b.attributed_ms / b.step_ms:10.1%}")
    return "\n".join(lines)


def summary_line(b: Breakdown) -> str:
    """One line for the GPU suite's summary table: the components by share, largest first."""
    rows = sorted([*b.ms.items(), *([("device idle", b.idle_ms)] if b.idle_ms is not None else [])],
                  key=lambda r: -r[1])
    return (f"step split ({b.step_ms:.1f} ms/step profiled): "
            + ", ".join(f"{name} {ms / b.step_ms:.0%}" for name, ms in rows if ms / b.step_ms >= 0.005))
