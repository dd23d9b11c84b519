"""The parallelism plan on paper (deepmoe/parallel/plan.py): its parameter arithmetic equals the built model's,
DeepSeek's published sizes come out, and the memory and traffic figures obey the relations they must."""

from dataclasses import replace
from pathlib import Path

import pytest

from deepmoe.config import ModelConfig
from deepmoe.parallel.plan import (ParallelPlan, PlanError, attention_activations, make_plan, mlp_activations,
                                   model_counts, parse_plan, stage_layout)
from deepmoe.parallel.plan_report import V3_PUBLISHED, format_plan, page
from deepmoe.stats import model_stats

from .conftest import v2_config, v3_config

V3 = ModelConfig.from_preset("deepseek-v3")
# DeepSeek-V2 (236B total, 21B activated) as its config.json gives it: a third published point
V2 = ModelConfig.from_hf_dict(dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
    moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2,
    num_experts_per_tok=6, first_k_dense_replace=1, n_group=8, topk_group=3, topk_method="group_limited_greedy"))


@pytest.mark.parametrize("cfg", [
    ModelConfig.from_preset("tiny"), ModelConfig.from_preset("ref-813M"), ModelConfig.from_preset("deepseek-v2-lite"),
    V3, v2_config(), v3_config(attention_bias=True), v3_config(tie_word_embeddings=True, num_nextn_predict_layers=2),
], ids=["tiny", "ref-813M", "v2-lite", "v3", "v2-no-q-lora", "v3-attention-bias", "v3-tied-mtp2"])
def test_counts_equal_the_built_model(cfg):
    s, c = model_stats(cfg), model_counts(cfg)
    assert (c["total"], c["activated"], c["mtp"]) == (s.total, s.activated, s.mtp)


@pytest.mark.parametrize("cfg,total,activated", [(V3, 671e9, 37e9), (V2, 236e9, 21e9),
                                                 (ModelConfig.from_preset("deepseek-v2-lite"), 15.7e9, 2.4e9)],
                         ids=["v3", "v2", "v2-lite"])
def test_published_sizes(cfg, total, activated):
    c = model_counts(cfg)
    assert c["total"] == pytest.approx(total, rel=0.005)  # embedding and head included, MTP not
    # DeepSeek does not say how it counts "activated"; leaving out the input embedding (a lookup, not a matmul)
    # lands nearest its figure for all three models, counting it would not (V3 +1.5%, V2-Lite +11%)
    embedding = cfg.vocab_size * cfg.hidden_size
    assert c["activated_deepseek"] == c["activated"] - embedding
    assert abs(c["activated_deepseek"] - activated) < abs(c["activated"] - activated)
    assert c["activated_deepseek"] == pytest.approx(activated, rel=0.022)


def test_v3_counts_as_deepseek_states_them():
    c = model_counts(V3)
    assert c["total"] == 671_026_404_352  # 671B: main model without MTP
    assert c["activated_deepseek"] == pytest.approx(37e9, rel=0.011)  # 36.63B
    # the 14B DeepSeek gives for MTP are its own 11.6B plus the embedding and head copies its files carry
    assert c["mtp"] + 2 * V3.vocab_size * V3.hidden_size == pytest.approx(14e9, rel=0.04)


def test_stage_layout_places_every_layer_once():
    stages = stage_layout(V3, 16)
    assert [i for s in stages for i in s.layers] == list(range(61))
    assert [len(s.layers) for s in stages] == [3] + [4] * 14 + [2]  # 61 layers + MTP in 62 slots
    assert stages[-1].mtp == 1 and sum(s.mtp for s in stages) == 1
    assert stage_layout(V3, 1)[0].layers == range(61)


def test_v3_published_setup_fits_in_80gb():
    r = make_plan(V3, V3_PUBLISHED)
    assert V3_PUBLISHED.world == 2048 and V3_PUBLISHED.expert_replicas == 2
    stage1 = r.stages[1]  # four MoE layers, 4 of 256 experts each on every GPU
    assert stage1.routed == 4 * 4 * 3 * 7168 * 2048
    assert r.worst_ckpt.total_ckpt < 80e9
    # without any recomputation, 15 micro-batches of 4096 tokens through four MoE layers do not fit: why
    # DeepSeek recomputed norms, up-projections and SwiGLU and cached activations in FP8
    assert stage1.activations > 80e9
    # 1F1B: stage s holds pp - s micro-batches
    assert [m.in_flight for m in r.stages] == list(range(16, 0, -1))


def test_checkpointed_activations_are_smaller():
    for cfg, plan in ((V3, V3_PUBLISHED), (ModelConfig.from_preset("ref-813M"), ParallelPlan(ep=8, dp=8, zero=3))):
        for m in make_plan(cfg, plan).stages:
            assert 0 < m.activations_ckpt < m.activations


def test_per_token_activation_accounting_for_v3():
    # attention: norm in+out 2·7168, q_a norm in+out 2·1536, c_kv norm in+out 2·512, q and k 2·128·192,
    # v and output 2·128·128, fp32 log-sum-exp 128 (as 256 bf16): 100,608 bf16 values
    assert attention_activations(V3) == 2 * 100_608
    # MoE: norm in+out 2·7168, fp32 scores 256, fp32 weights 8, int64 ids 8, 8 copies in and out 2·8·7168,
    # gate/up/product 3·8·2048, shared expert 3·2048
    assert mlp_activations(V3, 3) == 2 * (2 * 7168 + 2 * 256 + 2 * 8 + 4 * 8 + 2 * 8 * 7168 + 3 * 8 * 2048 + 3 * 2048)
    assert mlp_activations(V3, 0) == 2 * (2 * 7168 + 3 * 18432)  # a dense layer


def test_doubling_ep_halves_routed_expert_memory():
    a, b = make_plan(V3, replace(V3_PUBLISHED, ep=32)), make_plan(V3, V3_PUBLISHED)
    gemm = 1 + 4 / 128**2  # fp8 + block scales
    for m32, m64 in zip(a.stages[1:-1], b.stages[1:-1]):
        assert m32.routed == 2 * m64.routed
        assert m32.weights - m64.weights == pytest.approx(m64.routed * gemm)
        assert m32.grads - m64.grads == pytest.approx(m64.routed * 4)
        # ZeRO-1 shards each expert's optimizer state over its dp / ep replicas: half the experts per GPU, twice
        # the replicas to shard over, the same bytes per GPU
        assert m32.optimizer == pytest.approx(m64.optimizer)
    assert a.stages[0].total == b.stages[0].total  # the dense first stage has no experts


def test_zero_stages_shard_more_in_turn():
    cfg = ModelConfig.from_preset("ref-813M")
    plans = [ParallelPlan(ep=8, dp=16, zero=z) for z in range(4)]
    m = [make_plan(cfg, p).stages[0] for p in plans]
    shared, routed = m[0].params - m[0].routed, m[0].routed
    # each stage shards one more kind of state: shared weights over all 16 ranks, each expert over its 2 replicas
    assert m[0].optimizer - m[1].optimizer == pytest.approx(12 * (shared * 15 / 16 + routed / 2))
    assert m[1].grads - m[2].grads == pytest.approx(4 * (shared * 15 / 16 + routed / 2))
    assert m[2].weights - m[3].weights == pytest.approx(2 * (shared * 15 / 16 + routed / 2))
    assert m[3].gather > 0 == m[2].gather
    assert m[0].static > m[1].static > m[2].static > m[3].static
    # with ep = dp every expert has one replica: ZeRO has nothing to shard it over
    one = make_plan(cfg, ParallelPlan(ep=8, dp=8, zero=3)).stages[0]
    assert one.weights == pytest.approx(2 * (shared / 8 + one.routed))


def test_all_to_all_bytes():
    a = make_plan(V3, V3_PUBLISHED).a2a
    assert a.dispatch == 8 * (7168 + 4 * 56)  # fp8 values + one fp32 scale per 128 channels, 8 copies
    assert a.combine == 8 * 7168 * 2  # bf16
    # groups of 32 experts = one node's 8 GPUs × 4 experts, 4 groups kept: DeepSeek's M = 4 nodes
    assert (a.nodes, a.remote_nodes) == (4, 4) and a.ib_dispatch == 4 * (7168 + 224)
    tokens_per_gpu = 15360 * 4096 / 128
    assert a.step_gpu == pytest.approx(2 * tokens_per_gpu * 4 * (a.dispatch + a.combine) * 63 / 64)
    assert make_plan(V3, replace(V3_PUBLISHED, weights="bf16")).a2a.dispatch == a.combine
    # V2-Lite routes greedily (no groups): one token may reach a node per copy, up to the nodes there are
    lite = make_plan(ModelConfig.from_preset("deepseek-v2-lite"), ParallelPlan(ep=64, dp=64)).a2a
    assert lite.nodes == 6  # top-6 over 8 nodes
    assert make_plan(ModelConfig.from_preset("tiny"), ParallelPlan(ep=1)).a2a.off_gpu == 0


@pytest.mark.parametrize("plan,message", [
    (ParallelPlan(pp=16, ep=48, dp=96), "ep=48 does not divide the 256 routed experts"),
    (ParallelPlan(pp=62), "pp=62 is more pipeline stages than the model's 61 layers"),
    (ParallelPlan(ep=64, dp=32), "ep=64 must divide dp=32"),
    (ParallelPlan(zero=4), "zero must be 0, 1, 2 or 3"),
    (ParallelPlan(dp=8, global_batch=12), "global batch 12 must be a multiple of dp × micro-batch"),
    (ParallelPlan(weights="fp4"), "weights must be one of bf16, fp8"),
])
def test_bad_plans_say_what_to_do(plan, message):
    with pytest.raises(PlanError, match=message.replace("×", ".").replace("(", r"\(")):
        make_plan(V3, plan)
    with pytest.raises(PlanError, match="needs routed experts; this model is dense"):
        make_plan(v3_config(n_routed_experts=None), ParallelPlan(ep=2, dp=2))


def test_parse_plan():
    assert parse_plan("pp=16, ep=64,dp=128") == dict(pp=16, ep=64, dp=128)
    for spec, message in (("pp=16,tp=2", "KEY one of pp, ep, dp, zero"), ("pp", "write KEY=N"),
                          ("pp=x", "expected an integer"), ("pp=1,pp=2", "given twice"), ("", "empty plan")):
        with pytest.raises(PlanError, match=message):
            parse_plan(spec)


def test_report_says_it_is_arithmetic():
    text = format_plan(make_plan(V3, V3_PUBLISHED))
    assert text.splitlines()[0].startswith("plan             arithmetic, not measured: 2048 GPUs = pp 16 x dp 128")
    assert "59.1 KB" in text and "114.7 KB" in text and "at most 4 nodes" in text


def test_docs_page_is_what_the_script_writes():
    # regenerate with: python -m deepmoe.parallel.plan_report --write docs/scale.md
    assert (Path(__file__).parents[1] / "docs" / "scale.md").read_text() == page()
    assert page().startswith("# Scale on paper: parallelism plans (arithmetic, not measured)")
