"""MLA: the absorbed (latent) form equals the naive per-head form; cached decoding equals a full pass."""

import pytest
import torch

import deepmoe
from deepmoe.generate import ContiguousLatentCache
from deepmoe.model.attention import MLA
from deepmoe.model.rope import apply_rope, rope_cos_sin, rope_frequencies

from .conftest import v2_config, v3_config


@pytest.mark.parametrize("make_cfg,budget", [(v2_config, None), (v3_config, None), (v3_config, 600)],
                         ids=["v2", "v3", "v3_query_slices"])
def test_absorbed_equals_naive(make_cfg, budget, monkeypatch):
    if budget:  # scores of 2·4·33 elements per query exceed 600: the queries go in slices of 2
        monkeypatch.setattr("deepmoe.model.attention.SCORES_BUDGET", budget)
    cfg = make_cfg()
    torch.manual_seed(0)
    attn = MLA(cfg, 0)
    for p in attn.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 33, cfg.hidden_size)
    inv, factor = rope_frequencies(cfg)
    cos, sin = rope_cos_sin(inv, torch.arange(33), factor)
    naive = attn(x, cos, sin)
    absorbed = attn(x, cos, sin, absorb=True)
    assert (naive - absorbed).abs().max() / naive.abs().max() < 1e-5


def test_incremental_decode_with_latent_cache_equals_full_forward():
    cfg = v3_config(num_nextn_predict_layers=0)
    model = deepmoe.build_model(cfg, seed=2).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = ContiguousLatentCache(model, 2, 20)
        parts = [model(x[:, :7], cache=cache, start_pos=0)]
        parts += [model(x[:, t:t + 1], cache=cache, start_pos=t) for t in range(7, 20)]
    inc = torch.cat(parts, dim=1)
    assert (full - inc).abs().max() / full.abs().max() < 1e-5
    # what is cached is the latent: kv_lora_rank + rope dims per token per layer, nothing per head
    assert cache.c_kv.shape[-1] + cache.k_pe.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def test_interleaved_rope_is_a_rotation_of_adjacent_pairs():
    x = torch.randn(1, 5, 2, 8)
    inv = torch.tensor([1.0, 0.5, 0.25, 0.125])
    cos, sin = rope_cos_sin(inv, torch.arange(5), 1.0)
    y = apply_rope(x, cos, sin, interleave=True)
    # complex-number definition (the official DeepSeek code): (x_2i + i·x_2i+1) · e^{i·pos·θ_i}
    z = torch.view_as_complex(x.reshape(1, 5, 2, 4, 2))
    ang = torch.arange(5)[:, None].float() * inv
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)[None, :, None]).flatten(-2)
    torch.testing.assert_close(y, ref)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # rotations keep the norm


def test_yarn_matches_transformers_frequencies():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = deepmoe.ModelConfig.from_preset("deepseek-v3")
    d = cfg.to_hf_dict()
    d.pop("architectures")
    hcfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](hcfg, "cpu")
    inv, factor = rope_frequencies(cfg)
    torch.testing.assert_close(inv, inv_ref)
    assert factor == pytest.approx(factor_ref)


def test_rope_frequencies_stay_fp32_under_bf16_casts():
    cfg = deepmoe.ModelConfig()
    exact = rope_frequencies(cfg)[0]
    for model in (deepmoe.build_model(cfg, dtype=torch.bfloat16), deepmoe.build_model(cfg).half()):
        assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, exact)
        assert model.lm_head.weight.dtype != torch.float32
