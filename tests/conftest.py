"""Shared tiny configurations and helpers: transformers is the reference the model is checked against."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepmoe import ModelConfig
from deepmoe.fp8 import quantize_fp8_block

torch.set_num_threads(2)


def v2_config(**kw) -> ModelConfig:
    """DeepSeek-V2 style: softmax, group-limited greedy, no q compression, 2 shared experts."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=3, n_group=4,
                topk_group=2, topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
                routed_scaling_factor=1.5, first_k_dense_replace=1, max_position_embeddings=256,
                num_nextn_predict_layers=0)
    return ModelConfig(**{**base, **kw})


def v3_config(**kw) -> ModelConfig:
    """DeepSeek-V3 style: sigmoid, noaux_tc with groups, q_lora, YaRN, one MTP layer."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
                topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=256,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
                num_nextn_predict_layers=1)
    return ModelConfig(**{**base, **kw})


# Configs *transformers* builds: only sizes are given; every routing field a real V2/V3 file omits is left to
# transformers' own defaults, so what we read is what transformers wrote, not what our writer wrote.
_HF_SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 n_routed_experts=16, first_k_dense_replace=1, max_position_embeddings=256)


def hf_v2_config(**kw):
    """transformers' DeepseekV2Config: softmax routing (no scoring_func field), group-limited greedy."""
    transformers = pytest.importorskip("transformers")
    return transformers.DeepseekV2Config(**{**_HF_SIZES, "q_lora_rank": None, "n_shared_experts": 2,
                                            "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
                                            "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5,
                                            **kw})


def hf_v3_config(**kw):
    """transformers' DeepseekV3Config with its defaults for routing (sigmoid, noaux_tc, norm, scale 2.5), YaRN."""
    transformers = pytest.importorskip("transformers")
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
    return transformers.DeepseekV3Config(**{**_HF_SIZES, "q_lora_rank": 32, "num_experts_per_tok": 4, "n_group": 4,
                                            "topk_group": 2, "rope_parameters": yarn, **kw})


def hf_random_model(hcfg, seed: int = 0, dtype=torch.float32, scale_qk: float = 1.0):
    """A random transformers model for a transformers config, with a non-zero routing bias (V3). Other dtypes
    come through transformers' own from_pretrained, which keeps its RoPE frequencies and routers in fp32 (a
    plain `.to(bf16)` would round them). scale_qk > 1 sharpens attention so outputs depend on positions."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape) * 0.05)
            elif name.endswith(("q_b_proj.weight", "q_proj.weight", "kv_a_proj_with_mqa.weight")):
                t.mul_(scale_qk)
    if dtype == torch.float32:
        return model
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()


def write_code_corpus(root: Path, files: int = 40, modulus: int = 17, lines: int = 12, spread: int = 9) -> Path:
    """A folder `root/corpus` of small generated Python modules (a training corpus `deepmoe train --data` reads,
    varied enough for a validation split); → its path."""
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(files):
        body = "".join(f"    value_{j} = compute(x, {i * j % modulus}) + offset_{j % 5}\n"
                       for j in range(lines + i % spread))
        (corpus / f"mod_{i:02d}.py").write_text(f"def function_{i}(x):\n{body}    return value_{i % 7}\n")
    return corpus


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The definition the engines are checked against: n greedy tokens, each by a full forward, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


def _dequantize_by_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    """weight · scale_inv over each block, one block at a time (ragged edges included), in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    bm, bn = block
    for i in range(0, q.shape[0], bm):
        for j in range(0, q.shape[1], bn):
            out[i:i + bm, j:j + bn] = q[i:i + bm, j:j + bn].double() * scale_inv[i // bm, j // bn].double()
    return out.float()  # the float64 product is exact (4 + 24 bits), so this rounds once, as an fp32 multiply does


def write_fp8_twin(src: Path, fp8_dir: Path, twin_dir: Path, block=(32, 32)) -> None:
    """From a checkpoint dir, write an FP8-block version and its exact dequantized fp32 twin. The twin is
    built here block by block, not with the loader's dequantizer: the loader must not be its own reference."""
    fp8_dir.mkdir()
    twin_dir.mkdir()
    fp8, twin = {}, {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            quantize = (t.dim() == 2 and key.endswith("proj.weight"))  # linears; not embed/head/gate/norms
            if quantize:
                q, s = quantize_fp8_block(t, block)
                fp8[key], fp8[key + "_scale_inv"] = q, s
                twin[key] = _dequantize_by_blocks(q, s, block)
            else:
                fp8[key] = twin[key] = t
    save_file(fp8, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(twin, str(twin_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (twin_dir / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests need a GPU: skipped (not failed) where there is none, as in CI."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def failing_sample(sample, seed):
    """The engine's batched sampler, except that a batch holding a request seeded `seed` fails: a stand-in for
    any error that belongs to one request's parameters."""
    def wrapped(logits, params, *rest):
        if any(p.seed == seed for p in params):
            raise RuntimeError("injected sampling failure")
        return sample(logits, params, *rest)
    return wrapped
