"""DeepSeek-V3's FP8 block format: E4M3 weights with one fp32 scale per 128×128 block.

A checkpoint stores `weight` (float8_e4m3fn, [out, in]) and `weight_scale_inv` (fp32,
[ceil(out/128), ceil(in/128)]); the real weight is weight · scale_inv broadcast over each block.
Edge blocks are ragged when a dimension is not a multiple of the block size.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    s = scale.repeat_interleave(bm, dim=0).repeat_interleave(bn, dim=1)
    return s[: shape[0], : shape[1]]  # trim the ragged last block row/column


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    expected = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{tuple(weight.shape)} weight in {block[0]}x{block[1]} blocks")
    w = weight.to(torch.float32) * _expand_blocks(scale_inv.to(torch.float32), weight.shape, block)
    return w.to(dtype)


def quantize_fp8_block(weight: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight → (float8_e4m3fn weight, fp32 scale_inv) with per-block amax scaling."""
    out_f, in_f = weight.shape
    bm, bn = block
    gm, gn = -(-out_f // bm), -(-in_f // bn)
    w = weight.float()
    padded = w.new_zeros(gm * bm, gn * bn)
    padded[:out_f, :in_f] = w
    amax = padded.view(gm, bm, gn, bn).abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (gm, gn)
    scale_inv = amax / FP8_MAX
    q = (w / _expand_blocks(scale_inv, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv
