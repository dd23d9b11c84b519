"""Routed experts stored stacked ([E, ...] tensors) and computed grouped by expert.

Token copies are sorted by expert id on device, then each projection is one grouped GEMM
(`torch._grouped_mm`) over the contiguous per-expert row blocks: no Python loop over experts and
no host synchronisation. Where grouped GEMM is unavailable, a padded batched matmul does the same
work (that fallback reads the largest group size, which syncs once per call).

Every formulation also takes an optional per-expert low-rank update of each stacked weight (`LowRank`,
what a LoRA adapter from deepmoe.lora supplies): it runs as two thin products over the same sorted
rows, x·Aᵀ then ·Bᵀ, so W + B·A is never formed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class LowRank(NamedTuple):
    """A low-rank update of a stacked weight W (G, out, in): expert g computes x·(W[g] + scale·b[g]·a[g])ᵀ."""
    a: torch.Tensor  # (G, r, in)
    b: torch.Tensor  # (G, out, r)
    scale: float

    def to(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.a.to(dtype), self.b.to(dtype), self.scale)


Updates = tuple[LowRank | None, LowRank | None, LowRank | None]  # for gate_proj, up_proj, down_proj
NO_UPDATES: Updates = (None, None, None)


@torch.library.custom_op("deepmoe::grouped_mm", mutates_args=())
def _traceable_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm as an opaque op, for compiling fp32 models on CPU: the aten op's meta (tracing)
    kernel accepts only bf16, though CPU runs fp32 too, so without this a compiled fp32 MoE layer would
    fall back to the padded form, which reads the largest group size on the host (a graph break)."""
    return torch._grouped_mm(a, b, offs=offs)


@_traceable_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # (M, K) x (G, K, N) -> (M, N): rows grouped
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # (K, M) x (M, N) -> (G, K, N): inner dim grouped


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors  # only the rows-grouped form is differentiated (the other is a gradient)
    ga = _traceable_grouped_mm(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    gb = _traceable_grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return ga, gb, None


_traceable_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _grouped_mm_ok(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if not all(_aligned(t) for t in (x, *ws)) or any(w.shape[-2] * w.element_size() % 16 for w in ws):
        return False  # the output's rows, which backward reads, must be aligned too
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def _aligned(t: torch.Tensor) -> bool:
    """The grouped GEMM kernels (CPU and CUDA) read 16-byte aligned rows: a LoRA rank of 3 in fp32, or of 4
    in bf16, is too narrow for them."""
    if any(s * t.element_size() % 16 for s, n in zip(t.stride(), t.shape) if s != 1 and n != 1):
        return False
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0  # a traced tensor has no address yet


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, update: LowRank | None = None
               ) -> torch.Tensor:
    """Rows of x (M, in), sorted by group, times their group's w[g] (G, out, in)ᵀ → (M, out); with an
    update, plus scale·(x·a[g]ᵀ)·b[g]ᵀ: two more grouped passes of width r, through the same dispatch."""
    y = _grouped_mm_dispatch(x, w, counts)
    if update is None:
        return y
    t = grouped_mm(x.to(update.a.dtype), update.a, counts)  # (M, r)
    return y + (update.scale * grouped_mm(t, update.b, counts)).to(y.dtype)


def _grouped_mm_dispatch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    differentiable = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if (x.device.type == "cpu" and x.shape[0] <= w.shape[0] and not differentiable
            and not torch.compiler.is_compiling()):  # mm(out=...) has no autograd: inference only
        return _active_groups_mm(x, w, counts)
    if _grouped_mm_ok(x, w):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # CPU fp32 (see _traceable_grouped_mm)
            return _traceable_grouped_mm(x, w.transpose(-2, -1), offs)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    return _padded_grouped_mm(x, w, counts)


def _active_groups_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Decode on CPU: fewer rows than groups, so most experts are idle. One matmul per expert that has
    rows reads only those experts' weights; CPU _grouped_mm costs ~2x more here (measured in decode)."""
    out, start = x.new_empty(x.shape[0], w.shape[1]), 0
    for g, c in enumerate(counts.tolist()):  # a host read is free on CPU
        if c:
            torch.mm(x[start:start + c], w[g].T, out=out[start:start + c])
            start += c
    return out


def _padded_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    G, M = w.shape[0], x.shape[0]
    cap = int(counts.max()) if M else 0
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(G, device=x.device), counts, output_size=M)
    slot = torch.arange(M, device=x.device) - starts[group]
    padded = x.new_zeros(G, cap, x.shape[1])
    padded[group, slot] = x
    return torch.bmm(padded, w.transpose(-2, -1))[group, slot]


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Plain per-group loop; the definition the fast paths are tested against."""
    out, start = [], 0
    for g, c in enumerate(counts.tolist()):
        out.append(x[start:start + c] @ w[g].T)
        start += c
    return torch.cat(out)


def count_experts(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Token copies per expert (E,) int64 from the copies' expert ids, on the device. A scatter-add rather
    than bincount, whose output size depends on the data (a graph break under compile) and which reads
    its range back to the host on CUDA."""
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def drop_over_capacity(flat: torch.Tensor, weights: torch.Tensor, capacity: int, n_experts: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-copy order grouped by expert, keeping at most `capacity` copies per expert (highest routing
    weight first, ties by position), and the kept counts (E,). flat/weights: (M,) expert id and weight of
    each copy. Dropping by affinity rather than position follows DeepSeek-V2's token-dropping strategy."""
    by_weight = weights.argsort(descending=True, stable=True)
    order = by_weight[flat[by_weight].argsort(stable=True)]  # by expert, then by weight descending
    counts = count_experts(flat, n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # place within its expert
    # the boolean mask makes the kept count data-dependent (one host sync); dropping is opt-in, dropless is not
    return order[rank < capacity], counts.clamp(max=capacity)


def sync_free_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_w: torch.Tensor,
                      up_w: torch.Tensor, down_w: torch.Tensor, updates: Updates = NO_UPDATES) -> torch.Tensor:
    """Σ_j weights[:, j] · expert_{indices[:, j]}(x) for x (N, d), with static shapes and no host read, so
    a decode step can be compiled whole or captured in a CUDA graph. Per-expert counts stay on the device:
    - CUDA with grouped GEMM: copies sorted by expert, offsets from a scatter-add count (not bincount,
      which reads its range back to the host), one grouped GEMM per projection over a fixed M = N·k;
    - fewer copies than experts (small decode batches): gather just the chosen experts' weights and run
      one batched matrix-vector product per copy, reading k experts per token and nothing else;
    - otherwise every expert runs on every token and the routing weights (zero where not chosen) mask
      the combine: decode is memory-bound, and this reads each expert once, as any batched step must.
    updates: low-rank updates of (gate, up, down), computed in x's dtype as autocast would."""
    N, k = indices.shape
    E = gate_w.shape[0]
    flat, w = indices.reshape(-1), weights.reshape(-1).float()
    updates = tuple(None if u is None else u.to(x.dtype) for u in updates)
    factors = [t for u in updates if u is not None for t in (u.a, u.b)]
    if x.device.type == "cuda" and _grouped_mm_ok(x, gate_w, up_w, down_w, *factors):
        order = flat.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)

        def mm(xs: torch.Tensor, wt: torch.Tensor, u: LowRank | None) -> torch.Tensor:
            y = torch._grouped_mm(xs, wt.transpose(-2, -1), offs=offs)
            if u is not None:
                t = torch._grouped_mm(xs, u.a.transpose(-2, -1), offs=offs)
                y = y + u.scale * torch._grouped_mm(t, u.b.transpose(-2, -1), offs=offs)
            return y

        xs = x.index_select(0, order // k)
        h = F.silu(mm(xs, gate_w, updates[0])) * mm(xs, up_w, updates[1])
        ys = mm(h, down_w, updates[2]).float() * w[order].unsqueeze(-1)
        return torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device).index_add_(
            0, order // k, ys).to(x.dtype)
    if N * k < E:
        xs = x.repeat_interleave(k, dim=0).unsqueeze(1)  # (M, 1, d): copy j of token n is row n·k + j
        h = F.silu(_bmm(xs, gate_w, updates[0], flat)) * _bmm(xs, up_w, updates[1], flat)  # (M, 1, inter)
        ys = _bmm(h, down_w, updates[2], flat).squeeze(1).float() * w.unsqueeze(-1)  # (M, d)
        return ys.view(N, k, -1).sum(1).to(x.dtype)
    dense = torch.zeros(N, E, dtype=torch.float32, device=x.device).scatter_(1, indices, weights.float())
    xe = x.unsqueeze(0).expand(E, N, x.shape[1])  # (E, N, d)
    h = F.silu(_bmm(xe, gate_w, updates[0])) * _bmm(xe, up_w, updates[1])  # (E, N, inter)
    ys = _bmm(h, down_w, updates[2]).float() * dense.T.unsqueeze(-1)  # (E, N, d)
    return ys.sum(0).to(x.dtype)


def _bmm(xs: torch.Tensor, w: torch.Tensor, u: LowRank | None, chosen: torch.Tensor | None = None
         ) -> torch.Tensor:
    """xs (B, n, in) times expert chosen[i] (every expert in order when None) of w (G, out, in), transposed,
    plus that expert's low-rank update → (B, n, out)."""
    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if chosen is None else t[chosen]

    y = xs @ pick(w).mT
    if u is not None:
        y = y + u.scale * ((xs @ pick(u.a).mT) @ pick(u.b).mT)
    return y


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts = E
        self.gate_proj = nn.Parameter(torch.empty(E, inter, d))
        self.up_proj = nn.Parameter(torch.empty(E, inter, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, inter))

    def project(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, update: LowRank | None = None
                ) -> torch.Tensor:
        """One grouped projection of the expert-sorted rows (a subclass may run it in another precision)."""
        return grouped_mm(x, w, counts, update)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                capacity: int | None = None, sync_free: bool = False, updates: Updates = NO_UPDATES
                ) -> torch.Tensor:
        """x (N, d), indices/weights (N, k) → Σ_j weights[:, j] · expert_{indices[:, j]}(x), shape (N, d).
        With `capacity`, each expert keeps at most that many token copies, its highest-weight ones; the
        dropped copies contribute nothing (the token still has its residual and shared experts).
        sync_free: the capturable formulation (see `sync_free_experts`), for compiled or graphed decoding.
        updates: low-rank updates of (gate_proj, up_proj, down_proj), e.g. a LoRA adapter's."""
        if sync_free:
            if capacity is not None:
                raise ValueError("capacity dropping keeps a data-dependent number of copies: not sync-free")
            return sync_free_experts(x, indices, weights, self.gate_proj, self.up_proj, self.down_proj, updates)
        N, k = indices.shape
        flat, w = indices.reshape(-1), weights.reshape(-1)
        if capacity is None:
            order = flat.argsort(stable=True)  # token copies grouped by expert
            counts = count_experts(flat, self.n_experts)
        else:
            order, counts = drop_over_capacity(flat, w, capacity, self.n_experts)
        token = order // k
        gate_w, up_w, down_w = self.gate_proj, self.up_proj, self.down_proj
        if torch.is_autocast_enabled(x.device.type):  # autocast does not cover _grouped_mm: cast as it would
            dt = torch.get_autocast_dtype(x.device.type)
            x, gate_w, up_w, down_w = x.to(dt), gate_w.to(dt), up_w.to(dt), down_w.to(dt)
            updates = tuple(None if u is None else u.to(dt) for u in updates)
        # index_select, not x[token]: its backward is a deterministic index_add, where indexing's backward
        # (index_put with accumulate) adds in a thread-dependent order on CPU and breaks bit-exact resume
        xs = x.index_select(0, token)  # (M, d), M = N·k copies (fewer after dropping)
        h = F.silu(self.project(xs, gate_w, counts, updates[0])) * self.project(xs, up_w, counts, updates[1])
        # the down projection is linear, so each copy's routing weight scales its input rather than its
        # output: (M, inter) instead of (M, d), folded into the product that builds h (fp32, one rounding)
        h = (h.float() * w[order].unsqueeze(-1)).to(h.dtype)
        ys = self.project(h, down_w, counts, updates[2])  # (M, d), already weighted
        if capacity is not None:  # some copies were dropped: add the kept ones back to their tokens
            out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
            return out.index_add_(0, token, ys.float()).to(x.dtype)
        # dropless: every token has exactly k copies, so un-permuting is a gather (rows back to token-major
        # order: copy j of token n at n·k + j) and the combine a sum over k, accumulated in fp32 (k partial
        # sums lose bits in bf16). No scatter-add over N·k rows, and the backward of both is a gather too.
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return ys.index_select(0, unsort).view(N, k, -1).sum(1, dtype=torch.float32).to(x.dtype)
