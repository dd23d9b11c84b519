"""Weight-only quantisation schemes: int8 / int4 with symmetric absmax scales per group of input channels,
and fp8 (e4m3 with one scale per 128×128 block, DeepSeek-V3's release format: deepmoe/fp8.py does the
numbers, format.py the layout; nothing below applies to it).

A weight W (..., out, in) is cut along its last (input) dimension into groups of `group_size` channels;
each group of each output row gets one fp32 scale s = absmax / qmax and stores q = round(W / s), so
W ≈ q · s. qmax is 127 for int8 and 7 for int4: the ranges are symmetric ([-127, 127], [-7, 7]), so
negating a weight negates its code, and -128 / -8 are never written. A row whose input dimension is
smaller than the group size is one group (the tiny presets' kv_b_proj has 64 inputs).

In memory the codes are int8 (int8 scheme) or two int4 codes per byte (int4 scheme), offset by +8 to
unsigned nibbles, the even input channel in the low nibble and the odd one in the high nibble. That is
the byte order of compressed-tensors' `pack-quantized` int32 words on a little-endian machine, so a
checkpoint's `weight_packed` is these bytes viewed as int32 (see format.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = {"int8": 8, "int4": 4, "fp8": 8}
FP8_BLOCK = (128, 128)  # the block of the DeepSeek-V3 release; `weight_block_size` in its config


class QuantError(ValueError):
    """A quantisation request that cannot be carried out as asked."""


@dataclass(frozen=True)
class QuantScheme:
    name: str  # "int8", "int4" or "fp8"
    group_size: int = 128

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise QuantError(f"unknown quantization scheme {self.name!r}; choose one of {sorted(SCHEMES)}")
        if self.fp8:
            if self.group_size != 128:
                raise QuantError(f"fp8 uses {FP8_BLOCK[0]}x{FP8_BLOCK[1]} blocks (the DeepSeek-V3 format); "
                                 f"--group-size applies to int8/int4 only, got {self.group_size}")
            return
        if self.group_size < 8 or self.group_size % 8:
            # compressed-tensors packs codes into 32-bit words along the input dimension
            raise QuantError(f"group size must be a positive multiple of 8, got {self.group_size}")

    @property
    def fp8(self) -> bool:
        return self.name == "fp8"

    @property
    def bits(self) -> int:
        return SCHEMES[self.name]

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_for(self, in_features: int, name: str = "weight") -> int:
        """The group size used for a weight with `in_features` inputs; a clear error if it does not fit.
        fp8's blocks take any shape (ragged edge blocks), so for fp8 this checks nothing."""
        if self.fp8:
            return min(FP8_BLOCK[1], in_features)
        g = min(self.group_size, in_features)
        if in_features % g:
            raise QuantError(f"{name}: input dimension {in_features} is not a multiple of the group size "
                             f"{self.group_size}; choose a --group-size that divides it, or --skip the tensor")
        if in_features % 8:
            raise QuantError(f"{name}: input dimension {in_features} is not a multiple of 8, which the packed "
                             f"format needs; --skip the tensor")
        return g

    def packed_cols(self, in_features: int) -> int:
        """Bytes per output row of the in-memory codes."""
        return in_features * self.bits // 8


def quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) float → (codes (..., out, in) int8 in [-qmax, qmax], scales (..., out, in/g) fp32).
    The codes are unpacked here; `pack_int4` packs int4 codes."""
    qmax = (1 << (bits - 1)) - 1
    *lead, n_in = w.shape
    if n_in % group_size:
        raise QuantError(f"input dimension {n_in} is not a multiple of the group size {group_size}")
    wg = w.detach().float().reshape(*lead, n_in // group_size, group_size)
    scales = wg.abs().amax(-1) / qmax  # (..., out, G)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group codes to zeros
    q = torch.round(wg / safe.unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(w.shape), scales


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (..., out, in) and scales (..., out, G) → weights (..., out, in), computed in fp32."""
    *lead, n_in = q.shape
    G = scales.shape[-1]
    w = q.float().reshape(*lead, G, n_in // G) * scales.float().unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 codes (..., in) int8 in [-8, 7] → (..., in/2) uint8: code+8, even channel in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: (..., in/2) uint8 → (..., in) int8."""
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def encode(w: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) → (stored codes: int8 (..., out, in) or packed uint8 (..., out, in/2), fp32 scales)."""
    q, scales = quantize_groups(w, scheme.bits, scheme.group_for(w.shape[-1], name))
    return (pack_int4(q) if scheme.bits == 4 else q), scales


def decode(stored: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
           ) -> torch.Tensor:
    """encode's inverse up to rounding: the dequantised weight (..., out, in)."""
    return dequantize_groups(unpack_int4(stored) if bits == 4 else stored, scales, dtype)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> torch.Tensor:
    """What a quantised checkpoint of w loads as: decode(encode(w)) in w's dtype."""
    stored, scales = encode(w, scheme, name)
    return decode(stored, scales, scheme.bits, w.dtype)
