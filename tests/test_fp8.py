"""FP8 block format: dequantization against its per-element definition, ragged edges, and the weights
load_pretrained builds from an FP8 checkpoint."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import deepmoe
from deepmoe.fp8 import dequantize_fp8_block, quantize_fp8_block

from .conftest import v3_config


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


def test_load_pretrained_dequantizes_an_fp8_checkpoint_as_defined(tmp_path):
    """The whole path from an FP8 checkpoint to the model's weights, against weights computed here block
    by block in float64 (none of deepmoe's FP8 code builds the expectation). Non-square 24x40 blocks
    leave ragged edge blocks in both dimensions of every matrix, and expose a swapped block axis."""
    cfg = v3_config(num_nextn_predict_layers=0)
    deepmoe.save_pretrained(deepmoe.build_model(cfg, seed=5), tmp_path / "src")
    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    bm, bn = 24, 40
    g = torch.Generator().manual_seed(0)
    fp8, expected = {}, {}
    for key, t in src.items():
        if not (t.dim() == 2 and key.endswith("proj.weight")):  # linears; not embed/head/gate/norms
            fp8[key] = expected[key] = t
            continue
        rows, cols = t.shape
        q = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = torch.rand(math.ceil(rows / bm), math.ceil(cols / bn), generator=g) * 1e-3 + 1e-4
        w = torch.empty(rows, cols, dtype=torch.float64)
        for bi in range(scale.shape[0]):
            for bj in range(scale.shape[1]):
                r, c = slice(bi * bm, min((bi + 1) * bm, rows)), slice(bj * bn, min((bj + 1) * bn, cols))
                w[r, c] = q[r, c].double() * scale[bi, bj].double()
        fp8[key], fp8[key + "_scale_inv"], expected[key] = q, scale, w.float()
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(fp8, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [bm, bn]}
    (out / "config.json").write_text(json.dumps(config))

    got = deepmoe.load_pretrained(out, dtype=torch.float32).state_dict()
    seen = set()
    for key, want in expected.items():
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+_proj)\.weight$", key)  # experts are stacked in memory
        name, value = (f"{m[1]}.{m[3]}", got[f"{m[1]}.{m[3]}"][int(m[2])]) if m else (key, got[key])
        seen.add(name)
        # fp8 × fp32 is exact in float64, so rounding it once to fp32 must equal the loader's fp32 product
        assert torch.equal(value, want), key
    assert seen == set(got)  # every weight of the model came from the checkpoint
