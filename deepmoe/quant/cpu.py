"""Fast CPU products for quantised weights, each beside the reference it must equal.

torch 2.13's CPU build offers two weight-only kernels (ATen ops, no extension needed):
  - `torch._weight_int8pack_mm(x, q, s)`: x (M, K) float times int8 q (N, K) with one scale per output
    row s (N,): used for weights that are one group (in ≤ group size). Splitting a grouped weight into
    one call per group and summing measured no faster than the reference (the slices must be copied),
    so grouped int8 weights use the reference.
  - `aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)`: uint4 codes u in a blocked layout made by
    `aten._convert_weight_to_int4pack_for_cpu(u (N, K) int32, 1)`, with per-group (scale, zero)
    pairs sz (K/g, N, 2); it computes (u − 8)·scale + zero. Our codes are q + 8 with zero 0, so it is
    our dequantised product exactly up to summation order. It needs N % 16 == 0 and K % g == 0, and is
    used for single rows only (batch-1 decode): measured on a 2-core x86 CI machine, one thread, at
    4096×4096 it takes 56 ms for one row against 135 ms for the reference, but 900 ms against 154 ms
    for 16 rows (and a 2048-row prefill through a 768×256 weight takes 1.4 s against 7 ms).
The int4 layout is a second copy of the codes (half a byte per weight) made once at load by `prepare`;
a module whose shapes do not fit, or whose kernel disagrees with the reference on a random input, keeps
the reference path (dequantise to x's dtype, then matmul).
"""

from __future__ import annotations

import torch

from .scheme import unpack_int4

INT4_GROUPS = (32, 64, 128, 256)
TOLERANCE = 1e-4  # relative, fp32: the kernels differ from the reference only in summation order


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32/bf16, q (N, K) int8, one scale per row scales (N, 1) → x·(q·s)ᵀ (M, N) in x's dtype."""
    return torch._weight_int8pack_mm(x, q, scales[:, 0].to(x.dtype))


def int4_layout(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Our packed codes (N, K/2) and scales (N, G) → the int4 kernel's (weights, scale-and-zero (G, N, 2)),
    or None where its shape constraints do not fit."""
    N, K = packed.shape[0], packed.shape[1] * 2
    g = K // scales.shape[1]
    if N % 16 or g not in INT4_GROUPS or K % g:
        return None
    u = (unpack_int4(packed).to(torch.int32) + 8)  # (N, K) in [1, 15]
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    sz = torch.stack((scales.float().T, torch.zeros_like(scales.float().T)), dim=-1).contiguous()
    return w, sz


def int4_mm(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x (M, K) times the int4 kernel's weights → (M, N) in x's dtype."""
    g = x.shape[1] // sz.shape[0]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, g, sz.to(x.dtype))


def agrees(fast, reference, in_features: int) -> bool:
    """Both products on a random fp32 input: does the fast one match the reference within TOLERANCE?"""
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0))
    try:
        a, b = fast(x), reference(x)
    except RuntimeError:  # a kernel that refuses this shape or build
        return False
    return bool((a - b).norm() <= TOLERANCE * b.norm().clamp(min=1e-12))
