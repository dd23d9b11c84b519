"""Weight-only quantised matmul: y = x @ dequant(W)ᵀ straight from int8 / packed int4 codes, never
writing the dequantised weight.

Shapes (M rows, N outputs, K inputs, g inputs per scale group, G = K / g, layout in quant/scheme.py):
    x (M, K)              bf16 / fp16 / fp32; the output (M, N) has x's dtype, accumulation is fp32
    codes (N, K) int8, or (N, K/2) uint8 holding two int4 codes + 8 (even input channel in the low nibble)
    scales (N, G)         one per output row and group; any float dtype (a model cast to bf16 casts them)
    stacked experts: codes (E, N, ·), scales (E, N, G), with either
      idx (M,)            gathered: row m uses expert idx[m] (the routed experts' sync-free decode path)
      or a plain slice codes[e] (the grouped path's one expert at a time).

Why a kernel. The reference (dequantise to x's dtype, then matmul) reads the codes, writes the whole
weight in x's dtype, and reads it again: for one decode row that is 1 + 2 + 2 bytes per weight (int8, bf16)
where the product needs 1 (int8) or ½ (int4). Decode is memory-bound, so that traffic is the time; the
gathered reference is worse, it writes one dequantised expert per token copy.

How. A program owns BLOCK_N outputs of BLOCK_M rows and a range of whole groups along K. Per group it
sums x · code in fp32 over the group's channels (sub-blocks of at most 128, masked where g is not a power
of 2) and only then multiplies by the group's scale, one multiply per (row, output, group). int4 codes are
unpacked in registers; the even and odd channels are two half-width products against x's even and odd
columns, so nothing is interleaved. One row (M = 1, or any gathered row) reduces a broadcast product with
tl.sum; 2..16 rows use tl.dot on a 16-row tile with the codes converted to x's dtype, exact for |code| ≤
127 in bf16/fp16. Few output blocks (a batch-1 GEMV) would leave most SMs idle, so K is split across
programs into fp32 partials that a second small kernel sums and casts: enough programs to fill the chip
about 4 times, each split at least one group. Everything is chosen from shapes on the host: no host sync,
so a call can be captured in a CUDA graph.

Where the kernel is not used (`quant_matmul` picks; `use_triton` forces): off CUDA; with more than 16
plain rows (prefill), where dequantise-then-cuBLAS is expected to win: the kernel is correct for any M
but its 16-row tiles were not tuned for large M, and it has not been timed against cuBLAS there.
Block sizes and warps are untuned defaults (no GPU was available when this was written).

Under TRITON_INTERPRET=1 (read when this module is first imported) the kernels run on the CPU, which is
how the tests check them without a GPU. The interpreter's tl.dot multiplies bf16 bit patterns as integers,
so there the 16-row tile takes its operands in fp32 (exactly the same products: codes and bf16 values are
exact in fp32); on CUDA tl.dot takes bf16.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

MAX_DOT_ROWS = 16  # above this many plain rows the dispatcher dequantises and calls cuBLAS instead
FILL = 4  # programs per SM the K split aims for: enough in flight to hide memory latency
MAX_SPLITS = 16
DEFAULT_SMS = 132  # an H100's; used where the device has no SM count (the CPU interpreter)


def quant_matmul_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int,
                           idx: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: dequantise (to x's dtype, as QuantWeight's reference path does) and multiply.
    With idx, row m of x times expert idx[m]'s weight (one dequantised expert per row)."""
    from ..quant.scheme import decode

    if idx is None:
        return x @ decode(codes, scales, bits, x.dtype).T
    return (x.unsqueeze(1) @ decode(codes[idx], scales[idx], bits, x.dtype).mT).squeeze(1)


def kernel_available() -> bool:
    return triton is not None


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _interpreted() -> bool:
    return triton is not None and type(_qmm).__name__ == "InterpretedFunction"


def default_num_splits(programs: int, groups: int, device: torch.device) -> int:
    """K splits from shapes: enough programs for FILL per SM, never more splits than groups."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SMS
    want = -(-FILL * sms // programs)
    return max(1, min(want, groups, MAX_SPLITS))


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int,
                 idx: torch.Tensor | None = None, use_triton: bool | None = None,
                 num_splits: int | None = None) -> torch.Tensor:
    """x (M, K) times dequant(codes)ᵀ → (M, N) in x's dtype (shapes in the module docstring).
    use_triton=None runs the kernel on CUDA for gathered rows and for at most MAX_DOT_ROWS plain rows,
    the reference otherwise; True forces the kernel (on the CPU only under TRITON_INTERPRET=1).
    num_splits=None picks `default_num_splits`."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    stacked = codes.dim() == 3
    if (idx is not None) != stacked:
        raise ValueError("stacked codes (E, N, ·) need idx (one expert per row); 2-D codes take no idx "
                         "(pass codes[e] for one expert)")
    M, K = x.shape
    N, packed = codes.shape[-2], codes.shape[-1]
    G = scales.shape[-1]
    if packed * 8 // bits != K or scales.shape[-2] != N or K % G or (idx is not None and idx.shape != (M,)):
        got = None if idx is None else tuple(idx.shape)
        raise ValueError(f"shapes disagree: x {tuple(x.shape)} (M, K), codes {tuple(codes.shape)} (…, N, K·bits/8), "
                         f"scales {tuple(scales.shape)} (…, N, G), idx {got} (M,)")
    if use_triton is None:
        use_triton = triton is not None and x.is_cuda and (idx is not None or M <= MAX_DOT_ROWS)
    if not use_triton:
        return quant_matmul_reference(x, codes, scales, bits, idx)
    if triton is None:
        raise RuntimeError("use_triton=True but triton is not installed: pip install triton, or leave use_triton=None")
    if not x.is_cuda and not _interpreted():
        raise RuntimeError("the Triton kernel runs on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before deepmoe.kernels is first imported, or pass CUDA tensors")
    if codes.stride(-1) != 1 or scales.stride(-1) != 1:
        raise ValueError("codes and scales must be contiguous along their last dimension")

    group = K // G
    gather = idx is not None
    use_dot = not gather and M > 1
    BLOCK_M = 16 if use_dot else 1  # gathered rows each read their own expert: one row per program
    BLOCK_N = 64 if use_dot else 32
    # a sub-block never spans two groups; ≥ 32 keeps an int4 half-block at tl.dot's minimum of 16
    BLOCK_K = min(128, max(32, _next_pow2(group)))
    grid_n, grid_m = triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M)
    splits = num_splits or default_num_splits(grid_n * grid_m, G, x.device)
    splits = min(splits, G)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # split K: fp32 partials (splits, M, N), summed and cast by _sum_splits; one split writes out directly
    dst = out if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    dummy = idx if gather else scales  # an unused pointer argument when not gathering
    se_c, se_s = (codes.stride(0), scales.stride(0)) if gather else (0, 0)
    dot_f32 = x.dtype == torch.float32 or _interpreted()
    _qmm[(grid_n, splits, grid_m)](
        x, codes, scales, dummy, dst,
        M, N, G, x.stride(0), x.stride(1), se_c, codes.stride(-2), se_s, scales.stride(-2), M * N,
        BITS=bits, GROUP=group, GATHER=gather, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        USE_DOT=use_dot, DOT_F32=dot_f32, num_warps=4,
    )
    if splits > 1:
        BLOCK = 1024
        _sum_splits[(triton.cdiv(M * N, BLOCK),)](dst, out, M * N, SPLITS=splits, BLOCK=BLOCK, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _qmm(x, codes, scales, idx, out, M, N, G, s_xm, s_xk, s_ce, s_cn, s_se, s_sn, s_split,
             BITS: tl.constexpr, GROUP: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
        """One (output block, K split, row block): Σ over its groups of scale · Σ_k x·code."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        if GATHER:  # BLOCK_M == 1: this row's expert
            e = tl.load(idx + rows, mask=row_ok, other=0).to(tl.int64)  # (1,)
            codes += tl.sum(e) * s_ce
            scales += tl.sum(e) * s_se
        per_split = tl.cdiv(G, tl.num_programs(1))
        g0 = split * per_split
        g1 = tl.minimum(g0 + per_split, G)
        dot_dtype = tl.float32 if DOT_F32 else x.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for grp in range(g0, g1):
            part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, GROUP, BLOCK_K):  # GROUP is constexpr: an unrolled, static loop
                if BITS == 8:
                    kk = k0 + tl.arange(0, BLOCK_K)
                    k_ok = kk < GROUP
                    ch = grp * GROUP + kk  # input channels (BLOCK_K,)
                    w = tl.load(codes + cols[:, None].to(tl.int64) * s_cn + ch[None, :],
                                mask=col_ok[:, None] & k_ok[None, :], other=0)  # (BLOCK_N, BLOCK_K) int8
                    xv = tl.load(x + rows[:, None] * s_xm + ch[None, :] * s_xk,
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
                    if USE_DOT:
                        part += tl.dot(xv.to(dot_dtype), tl.trans(w.to(dot_dtype)),
                                       input_precision="ieee" if DOT_F32 else "tf32")
                    else:
                        part += tl.sum(xv.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
                else:
                    jj = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes within the group, two channels each
                    k_ok = jj * 2 < GROUP
                    byte = grp * (GROUP // 2) + jj
                    b = tl.load(codes + cols[:, None].to(tl.int64) * s_cn + byte[None, :],
                                mask=col_ok[:, None] & k_ok[None, :], other=0x88).to(tl.int32)  # masked → codes 0
                    lo = (b & 15) - 8  # even channels (BLOCK_N, BLOCK_K / 2)
                    hi = (b >> 4) - 8  # odd channels
                    ch = grp * GROUP + jj * 2
                    xm = row_ok[:, None] & k_ok[None, :]
                    xe = tl.load(x + rows[:, None] * s_xm + ch[None, :] * s_xk, mask=xm, other=0.0)
                    xo = tl.load(x + rows[:, None] * s_xm + (ch + 1)[None, :] * s_xk, mask=xm, other=0.0)
                    if USE_DOT:
                        part += tl.dot(xe.to(dot_dtype), tl.trans(lo.to(dot_dtype)),
                                       input_precision="ieee" if DOT_F32 else "tf32")
                        part += tl.dot(xo.to(dot_dtype), tl.trans(hi.to(dot_dtype)),
                                       input_precision="ieee" if DOT_F32 else "tf32")
                    else:
                        part += tl.sum(xe.to(tl.float32)[:, None, :] * lo.to(tl.float32)[None, :, :], axis=2)
                        part += tl.sum(xo.to(tl.float32)[:, None, :] * hi.to(tl.float32)[None, :, :], axis=2)
            s = tl.load(scales + cols.to(tl.int64) * s_sn + grp, mask=col_ok, other=0.0).to(tl.float32)
            acc += part * s[None, :]
        dst = out + split * s_split + rows[:, None] * N + cols[None, :]
        tl.store(dst, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _sum_splits(part, out, MN, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        """out (M, N) = Σ_s part[s] (fp32), cast to out's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(SPLITS):
            acc += tl.load(part + s * MN + offs, mask=ok, other=0.0)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=ok)
