"""deepmoe.quant: int8/int4 group quantisation, its checkpoint format, the quantised modules and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from deepmoe import build_model, load_pretrained, save_pretrained
from deepmoe.cli import main
from deepmoe.engine.llm import LLM
from deepmoe.engine.sequence import SamplingParams
from deepmoe.fp8 import dequantize_fp8_block, quantize_fp8_block
from deepmoe.quant import (QuantError, QuantExperts, QuantLinear, QuantScheme, dequantize_groups, pack_int4,
                           prepare_cpu, quantize_checkpoint, quantize_model, quantize_groups, unpack_int4,
                           use_reference)
from deepmoe.quant import quantize as quantize_module
from deepmoe.quant.modules import set_weight
from deepmoe.tokenizer import train_bpe

from .conftest import naive_greedy, v3_config

GROUP = 32  # the tiny config's inputs are 32, 64 and 128 wide


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny V3 model (with MTP) saved in fp32 with a tokenizer, and a batch of token ids."""
    model = build_model(v3_config(), seed=0).eval()
    path = tmp_path_factory.mktemp("fp32")
    save_pretrained(model, path, dtype=torch.float32)
    train_bpe(["def f(x):\n    return x + 1\n" * 20], 300).save(path)
    return model, path, torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, tiny, tmp_path_factory):
    scheme = QuantScheme(request.param, GROUP)
    out = tmp_path_factory.mktemp(request.param) / "model"
    stats = quantize_checkpoint(tiny[1], out, scheme)
    return scheme, out, stats


def logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


# ---- the scheme --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(48, 256), (3, 16, 64)])
def test_round_trip_error_is_at_most_half_a_step_per_element(bits, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * torch.rand(shape[-1]) * 3
    w[..., 0, :32] = 0  # an all-zero group stays zero
    q, scales = quantize_groups(w, bits, 32)
    qmax = 127 if bits == 8 else 7
    assert q.dtype == torch.int8 and int(q.abs().max()) == qmax  # each group's absmax element hits ±qmax
    assert scales.shape == (*shape[:-1], shape[-1] // 32) and scales.dtype == torch.float32
    back = dequantize_groups(q, scales)
    step = scales.repeat_interleave(32, dim=-1)  # each element's group scale
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert back[..., 0, :32].eq(0).all()
    torch.testing.assert_close(scales, w.reshape(*shape[:-1], -1, 32).abs().amax(-1) / qmax)


def test_int4_packing_is_an_exact_round_trip_with_the_even_channel_in_the_low_nibble():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, torch.randperm(32)]
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_bad_requests_are_clear_errors(tiny, tmp_path):
    with pytest.raises(QuantError, match="unknown quantization scheme 'int3'"):
        QuantScheme("int3")
    with pytest.raises(QuantError, match="multiple of 8"):
        QuantScheme("int8", 12)
    # 48 divides none of the tiny model's input widths: the error names a tensor, and nothing is written
    with pytest.raises(QuantError, match=r"model\.layers\.\d+\..*: input dimension \d+ is not a multiple of the "
                                         r"group size 48"):
        quantize_checkpoint(tiny[1], tmp_path / "out", QuantScheme("int8", 48))
    assert not (tmp_path / "out").exists()
    with pytest.raises(QuantError, match="some but not all routed experts"):
        quantize_checkpoint(tiny[1], tmp_path / "out", QuantScheme("int8", GROUP), skip=[r"experts\.3\."])
    with pytest.raises(QuantError, match="bad --skip pattern"):
        quantize_checkpoint(tiny[1], tmp_path / "out", QuantScheme("int8", GROUP), skip=["("])


def test_quantising_a_quantised_model_is_refused(quantized, tmp_path):
    with pytest.raises(QuantError, match="already quantised"):
        quantize_checkpoint(quantized[1], tmp_path / "again", QuantScheme("int8", GROUP))


# ---- the checkpoint ----------------------------------------------------------------------------------------
def test_the_checkpoint_holds_compressed_tensors_keys_and_config(quantized, tiny):
    scheme, path, stats = quantized
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == scheme.bits
    assert "lm_head" in cfg["ignore"] and "model.layers.1.mlp.gate" in cfg["ignore"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.1.mlp.experts.5.down_proj.weight_packed")
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 32 * scheme.bits // 32)
        assert f.get_tensor("model.layers.1.mlp.experts.5.down_proj.weight_scale").shape == (64, 1)
        assert f.get_tensor("model.layers.1.mlp.experts.5.down_proj.weight_shape").tolist() == [64, 32]
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.3.eh_proj.weight_packed",
                 "model.layers.3.self_attn.kv_b_proj.weight_packed", "model.layers.2.mlp.shared_experts.up_proj.weight_packed"):
        assert kept in keys
    # codes + an fp32 scale per 32 weights: (bits/8 + 4/32) bytes a weight against bf16's 2, plus weight_shape
    per_weight = (scheme.bits / 8 + 4 / GROUP) / 2
    assert per_weight < stats["quantized_bytes"] / stats["bf16_bytes"] < per_weight + 0.005


def test_compressed_tensors_decodes_our_files_to_our_weights(quantized):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme, path, _ = quantized
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    ct_scheme = QuantizationScheme(**cfg["config_groups"]["group_0"])
    model = load_pretrained(path)
    checked = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for base, ours in (("model.layers.0.self_attn.q_a_proj", model.model.layers[0].self_attn.q_a_proj.quant),
                           ("model.layers.1.self_attn.kv_b_proj", model.model.layers[1].self_attn.kv_b_proj.quant),
                           ("model.layers.2.mlp.experts.7.up_proj", (model.model.layers[2].mlp.experts.up_proj, 7))):
            part = {p: f.get_tensor(f"{base}.{p}") for p in ("weight_packed", "weight_scale", "weight_shape")}
            theirs = PackedQuantizationCompressor.decompress(part, ct_scheme)["weight"]
            ours, index = ours if isinstance(ours, tuple) else (ours, None)
            torch.testing.assert_close(theirs.float(), ours.dequantized(index), rtol=0, atol=0)
            checked += 1
    assert checked == 3 and ct.__version__


# ---- loading and running -----------------------------------------------------------------------------------
def test_loaded_model_equals_in_memory_quantisation_and_stays_near_fp32(quantized, tiny):
    scheme, path, _ = quantized
    model, _, ids = tiny
    loaded = load_pretrained(path)
    assert isinstance(loaded.model.layers[0].self_attn.q_a_proj, QuantLinear)
    assert isinstance(loaded.model.layers[1].mlp.experts, QuantExperts)
    assert isinstance(loaded.model.layers[1].mlp.gate.weight, torch.nn.Parameter)  # the router is not quantised
    assert len(loaded.mtp) == 1 and isinstance(loaded.mtp[0].eh_proj, QuantLinear)
    in_memory = copy.deepcopy(model)
    quantize_model(in_memory, scheme)
    use_reference(loaded)
    got = logits(loaded, ids)
    assert torch.equal(got, logits(in_memory, ids))
    ref = logits(model, ids)
    rel = float((got - ref).norm() / ref.norm())
    # measured 0.013 (int8) and 0.17 (int4) on this random-init model with 32-channel groups
    assert rel < (0.03 if scheme.bits == 8 else 0.3), rel
    assert rel > 0  # the weights did change


def test_cpu_kernels_equal_the_reference(quantized, tiny):
    scheme, path, _ = quantized
    loaded = load_pretrained(path)  # on CPU: prepare_cpu already ran
    counts = prepare_cpu(loaded)
    assert counts["fast"] > 0, counts  # int8: one-group weights (32 inputs); int4: N % 16 == 0
    ids = tiny[2][:1, :1]  # one row: the int4 kernel's case
    fast = logits(loaded, ids)
    use_reference(loaded)
    torch.testing.assert_close(fast, logits(loaded, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quant_linear_kernels_on_random_inputs(bits):
    scheme = QuantScheme(bits, 64)
    layer = QuantLinear(64, 48, scheme)  # one group: both kernels fit
    set_weight(layer.quant, torch.randn(48, 64, generator=torch.Generator().manual_seed(2)), scheme)
    assert layer.quant.prepare_cpu() == 1
    x = torch.randn(1, 64)
    with torch.no_grad():
        fast = layer(x)
        use_reference(layer)
        torch.testing.assert_close(fast, layer(x), rtol=1e-5, atol=1e-5)


def test_sync_free_experts_equal_the_grouped_form(quantized):
    model = load_pretrained(quantized[1])
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(5, 64)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(5)])
    w = torch.rand(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, idx, w, sync_free=True), experts(x, idx, w), rtol=1e-5, atol=1e-6)


def test_sync_free_experts_and_linears_compile_to_one_graph(quantized):
    """The graphed CUDA decode runs the sync-free form: it must trace with no graph break (the reference path;
    the Triton kernel is left out under compile) and equal eager."""
    model = load_pretrained(quantized[1])
    use_reference(model)
    layer = model.model.layers[1]
    experts, proj = layer.mlp.experts, layer.self_attn.o_proj
    x = torch.randn(5, 64)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(5)])
    w = torch.rand(5, 4)

    def step(x, idx, w):
        return experts(x, idx, w, sync_free=True) + proj(x)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, idx, w), step(x, idx, w), rtol=1e-5, atol=1e-6)


def test_llm_serves_a_quantised_directory(quantized):
    path = quantized[1]
    llm = LLM(path, device="cpu", kv_cache_bytes=1 << 20, block_size=4)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    loaded = load_pretrained(path)
    assert out[0].token_ids == naive_greedy(loaded, [5, 6, 7], 5)


def test_skip_patterns_leave_modules_in_high_precision(tiny, tmp_path):
    quantize_checkpoint(tiny[1], tmp_path / "q", QuantScheme("int4", GROUP), skip=[r"self_attn", r"layers\.2\.mlp\.experts"])
    model = load_pretrained(tmp_path / "q")
    assert isinstance(model.model.layers[0].self_attn.q_a_proj, torch.nn.Linear)
    assert not isinstance(model.model.layers[2].mlp.experts, QuantExperts)
    assert isinstance(model.model.layers[1].mlp.experts, QuantExperts)
    assert isinstance(model.model.layers[2].mlp.shared_experts.up_proj, QuantLinear)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_a_proj.weight,
                               tiny[0].model.layers[0].self_attn.q_a_proj.weight, rtol=0, atol=0)


def test_a_crash_mid_write_leaves_no_output(tiny, tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("injected crash")
        return real(*args, **kwargs)

    real = quantize_module.disk_tensors
    monkeypatch.setattr(quantize_module, "disk_tensors", failing)
    with pytest.raises(RuntimeError, match="injected crash"):
        quantize_checkpoint(tiny[1], tmp_path / "out", QuantScheme("int8", GROUP))
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the hidden directory it was being written in


def test_cli_quantize_reports_sizes(tiny, tmp_path, capsys):
    assert main(["quantize", str(tiny[1]), str(tmp_path / "q"), "--scheme", "int4", "--group-size", "32",
                 "--skip", "kv_b_proj"]) == 0
    out = capsys.readouterr().out
    assert "to int4 (group 32)" in out and "x bf16" in out and "wrote" in out
    assert main(["quantize", str(tiny[1]), str(tmp_path / "r"), "--scheme", "int4", "--group-size", "12"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quantised weights"):
        save_pretrained(load_pretrained(tmp_path / "q"), tmp_path / "s")


def test_convert_dequantizes_a_quantised_directory(quantized, tmp_path):
    from deepmoe.convert import convert_checkpoint

    r = convert_checkpoint(quantized[1], tmp_path / "dense", dtype=torch.float32)
    assert r["dequantized"] == 177  # the tiny model's quantised projections, each back to one `.weight`
    dense, loaded = load_pretrained(tmp_path / "dense"), load_pretrained(quantized[1])
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    torch.testing.assert_close(dense.model.layers[1].mlp.experts.up_proj[3],
                               loaded.model.layers[1].mlp.experts.up_proj.dequantized(3), rtol=0, atol=0)


def test_a_quantised_directory_runs_in_bf16(quantized, tiny):
    path, ids = quantized[1], tiny[2]
    bf16 = load_pretrained(path, dtype=torch.bfloat16)
    assert bf16.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16  # absorbed attention's view
    got, ref = logits(bf16, ids), logits(load_pretrained(path), ids)
    assert float((got - ref).norm() / ref.norm()) < 0.03
    llm = LLM(path, device="cpu", dtype=torch.bfloat16, kv_cache_bytes=1 << 20, block_size=4)
    assert len(llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].token_ids) == 3


# ---- fp8: DeepSeek-V3's 128x128 block format ---------------------------------------------------------------
def read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def fp8(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "model"
    stats = quantize_checkpoint(tiny[1], out, QuantScheme("fp8"))
    return out, stats


def test_fp8_output_is_the_release_layout(fp8, tiny):
    path, stats = fp8
    assert json.loads((path / "config.json").read_text())["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    src, out = read_all(tiny[1]), read_all(path)
    scaled = {k.removesuffix("_scale_inv") for k in out if k.endswith("_scale_inv")}
    assert stats["quantized"] == len(scaled) == 177  # the same projections as int8/int4
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"):
        assert kept not in scaled and out[kept].dtype == torch.float32
    assert {"model.layers.1.mlp.experts.5.down_proj.weight", "model.layers.3.eh_proj.weight",
            "model.layers.0.self_attn.kv_b_proj.weight"} <= scaled
    for key in scaled:
        w, s = out[key], out[key + "_scale_inv"]
        assert w.dtype == torch.float8_e4m3fn and w.shape == src[key].shape and s.dtype == torch.float32
        assert s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        q, scale_inv = quantize_fp8_block(src[key])
        assert torch.equal(w.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s, scale_inv)
    assert set(out) == set(src) | {k + "_scale_inv" for k in scaled}
    assert 0.5 < stats["quantized_bytes"] / stats["bf16_bytes"] < 0.51  # a byte a weight + a few scales


def test_fp8_reads_back_as_the_dequantised_weights_exactly(fp8, tiny, tmp_path):
    path, _ = fp8
    src, out = read_all(tiny[1]), read_all(path)
    expected = {k: (dequantize_fp8_block(out[k], out[k + "_scale_inv"], (128, 128), torch.float32)
                    if k + "_scale_inv" in out else t) for k, t in src.items()}
    loaded = load_pretrained(path, dtype=torch.float32)
    save_pretrained(loaded, tmp_path / "back", dtype=torch.float32)  # the loaded weights in checkpoint names
    back = read_all(tmp_path / "back")
    assert set(back) == set(expected)
    unequal = [k for k in expected if not torch.equal(back[k], expected[k])]
    assert unequal == []
    changed = sum(not torch.equal(back[k], src[k]) for k in src)
    assert changed == 177  # every quantised projection moved, nothing else did


def test_transformers_reads_the_fp8_output(fp8, tiny):
    transformers = pytest.importorskip("transformers")
    path, ids = fp8[0], tiny[2]
    # transformers dequantises fp8 blocks on a machine without a GPU (it warns and loads plain Linear layers)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_pretrained(path, dtype=torch.float32, load_mtp=False)
    layer = hf.model.layers[0].self_attn.q_a_proj
    assert isinstance(layer, torch.nn.Linear) and layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, ours.model.layers[0].self_attn.q_a_proj.weight)
    with torch.no_grad():
        theirs = hf(ids).logits.float()
    torch.testing.assert_close(theirs, logits(ours, ids), rtol=1e-4, atol=1e-4)


def test_fp8_bad_requests(fp8, quantized, tmp_path):
    with pytest.raises(QuantError, match="already fp8"):
        quantize_checkpoint(fp8[0], tmp_path / "again", QuantScheme("fp8"))
    with pytest.raises(QuantError, match="already quantised"):
        quantize_checkpoint(quantized[1], tmp_path / "again", QuantScheme("fp8"))
    with pytest.raises(QuantError, match="--group-size applies to int8/int4 only"):
        QuantScheme("fp8", 64)
    with pytest.raises(QuantError, match="on-disk format"):
        quantize_model(build_model(v3_config(), seed=0), QuantScheme("fp8"))
    assert not (tmp_path / "again").exists()


def test_cli_quantize_fp8(tiny, tmp_path, capsys):
    assert main(["quantize", str(tiny[1]), str(tmp_path / "q"), "--scheme", "fp8"]) == 0
    assert "to fp8 (128x128 blocks)" in capsys.readouterr().out
    assert main(["quantize", str(tiny[1]), str(tmp_path / "r"), "--scheme", "fp4"]) == 2
    assert "invalid choice: 'fp4'" in capsys.readouterr().err
