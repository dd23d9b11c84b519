"""Routing pitfalls from REFERENCE.md, each of which shipped as a bug somewhere."""

import logging

import pytest
import torch

from deepmoe.config import ModelConfig
from deepmoe.model.router import Gate, route

from .conftest import v3_config


def test_negative_bias_cannot_select_expert_from_masked_group():
    # 8 experts in 4 groups of 2; keep 1 group, pick 2 experts. Group 0 wins on biased scores.
    logits = torch.tensor([[4.0, 4.0, 0.0, 0.0, -1.0, -1.0, -1.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0])
    r = route(logits, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=1,
              norm_topk_prob=True, bias=bias)
    assert sorted(r.indices[0].tolist()) == [0, 1]
    # Now make every kept-group score negative after bias: with a 0.0 fill (the shipped bug) masked
    # experts (choice 0.0) would outrank them; with -inf they never can.
    bias = torch.full((8,), -5.0)
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    r = route(logits, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=1,
              bias=bias)
    assert sorted(r.indices[0].tolist()) == [0, 1]


def test_bias_changes_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    plain = route(logits, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=False)
    assert sorted(plain.indices[0].tolist()) == [0, 1]
    biased = route(logits, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=False,
                   bias=torch.tensor([0.0, -1.0, 0.0, 1.0]))
    assert sorted(biased.indices[0].tolist()) == [0, 3]
    sig = logits.sigmoid()[0]
    got = dict(zip(biased.indices[0].tolist(), biased.weights[0].tolist()))
    assert abs(got[0] - sig[0].item()) < 1e-7 and abs(got[3] - sig[3].item()) < 1e-7  # unbiased scores


def test_group_scores_top2_sum_vs_max():
    # group A = {0.9, 0.0}, group B = {0.6, 0.6}: top-2 sum prefers B, max prefers A.
    scores = torch.tensor([[0.9, 0.0, 0.6, 0.6]])
    logits = torch.log(scores / (1 - scores + 1e-9) + 1e-9)  # sigmoid⁻¹, so sigmoid(logits) ≈ scores
    tc = route(logits, top_k=1, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1)
    assert tc.indices[0].item() in (2, 3)
    glg = route(torch.log(scores + 1e-9), top_k=1, scoring_func="softmax", topk_method="group_limited_greedy",
                n_group=2, topk_group=1)
    assert glg.indices[0].item() == 0


def test_normalisation_and_scaling():
    logits = torch.randn(5, 16)
    r = route(logits, top_k=4, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
              norm_topk_prob=True, routed_scaling_factor=2.5)
    torch.testing.assert_close(r.weights.sum(-1), torch.full((5,), 2.5))
    soft = route(logits, top_k=4, scoring_func="softmax", routed_scaling_factor=1.0)
    torch.testing.assert_close(soft.weights, logits.softmax(-1).topk(4).values)
    assert r.weights.dtype == torch.float32


def test_gate_keeps_fp32_bias_under_bf16_cast():
    gate = Gate(v3_config())
    with torch.no_grad():
        gate.e_score_correction_bias.fill_(1e-3 / 3)
    gate = gate.to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert gate.e_score_correction_bias[0].item() == torch.tensor(1e-3 / 3).item()


def _hf_router_and_ours(tmp_path, model_type: str, **fields):
    """transformers' router for a config transformers wrote, and our Gate from that same config.json."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    make, router = {"deepseek_v2": (transformers.DeepseekV2Config, DeepseekV2TopkRouter),
                    "deepseek_v3": (transformers.DeepseekV3Config, DeepseekV3TopkRouter)}[model_type]
    make(hidden_size=32, num_attention_heads=4, n_routed_experts=16, **fields).save_pretrained(tmp_path)
    hcfg = transformers.AutoConfig.from_pretrained(tmp_path)
    theirs = router(hcfg)
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    ours = Gate(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(theirs.weight.shape, generator=g))
        ours.weight.copy_(theirs.weight)
        if model_type == "deepseek_v3":
            theirs.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.1)
            ours.e_score_correction_bias.copy_(theirs.e_score_correction_bias)
    return theirs, ours


def _by_expert(indices: torch.Tensor, weights: torch.Tensor):
    order = indices.argsort(dim=-1)  # transformers' topk is unsorted: compare as {expert: weight} per token
    return indices.gather(-1, order), weights.gather(-1, order)


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("model_type, method, n_group", [
    ("deepseek_v2", "greedy", None), ("deepseek_v2", "group_limited_greedy", 4),
    ("deepseek_v3", None, 1), ("deepseek_v3", None, 4)])
def test_routing_equals_transformers_for_every_combination(tmp_path, caplog, model_type, method, n_group, top_k,
                                                           norm, scale):
    """Every (scoring, top-1 or top-k, norm_topk_prob, scaling) combination a config can spell, decided by
    transformers' own routers, not by our reading of them: V2 never renormalises (it ignores norm_topk_prob),
    V3 renormalises whenever asked (top-1 too), both scale last."""
    fields = dict(num_experts_per_tok=top_k, norm_topk_prob=norm, routed_scaling_factor=scale, n_group=n_group,
                  topk_group=2 if n_group and n_group > 1 else n_group)
    if method:
        fields["topk_method"] = method
    with caplog.at_level(logging.WARNING, logger="deepmoe"):
        theirs, ours = _hf_router_and_ours(tmp_path, model_type, **fields)
    if model_type == "deepseek_v2" and norm:
        assert "norm_topk_prob=true is ignored" in caplog.text
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ref_w, ref_i = theirs(x)
        got = ours(x)
    ref_i, ref_w = _by_expert(ref_i, ref_w)
    got_i, got_w = _by_expert(got.indices, got.weights)
    assert torch.equal(got_i, ref_i)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-6, atol=1e-7)
