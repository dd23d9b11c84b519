"""ModelConfig: HF config.json names both ways, validation, presets, parameter counts."""

import json
import logging

import pytest

from deepmoe.config import ConfigError, ModelConfig, list_presets
from deepmoe.stats import model_stats


def test_presets_load_and_round_trip():
    assert {"tiny", "ref-813M", "deepseek-v2-lite", "deepseek-v3"} <= set(list_presets())
    for name in list_presets():
        cfg = ModelConfig.from_preset(name)
        assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_reads_rope_parameters_and_rope_scaling_spellings():
    yarn = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    base = ModelConfig.from_preset("tiny").to_hf_dict()
    base.pop("rope_scaling"), base.pop("rope_theta")
    old = ModelConfig.from_hf_dict({**base, "rope_theta": 50000.0, "rope_scaling": {"type": "yarn", **yarn}})
    new = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, **yarn}})
    assert old == new and old.rope_theta == 50000.0 and old.rope_scaling["factor"] == 40
    plain = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None


def test_q_lora_rank_zero_or_null_means_plain_q_proj():
    assert ModelConfig(q_lora_rank=0).q_lora_rank is None
    assert ModelConfig.from_hf_dict({**ModelConfig().to_hf_dict(), "q_lora_rank": None}).q_lora_rank is None


def test_written_config_is_accepted_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name in ("deepseek-v3", "deepseek-v2-lite"):
        cfg = ModelConfig.from_preset(name)
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
        hf = transformers.AutoConfig.from_pretrained(tmp_path)
        assert hf.model_type == cfg.model_type
        assert hf.n_routed_experts == cfg.n_routed_experts and hf.kv_lora_rank == cfg.kv_lora_rank
        assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40


@pytest.mark.parametrize("changes, message", [
    (dict(n_routed_experts=15, n_group=4), "divisible by n_group"),
    (dict(topk_group=5, n_group=4), "topk_group"),
    (dict(num_experts_per_tok=20), "num_experts_per_tok"),
    (dict(num_experts_per_tok=12, n_group=4, topk_group=2), "exceeds the experts in the kept groups"),
    (dict(topk_method="best"), "topk_method"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(qk_rope_head_dim=15), "even"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "original_max_position_embeddings"),
])
def test_inconsistent_configs_are_rejected_with_a_reason(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_num_key_value_heads_is_ignored_like_transformers_does():
    # transformers' DeepseekV3Config writes its default 128 whatever num_attention_heads is; MLA has no KV groups
    cfg = ModelConfig.from_hf_dict({**ModelConfig().to_hf_dict(), "num_key_value_heads": 2})
    assert cfg == ModelConfig()


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_default_table_equals_installed_transformers(model_type):
    """A field a config.json omits takes transformers' default for that model_type: the table must be its."""
    transformers = pytest.importorskip("transformers")
    from deepmoe.config import _HF_DEFAULTS

    hf = transformers.AutoConfig.for_model(model_type)
    for key, value in _HF_DEFAULTS[model_type].items():
        if key == "rope_theta":
            assert hf.rope_parameters["rope_theta"] == value
        elif key == "num_nextn_predict_layers" and not hasattr(hf, key):
            continue  # older transformers: no MTP field
        else:
            assert getattr(hf, key) == value, key


def test_missing_fields_take_transformers_defaults_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="deepmoe"):
        v3 = ModelConfig.from_hf_dict({"model_type": "deepseek_v3"})
        assert "config omits" in caplog.text and "hidden_size=7168" in caplog.text
    # DeepSeek-V3 itself, not the tiny preset
    assert (v3.hidden_size, v3.vocab_size, v3.num_hidden_layers) == (7168, 129280, 61)
    assert (v3.scoring_func, v3.topk_method, v3.routed_scaling_factor) == ("sigmoid", "noaux_tc", 2.5)
    v2 = ModelConfig.from_hf_dict({"architectures": ["DeepseekV2ForCausalLM"], "num_experts_per_tok": 6})
    assert (v2.model_type, v2.scoring_func, v2.topk_method, v2.norm_topk_prob) == ("deepseek_v2", "softmax",
                                                                                   "greedy", False)
    assert (v2.hidden_size, v2.n_routed_experts, v2.num_nextn_predict_layers) == (4096, 64, 0)


def test_unknown_keys_warn_and_survive_a_round_trip(caplog):
    d = {**ModelConfig().to_hf_dict(), "hiden_size": 512}
    with caplog.at_level(logging.WARNING, logger="deepmoe"):
        cfg = ModelConfig.from_hf_dict(d)
    assert "hiden_size" in caplog.text and cfg.hidden_size == ModelConfig().hidden_size
    assert cfg.to_hf_dict()["hiden_size"] == 512
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepmoe"):
        ModelConfig.from_preset("deepseek-v3")
    assert caplog.text == ""


@pytest.mark.parametrize("d, message", [
    ({"model_type": "llama"}, "unsupported model_type"),
    ({"hidden_size": 64}, "no model_type"),
    ({"model_type": "deepseek_v3", "scoring_func": "softmax"}, "sigmoid"),
    ({"model_type": "deepseek_v3", "topk_method": "greedy"}, "noaux_tc"),
    ({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "scoring_func": "sigmoid"}, "softmax"),
    ({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "topk_method": "noaux_tc"}, "greedy"),
    ({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "rope_interleave": False}, "interleaved"),
    ({"model_type": "deepseek_v2"}, "num_experts_per_tok"),  # transformers has no default for it
    ({"model_type": "deepseek_v3", "mlp_bias": True}, "mlp_bias"),
    ([1, 2, 3], "JSON object"),
])
def test_configs_transformers_would_run_differently_are_refused(d, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(d)


def test_python_configs_must_be_expressible_in_transformers():
    with pytest.raises(ConfigError, match="never renormalises"):
        ModelConfig(topk_method="greedy", scoring_func="softmax", norm_topk_prob=True)
    with pytest.raises(ConfigError, match="sigmoid"):
        ModelConfig(topk_method="greedy", scoring_func="sigmoid", norm_topk_prob=False)
    assert ModelConfig(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False).model_type == "deepseek_v2"


def test_unknown_preset_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="available"):
        ModelConfig.from_preset("nope")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)


def test_deepseek_v3_parameter_counts():
    s = model_stats(ModelConfig.from_preset("deepseek-v3"))
    assert round(s.total / 1e9) == 671
    assert round(s.activated / 1e9) in (37, 38)  # 37.55B: DeepSeek quotes 37B
    assert 13e9 < s.mtp_on_disk < 14.5e9  # "~14B MTP": 685B on disk
    assert round(s.total_with_mtp_on_disk / 1e9) == 684 or round(s.total_with_mtp_on_disk / 1e9) == 685
    assert s.kv_naive_bytes / s.kv_latent_bytes == pytest.approx(40960 / 576)


def test_dense_and_moe_layer_layout():
    cfg = ModelConfig(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
