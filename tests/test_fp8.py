"""FP8 128×128 block format: dequantization against its per-element definition, ragged edges."""

import pytest
import torch

from deepmoe.fp8 import dequantize_fp8_block, quantize_fp8_block


def test_dequantize_matches_elementwise_definition_with_ragged_edges():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 200, generator=g) * 3).to(torch.float8_e4m3fn)  # 3 × 2 blocks, both ragged
    scale = torch.rand(3, 2, generator=g) + 0.5
    got = dequantize_fp8_block(w, scale, (128, 128), torch.float32)
    ref = torch.empty(300, 200)
    for i in range(300):
        for j in range(0, 200, 64):  # 64-wide slices never straddle a block boundary
            ref[i, j:j + 64] = w[i, j:j + 64].float() * scale[i // 128, j // 128]
    assert torch.equal(got, ref)


def test_quantize_round_trip_error_is_fp8_sized():
    w = torch.randn(260, 130) * torch.logspace(-3, 1, 130)  # columns of very different magnitude
    q, s = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2) and s.dtype == torch.float32
    back = dequantize_fp8_block(q, s, dtype=torch.float32)
    blockmax = torch.zeros_like(w)
    for bi in range(3):
        for bj in range(2):
            sl = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            blockmax[sl] = w[sl].abs().max()
    # E4M3 has 3 mantissa bits: relative step 1/8 of the value, and the block max maps to 448
    assert ((back - w).abs() <= w.abs() / 16 + blockmax / 448 * 2**-6 + 1e-12).all()


def test_wrong_scale_shape_is_rejected():
    with pytest.raises(ValueError, match=r"expected \(2, 1\)"):
        dequantize_fp8_block(torch.zeros(200, 100).to(torch.float8_e4m3fn), torch.ones(1, 1))
