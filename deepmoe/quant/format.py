"""The on-disk formats: compressed-tensors' `pack-quantized` layout (int8 / int4), which vLLM and
llm-compressor read, and DeepSeek-V3's FP8 block layout (fp8), which its release uses.

For each quantised projection `P` (checkpoint names, so routed experts are `…mlp.experts.{e}.gate_proj`):
  P.weight_packed  int32 (out, in·bits/32): codes + 2^(bits−1) as unsigned bits-wide fields, element i of a
                   row at bit i·bits of the row's words (little-endian: for int4 the even channel is the
                   low nibble of each byte, for int8 byte i is channel i)
  P.weight_scale   fp32 (out, in/g): the group scales; the weight is (code · scale) per group
  P.weight_shape   int64 (2,): [out, in]
and config.json gets `quantization_config` = {quant_method: compressed-tensors, format: pack-quantized,
config_groups: {group_0: {targets: [Linear], weights: {num_bits, type: int, symmetric: true,
strategy: group, group_size}}}, ignore: [the projections left in high precision]}.
Routed experts need no special layout: the checkpoint already stores them one 2-D key per expert.
A weight whose input dimension is below the group size is one group (scale (out, 1)); compressed-tensors
decodes that as well (tests/test_quantize.py checks it with the library's own decompressor).

fp8, for each quantised projection `P`:
  P.weight            float8_e4m3fn (out, in): round(W / scale) in e4m3, clamped to ±448
  P.weight_scale_inv  fp32 (ceil(out/128), ceil(in/128)): one scale per 128×128 block (ragged at the edges);
                      W = weight · scale_inv, scale_inv = the block's absmax / 448
and config.json gets {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]},
exactly what the DeepSeek-V3 release ships; deepmoe's loader (checkpoint.py) and transformers read it.
"""

from __future__ import annotations

import torch

from ..fp8 import quantize_fp8_block
from .scheme import FP8_BLOCK, QuantError, QuantScheme, encode

PARTS = {".weight_packed": "qweight", ".weight_scale": "scales", ".weight_shape": "shape"}


def split_key(key: str) -> tuple[str, str | None]:
    """Checkpoint key → (the plain weight's key `P.weight`, which part: qweight / scales / shape / None)."""
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return key.removesuffix(suffix) + ".weight", part
    return key, None


def internal_name(name: str, part: str) -> str:
    """The model's weight name (`X.weight`, or stacked `…experts.gate_proj`) → its quantised buffer's name."""
    if name.endswith(".weight"):
        return f"{name.removesuffix('.weight')}.quant.{part}"
    return f"{name}.{part}"


def module_of(name: str) -> str:
    """The model's weight name → the module a quantised one replaces (`X`, or the layer's `…experts`)."""
    return name.removesuffix(".weight") if name.endswith(".weight") else name.rsplit(".", 1)[0]


def to_disk(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """In-memory codes (…, in·bits/8) int8/uint8 → weight_packed int32 (…, in·bits/32); same bytes for int4."""
    u = stored.view(torch.uint8) ^ 0x80 if bits == 8 else stored  # int8: code + 128
    return u.contiguous().view(torch.int32)


def from_disk(packed: torch.Tensor, bits: int) -> torch.Tensor:
    u = packed.contiguous().view(torch.uint8)
    return (u ^ 0x80).view(torch.int8) if bits == 8 else u


def disk_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The in-memory codes' shape of a weight_packed of this shape (four bytes per int32)."""
    return (*shape[:-1], shape[-1] * 4)


def disk_tensors(key: str, w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """A checkpoint weight `P.weight` (out, in) → the tensors that store it quantised."""
    if scheme.fp8:
        q, scale_inv = quantize_fp8_block(w, FP8_BLOCK)
        return {key: q, f"{key}_scale_inv": scale_inv}
    stored, scales = encode(w, scheme, key)
    base = key.removesuffix(".weight")
    return {f"{base}.weight_packed": to_disk(stored, scheme.bits), f"{base}.weight_scale": scales,
            f"{base}.weight_shape": torch.tensor(w.shape, dtype=torch.int64)}


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    if scheme.fp8:  # the release's own four fields; it names no ignored modules (they are not fp8 on disk)
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(FP8_BLOCK)}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": scheme.bits, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": scheme.group_size, "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None}},
        "ignore": sorted(ignore),
        "producer": "deepmoe quantize (round-to-nearest, absmax per group)",
    }


def read_scheme(qc: dict) -> QuantScheme:
    """A compressed-tensors quantization_config → the scheme deepmoe runs; clear errors for others."""
    if qc.get("format") != "pack-quantized":
        raise QuantError(f"compressed-tensors format {qc.get('format')!r} is not supported (deepmoe reads "
                         f"pack-quantized int8/int4 weight-only checkpoints)")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise QuantError(f"expected one compressed-tensors config group, found {len(groups)}")
    w = groups[0].get("weights") or {}
    if groups[0].get("input_activations") or w.get("type") != "int" or not w.get("symmetric", True) \
            or w.get("strategy") != "group" or w.get("num_bits") not in (4, 8):
        raise QuantError(f"unsupported compressed-tensors weights {w} (deepmoe runs symmetric int8/int4 "
                         f"group-wise weight-only quantisation)")
    return QuantScheme(f"int{w['num_bits']}", int(w["group_size"]))
