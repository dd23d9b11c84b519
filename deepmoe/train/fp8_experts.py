"""FP8 GEMMs for the routed experts: the grouped forward and input-gradient products in e4m3.

The linear layers follow DeepSeek-V3's recipe exactly (train/fp8.py: 1×128 activation tiles, 128×128
weight blocks). The routed experts cannot, on the hardware this targets: Hopper's grouped FP8 GEMM
(`torch._scaled_grouped_mm`) takes fp32 scales per row of the left operand and per column of the right
one, per group, and nothing finer. The 1×128 / 128×128 recipe would take one grouped launch per 128 of
the contraction dimension, and its fp32 sum, which gives back what FP8 gains. So the experts use
row-wise scales, the layout torchao's FP8 MoE training also uses:

    forward   h  = x · W[g]ᵀ     x: one scale per token row     W[g]: one per output channel
    dgrad     dx = dh · W[g]     dh: one per token row          W[g]ᵀ: one per input channel
    wgrad     dW[g] = dh_gᵀ · x_g   in the compute dtype (bf16), not FP8

Each scale is the absmax of its row over the whole contraction dimension: coarser than a 1×128 tile, so an
outlier costs its row more precision than under DeepSeek's recipe. The weight gradient's product sums over
each expert's tokens (a ragged contraction); its FP8 form needs per-group scales in a layout this code
cannot check without a GPU, so it stays in bf16 (a third of the expert FLOPs).

`fp8_grouped_mm_reference` dequantises both operands exactly and multiplies in fp32: the definition the
CPU runs and the tests check against; on CUDA (sm90+) the scaled grouped GEMM runs the same product.
"""

from __future__ import annotations

import torch

from ..fp8 import FP8_MAX
from ..model.experts import Experts, grouped_mm

E4M3 = torch.float8_e4m3fn


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) → (e4m3 (..., K), fp32 scale (...)) with one absmax scale per row: x ≈ q · scale."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(E4M3), scale


def fp8_grouped_mm_reference(aq: torch.Tensor, a_scale: torch.Tensor, bq: torch.Tensor, b_scale: torch.Tensor,
                             counts: torch.Tensor) -> torch.Tensor:
    """Rows of a (M, K) grouped by `counts`, times their group's b[g] (G, N, K)ᵀ → fp32 (M, N); a scaled per
    row (M,), b per row of each group (G, N). Dequantised exactly, multiplied in fp32."""
    a = aq.float() * a_scale.unsqueeze(-1)
    b = bq.float() * b_scale.unsqueeze(-1)
    with torch.autocast(device_type=a.device.type, enabled=False):  # CPU autocast would run the mm in bf16
        return grouped_mm(a, b, counts)


def _scaled_grouped_mm_available(t: torch.Tensor) -> bool:
    return (t.device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(t.device) >= (9, 0))


def scaled_grouped_mm(aq: torch.Tensor, a_scale: torch.Tensor, bq: torch.Tensor, b_scale: torch.Tensor,
                      offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The CUDA call: a (M, K) row-major with scales (M,), b (G, N, K) row-major with scales (G, N), passed
    as its transpose (G, K, N), column-major, which is the layout the kernel wants for the right operand."""
    return torch._scaled_grouped_mm(aq, bq.transpose(-2, -1), a_scale, b_scale, offs=offs, out_dtype=out_dtype)


def fp8_grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) · b[g]ᵀ per group, both quantised row-wise to e4m3 here, on the FP8 tensor cores where they exist."""
    aq, a_scale = quantize_rows(a)
    bq, b_scale = quantize_rows(b)
    if _scaled_grouped_mm_available(a):
        return scaled_grouped_mm(aq, a_scale, bq, b_scale, torch.cumsum(counts, 0, dtype=torch.int32), out_dtype)
    return fp8_grouped_mm_reference(aq, a_scale, bq, b_scale, counts).to(out_dtype)


class _Fp8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, counts)
        return fp8_grouped_mm(x, w, counts, x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, counts = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dy (M, N) · w[g] (N, K): w's rows are now its input channels
            dx = fp8_grouped_mm(dy, w.transpose(-2, -1).contiguous(), counts, x.dtype)
        if ctx.needs_input_grad[1]:  # dy_gᵀ · x_g summed over each group's rows, in the compute dtype
            dw = _weight_grad(dy.to(x.dtype), x, counts).to(w.dtype)
        return dx, dw, None


def _weight_grad(dy: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(G, N, K): Σ over group g's rows of dyᵀ · x. One grouped GEMM with the groups along the contraction
    (torch._grouped_mm's 2-D × 2-D form, which CPU and CUDA both run)."""
    return torch._grouped_mm(dy.t(), x, offs=torch.cumsum(counts, 0, dtype=torch.int32))


class Fp8Experts(Experts):
    """Routed experts whose grouped projections run in FP8 (see the module docstring); same parameters and
    state dict as Experts. Low-rank (LoRA) updates are not supported: FP8 is a pretraining precision."""

    def project(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, update=None) -> torch.Tensor:
        if update is not None:
            raise ValueError("FP8 experts take no low-rank updates (train LoRA adapters in bf16 or fp32)")
        return _Fp8GroupedMM.apply(x, w, counts)
