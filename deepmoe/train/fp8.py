"""FP8 training as DeepSeek-V3 does it: GEMM inputs in e4m3 with fine-grained scales, fp32 accumulation.

Activations (and output gradients) get one scale per 1×128 tile along the contraction dimension, weights
one per 128×128 block, so an outlier only costs the precision of its own tile. Every GEMM of a linear layer
runs this way:

    forward   y  = x · Wᵀ      x tiles along K,   W blocks
    dgrad     dx = dy · W      dy tiles along N,  W blocks (the same quantised W, transposed)
    wgrad     dW = dyᵀ · x     dyᵀ and xᵀ tiles along the token dimension M

Master weights, gradients and optimizer state stay in their own precision (fp32 here); the embedding, the
output head, the router and the norms are not touched (only nn.Linear layers are converted, never the head
or the MTP projection into it), and neither is attention's core. The routed experts' grouped GEMMs run in
FP8 with row-wise scales instead (train/fp8_experts.py says why). A dimension that is not a multiple of 128
would need ragged tiles that the fast GEMM does not take: such layers stay as they are, and the report says
which.

The definition (`fp8_mm_reference`) dequantises both operands exactly and multiplies in fp32: every
quantisation error of the recipe is in it, none of the GEMM's. On CUDA, `torch.nn.functional.scaled_mm`
with block-wise recipes (Hopper and later) runs the same product in FP8; elsewhere the definition runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..fp8 import FP8_MAX, dequantize_fp8_block, quantize_fp8_block
from ..model.experts import Experts

TILE = 128
E4M3 = torch.float8_e4m3fn


def quantize_tiles(x: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → (e4m3 (M, K), fp32 scale (M, ceil(K/tile))) with one absmax scale per 1×tile run of a row;
    x ≈ q · scale tile by tile."""
    M, K = x.shape
    n = -(-K // tile)
    padded = torch.nn.functional.pad(x.float(), (0, n * tile - K)).reshape(M, n, tile)
    scale = padded.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # (M, n)
    q = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return q.reshape(M, n * tile)[:, :K], scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(tile, dim=1)[:, : q.shape[1]]


def fp8_mm_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     b_blocks: bool) -> torch.Tensor:
    """a (M, K) in 1×128 tiles times bᵀ, b (N, K) in 128×128 blocks (b_blocks) or 1×128 tiles → fp32 (M, N)."""
    b_real = dequantize_fp8_block(b, b_scale, dtype=torch.float32) if b_blocks else dequantize_tiles(b, b_scale)
    return dequantize_tiles(a, a_scale) @ b_real.t()


def _scaled_mm_available(t: torch.Tensor) -> bool:
    return (t.device.type == "cuda" and hasattr(torch.nn.functional, "scaled_mm")
            and torch.cuda.get_device_capability(t.device) >= (9, 0))


def fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_blocks: bool,
           out_dtype: torch.dtype) -> torch.Tensor:
    """a · bᵀ as fp8_mm_reference, on the FP8 tensor cores where they exist."""
    if not _scaled_mm_available(a):
        return fp8_mm_reference(a, a_scale, b, b_scale, b_blocks).to(out_dtype)
    F = torch.nn.functional
    # cuBLAS wants b column-major (bᵀ of a row-major b) and 1×128 scales outer-dimension-major
    a_recipe = F.ScalingType.BlockWise1x128
    b_recipe = F.ScalingType.BlockWise128x128 if b_blocks else F.ScalingType.BlockWise1x128
    a_s = a_scale.t().contiguous().t()
    b_s = b_scale.t() if b_blocks else b_scale.t().contiguous().t()
    return F.scaled_mm(a, b.t(), a_s, a_recipe, b_s, b_recipe, output_dtype=out_dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        wq, ws = quantize_fp8_block(weight)  # (N, K), (N/128, K/128)
        y = fp8_mm(*quantize_tiles(x2), wq, ws, True, x.dtype)
        ctx.save_for_backward(x2, wq, ws)
        ctx.x_shape, ctx.w_dtype = x.shape, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, wq, ws = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dy (M, N) · W (N, K): W's blocks transposed are blocks of Wᵀ
            dx = fp8_mm(*quantize_tiles(dy2), wq.t().contiguous(), ws.t().contiguous(), True, dy.dtype)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # dyᵀ (N, M) · x (M, K): both tiled along the token dimension M
            dw = fp8_mm(*quantize_tiles(dy2.t()), *quantize_tiles(x2.t()), False, torch.float32)
            dw = dw.to(ctx.w_dtype)
        return dx, dw


class Fp8Linear(nn.Linear):
    """An nn.Linear whose three GEMMs run in FP8 (see the module docstring); same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # autocast does not see the custom function: cast as it would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _Fp8LinearFunction.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# never in FP8 (DeepSeek-V3 keeps them in high precision): the output head, and the MTP projection whose
# output feeds it; the router is not an nn.Linear
SKIP = ("lm_head", "eh_proj")


@dataclass
class Fp8Report:
    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # with the reason
    experts: list[str] = field(default_factory=list)  # routed-expert layers in FP8 grouped GEMMs

    def summary(self) -> str:
        line = f"fp8       {len(self.converted)} linear layers in FP8 GEMMs"
        if self.experts:
            line += f", {len(self.experts)} routed-expert layers in FP8 grouped GEMMs (row-wise scales)"
        if not self.kept:
            return line
        # one entry per kind of layer (the same projection in every block): "kv_b_proj (512x64: ...) x5"
        kinds: dict[str, int] = {}
        for entry in self.kept:
            kind = entry.split(" ", 1)[0].rsplit(".", 1)[-1] + " " + entry.split(" ", 1)[1]
            kinds[kind] = kinds.get(kind, 0) + 1
        return line + "; kept in high precision: " + ", ".join(f"{k} x{n}" for k, n in kinds.items())


def convert_to_fp8_training(model: nn.Module) -> Fp8Report:
    """Swap the model's nn.Linear layers for Fp8Linear and its routed experts for Fp8Experts
    (train/fp8_experts.py), in place and on the same Parameter objects, so optimizer state, checkpoints and
    tied weights are unaffected."""
    from .fp8_experts import Fp8Experts

    report = Fp8Report()
    for name, module in list(model.named_modules()):
        if type(module) is Experts:
            _, inter, d = module.gate_proj.shape
            if inter % 16 or d % 16:  # the FP8 GEMM's operands need 16-byte rows
                report.kept.append(f"{name} (experts {inter}x{d}: not a multiple of 16)")
            else:
                module.__class__ = Fp8Experts  # a subclass with no state of its own: only `project` differs
                report.experts.append(name)
            continue
        if type(module) is not nn.Linear:
            continue
        if name.split(".")[-1] in SKIP:
            continue
        out_f, in_f = module.weight.shape
        if out_f % TILE or in_f % TILE:
            report.kept.append(f"{name} ({out_f}x{in_f}: not a multiple of {TILE})")
            continue
        fp8 = Fp8Linear(in_f, out_f, bias=module.bias is not None, device="meta")
        fp8.weight, fp8.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fp8)
        report.converted.append(name)
    return report
