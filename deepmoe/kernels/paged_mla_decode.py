"""Paged MLA decode attention in absorbed form: one query token per row, attending straight over the
paged latent cache through the block table, with no gathered copy of the history.

Shapes (B rows, H heads, R = kv_lora_rank, P = qk_rope_head_dim, one layer's cache):
    q_lat (B, H, R)       the query in latent space: q_nope @ W_UK (kv_b_proj's key half)
    q_pe (B, H, P)        the rotated rope query
    c_kv_cache (N, R)     latents of every slot; k_pe_cache (N, P) their rotated rope keys
    block_tables (B, M)   int32/int64; position p of row b lives in slot
                          block_tables[b, p // block_size] * block_size + p % block_size
    context_lens (B,)     valid positions of each row, the new token included (0 gives a zero output)
    → o_lat (B, H, R)     softmax(scale · (q_lat·c_kv + q_pe·k_pe)) @ c_kv, in q_lat's dtype;
                          the caller applies kv_b_proj's value half (W_UV) afterwards.

Why split-KV (flash decoding). A decode step has one query per row, so a grid over (row, head block)
alone gives B · ⌈H/16⌉ programs: at batch 1 that is one or a few programs walking a long history
while the other SMs idle. Stage 1 also splits each row's context into `num_splits` slices, each with
its own online softmax, and writes a partial output and its log-sum-exp; stage 2 merges the slices
per (row, head) by log-sum-exp. A split past the end of a short row is empty (lse = -inf) and adds
nothing.

Memory traffic. Decode attention is memory bound: per row it must read (R + P) · itemsize bytes per
cached token (1152 at V3 size in bf16) and does ~4·H·R FLOPs per token with them. MLA shares the one
latent between all heads, so a program takes a block of heads (16, the tl.dot minimum) and loads each
latent tile once for all of them; with H > 16 the other head blocks read the same tiles while they are
in L2. Reading the cache through the block table replaces the engine's gather, which read the
history, wrote a (B, S_max, R + P) copy padded to the longest row, and read it again: about 3× the
bytes, plus the copy's memory. What the splits cost is their partials: each writes and stage 2
re-reads an (H, R) fp32 block, so `default_num_splits` keeps a split long enough that this stays
under half the latent bytes the split reads, and otherwise asks for enough programs to fill the chip.

Static shapes. The split count and every block size come from shapes on the host; context_lens and
the block table are read only on the device, so a call never syncs and can be captured in a CUDA
graph. Under TRITON_INTERPRET=1 (read by Triton when this module is imported) the kernels run on the
CPU, slowly: that is how the tests check them without a GPU.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

TARGET_PROGRAMS = 264  # stage-1 programs that fill an H100 twice (132 SMs); untuned
MAX_SPLITS = 32


def paged_mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv_cache: torch.Tensor,
                               k_pe_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                               block_size: int, scale: float) -> torch.Tensor:
    """The definition: gather every row's M · block_size slots (static shapes, no host sync), mask the
    positions at or past context_lens, softmax in fp32. Also the fallback where Triton cannot run."""
    B, M = block_tables.shape
    pos = torch.arange(M * block_size, device=block_tables.device)
    visible = pos < context_lens.to(pos.device)[:, None]  # (B, S)
    slots = block_tables.long()[:, pos // block_size] * block_size + pos % block_size
    slots = torch.where(visible, slots, 0)  # table entries past a row's blocks may be anything
    c_kv = c_kv_cache[slots].float()  # (B, S, R)
    k_pe = k_pe_cache[slots].float()  # (B, S, P)
    scores = (q_lat.float() @ c_kv.mT + q_pe.float() @ k_pe.mT) * scale  # (B, H, S)
    hidden = ~visible[:, None, :]
    # an empty row softmaxes to NaN everywhere; zeroing the hidden probabilities makes its output 0
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1).masked_fill(hidden, 0.0)
    return (probs @ c_kv).to(q_lat.dtype)  # (B, H, R)


def _head_block(num_heads: int) -> int:
    """Heads per program: 16 (tl.dot's minimum) once there are that many, else the next power of 2."""
    return min(16, max(2, _next_pow2(num_heads)))


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_num_splits(batch: int, num_heads: int, max_context: int, rank: int, rope: int, itemsize: int) -> int:
    """Splits per row from shapes only: enough stage-1 programs to fill the chip, but no split so short
    that its (H, R) fp32 partial, written and read back, costs over half the latent bytes it reads."""
    programs = batch * math.ceil(num_heads / _head_block(num_heads))
    fill = math.ceil(TARGET_PROGRAMS / programs)
    # partial: 4·H·R bytes written + read = 8·H·R ≤ ½ · split · (R + P) · itemsize
    min_split = math.ceil(16 * num_heads * rank / ((rank + rope) * itemsize))  # positions
    return max(1, min(fill, max_context // min_split, MAX_SPLITS))


def paged_mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv_cache: torch.Tensor, k_pe_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float,
                     num_splits: int | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """o_lat (B, H, R) of one decode step (shapes in the module docstring). use_triton=None runs the
    Triton kernel on CUDA and the torch reference elsewhere; True forces the kernel (on the CPU only
    under TRITON_INTERPRET=1). num_splits=None picks `default_num_splits` for the table's capacity
    (max_blocks · block_size positions): pass a fixed count to keep one compiled kernel per shape."""
    B, H, R = q_lat.shape
    P = q_pe.shape[-1]
    if q_pe.shape[:2] != (B, H) or c_kv_cache.shape[-1] != R or k_pe_cache.shape[-1] != P:
        raise ValueError(f"shapes disagree: q_lat {tuple(q_lat.shape)} (B, H, R), q_pe {tuple(q_pe.shape)} (B, H, P), "
                         f"c_kv_cache {tuple(c_kv_cache.shape)} (N, R), k_pe_cache {tuple(k_pe_cache.shape)} (N, P)")
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be (B, max_blocks) and context_lens "
                         f"{tuple(context_lens.shape)} must be (B,), with B = {B} rows of q_lat")
    if use_triton is None:
        use_triton = triton is not None and q_lat.is_cuda
    if not use_triton:
        return paged_mla_decode_reference(q_lat, q_pe, c_kv_cache, k_pe_cache, block_tables, context_lens,
                                          block_size, scale)
    if triton is None:
        raise RuntimeError("use_triton=True but triton is not installed: pip install triton, or leave use_triton=None")
    if not q_lat.is_cuda and type(_stage1).__name__ != "InterpretedFunction":
        raise RuntimeError("the Triton kernel runs on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before deepmoe.kernels is first imported, or pass CUDA tensors")
    if c_kv_cache.stride(-1) != 1 or k_pe_cache.stride(-1) != 1:
        raise ValueError("the caches' last dimension must be contiguous (one cache row per slot)")
    if num_splits is None:
        num_splits = default_num_splits(B, H, block_tables.shape[1] * block_size, R, P, c_kv_cache.element_size())

    dtype = c_kv_cache.dtype
    q_lat_c = q_lat.to(dtype).contiguous()  # tl.dot wants both operands in the cache's dtype
    q_pe_c = q_pe.to(dtype).contiguous()
    o_part = torch.empty(B, H, num_splits, R, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_lat.device)
    out = torch.empty(B, H, R, dtype=q_lat.dtype, device=q_lat.device)

    BLOCK_H = _head_block(H)
    BLOCK_R = max(16, _next_pow2(R))
    BLOCK_P = max(16, _next_pow2(P))
    use_dot = BLOCK_H >= 16
    # tl.dot wants a tile of ≥ 16 positions; the tl.sum path holds an (H, N, R) product, so it takes
    # as many positions as keep that product at 8192 elements
    BLOCK_N = 32 if use_dot else min(32, max(2, 8192 // (BLOCK_H * BLOCK_R)))
    _stage1[(B, triton.cdiv(H, BLOCK_H), num_splits)](
        q_lat_c, q_pe_c, c_kv_cache, k_pe_cache, block_tables, context_lens, o_part, lse,
        q_lat_c.stride(0), q_lat_c.stride(1), q_pe_c.stride(0), q_pe_c.stride(1),
        c_kv_cache.stride(0), k_pe_cache.stride(0), block_tables.stride(0),
        H, R, P, scale * 1.4426950408889634,  # log2(e): the softmax runs in base 2
        BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, USE_DOT=use_dot,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",  # no TF32 rounding of fp32 inputs
        num_warps=4, num_stages=2,
    )
    _stage2[(B, H)](o_part, lse, out, out.stride(0), out.stride(1), H, R,
                    NUM_SPLITS=num_splits, BLOCK_S=_next_pow2(num_splits), BLOCK_R=BLOCK_R, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _stage1(q_lat, q_pe, c_kv, k_pe, tables, ctx_lens, o_part, lse,
                sq_b, sq_h, sqp_b, sqp_h, s_ckv, s_kpe, s_tab,
                H, R, P, qk_scale,
                BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One (row, head block, split): online softmax over the split's positions → partial o and lse."""
        b = tl.program_id(0)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        split = tl.program_id(2)
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        head_ok = heads < H

        # the row's context in NUM_SPLITS slices of whole tiles; trailing slices may be empty
        ctx = tl.load(ctx_lens + b).to(tl.int32)
        split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, ctx)

        q = tl.load(q_lat + b * sq_b + heads[:, None] * sq_h + offs_r[None, :],
                    mask=head_ok[:, None] & (offs_r[None, :] < R), other=0.0)  # (BLOCK_H, BLOCK_R)
        qp = tl.load(q_pe + b * sqp_b + heads[:, None] * sqp_h + offs_p[None, :],
                     mask=head_ok[:, None] & (offs_p[None, :] < P), other=0.0)  # (BLOCK_H, BLOCK_P)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)

        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            valid = pos < end
            block = tl.load(tables + b * s_tab + pos // BLOCK_SIZE, mask=valid, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE  # (BLOCK_N,) cache rows
            kv = tl.load(c_kv + slot[:, None] * s_ckv + offs_r[None, :],
                         mask=valid[:, None] & (offs_r[None, :] < R), other=0.0)  # (BLOCK_N, BLOCK_R)
            kp = tl.load(k_pe + slot[:, None] * s_kpe + offs_p[None, :],
                         mask=valid[:, None] & (offs_p[None, :] < P), other=0.0)  # (BLOCK_N, BLOCK_P)
            if USE_DOT:
                s = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION)
                s += tl.dot(qp, tl.trans(kp), input_precision=DOT_PRECISION)
            else:
                s = tl.sum(q[:, None, :].to(tl.float32) * kv[None, :, :].to(tl.float32), axis=2)
                s += tl.sum(qp[:, None, :].to(tl.float32) * kp[None, :, :].to(tl.float32), axis=2)
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # (BLOCK_H, BLOCK_N), base-2 logits
            # every tile holds a valid position, so m_new is finite and exp2(-inf - m_new) = 0
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=DOT_PRECISION)
            else:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * kv[None, :, :].to(tl.float32), axis=1)
            m_i = m_new

        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        o = acc / l_safe[:, None]  # an empty split leaves 0, never NaN
        part = (b * H + heads) * NUM_SPLITS + split  # (BLOCK_H,) rows of the (B, H, NUM_SPLITS) partials
        tl.store(o_part + part[:, None] * R + offs_r[None, :], o, mask=head_ok[:, None] & (offs_r[None, :] < R))
        tl.store(lse + part, tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf")), mask=head_ok)

    @triton.jit
    def _stage2(o_part, lse, out, so_b, so_h, H, R,
                NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
        """One (row, head): weigh each split's partial by exp2(lse - max lse) and renormalise."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_r = tl.arange(0, BLOCK_R)
        row = b * H + h
        lses = tl.load(lse + row * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
        m = tl.max(lses, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # an empty row: every weight exp2(-inf) = 0, output 0
        denom = tl.sum(tl.exp2(lses - m), axis=0)
        acc = tl.zeros([BLOCK_R], tl.float32)
        for s in range(NUM_SPLITS):  # one (R,) partial at a time keeps registers flat in NUM_SPLITS
            w = tl.exp2(tl.load(lse + row * NUM_SPLITS + s) - m)
            acc += w * tl.load(o_part + (row * NUM_SPLITS + s) * R + offs_r, mask=offs_r < R, other=0.0)
        acc = acc / tl.where(denom > 0, denom, 1.0)
        tl.store(out + b * so_b + h * so_h + offs_r, acc, mask=offs_r < R)
