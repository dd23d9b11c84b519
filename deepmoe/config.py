"""ModelConfig: the DeepSeek-V2/V3 architecture hyper-parameters under Hugging Face `config.json` names.

The field names are the ones real checkpoints carry, so a config.json read from the Hub maps 1:1 onto
this dataclass and `to_hf_dict()` writes one transformers accepts. Presets ship as JSON files in
`deepmoe/presets/` in exactly that format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"
log = logging.getLogger("deepmoe")

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "yarn")


class ConfigError(ValueError):
    """An inconsistent or unsupported model configuration."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768  # dense SwiGLU width
    moe_intermediate_size: int = 128  # width of one routed expert
    num_hidden_layers: int = 4  # excludes MTP layers
    num_attention_heads: int = 8
    # MLA
    q_lora_rank: int | None = 128  # None: plain q_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # MoE
    n_routed_experts: int | None = 16  # None: every layer dense
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 4
    n_group: int | None = 4
    topk_group: int | None = 2
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    # position encoding
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # DeepSeek checkpoints store q_pe/k_pe for the interleaved-pair rotation
    max_position_embeddings: int = 4096
    # misc
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 0  # MTP depth D
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # training-only knobs stored in DeepSeek's config.json; kept so a round trip loses nothing
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    # which transformers class runs this config, and so which routing (see `validate`). None: derived from
    # topk_method, so Python-built configs need not spell it (noaux_tc → deepseek_v3, else deepseek_v2)
    model_type: str | None = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back verbatim

    def __post_init__(self) -> None:
        if self.model_type is None:
            self.model_type = "deepseek_v3" if self.topk_method == "noaux_tc" else "deepseek_v2"
        if self.q_lora_rank == 0:  # the official code spells "no q compression" as 0
            self.q_lora_rank = None
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: dense for the first k layers, then MoE every `moe_layer_freq`-th layer."""
        return (
            self.has_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even (rotated in pairs), got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, f"q_lora_rank must be null/0 or positive, got {self.q_lora_rank}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace must be >= 0")
        need(self.moe_layer_freq >= 1, f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        need(self.rms_norm_eps > 0, "rms_norm_eps must be positive")
        need(self.model_type in MODEL_TYPES, f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.model_type == "deepseek_v2":
            # transformers' DeepseekV2 rotates with complex multiplication: always the interleaved pairing
            need(self.rope_interleave, "deepseek_v2 always uses the interleaved rope layout; "
                                       "rope_interleave=False needs model_type deepseek_v3")
        if self.has_moe:
            E, k = self.n_routed_experts, self.num_experts_per_tok
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
            need(self.topk_method in TOPK_METHODS, f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
            need(self.scoring_func in SCORING_FUNCS, f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
            self._validate_routing(need)
            need(isinstance(k, int) and 1 <= k <= E,
                 f"num_experts_per_tok must be in [1, n_routed_experts={E}], got {k!r}")
            if self.topk_method != "greedy":
                g, kg = self.n_group or 1, self.topk_group or 1
                need(E % g == 0, f"n_routed_experts ({E}) must be divisible by n_group ({g})")
                need(1 <= kg <= g, f"topk_group ({kg}) must be between 1 and n_group ({g})")
                need(k <= kg * (E // g),
                     f"num_experts_per_tok ({k}) exceeds the experts in the kept groups "
                     f"(topk_group {kg} x {E // g} experts per group)")
                if self.topk_method == "noaux_tc":
                    need(E // g >= 2, "noaux_tc scores groups by their top-2 experts: need >= 2 experts per group")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            need(rs["type"] in ROPE_TYPES, f"rope_scaling type must be one of {ROPE_TYPES}, got {rs['type']!r}")
            if rs["type"] == "yarn":
                need(rs.get("factor", 0) and rs["factor"] > 0, "yarn rope_scaling needs a positive 'factor'")
                need(rs.get("original_max_position_embeddings"),
                     "yarn rope_scaling needs 'original_max_position_embeddings'")

    def _validate_routing(self, need) -> None:
        """Only routings transformers runs: its DeepseekV2 router hard-codes softmax scores and never
        renormalises the top-k weights; its DeepseekV3 router hard-codes sigmoid scores, group top-2-sum
        selection with the correction bias (noaux_tc) and renormalises whenever norm_topk_prob is set, top-1
        included. Both multiply by routed_scaling_factor last. A field saying otherwise would be ignored by
        transformers and obeyed by us: the two would then disagree on the same checkpoint."""
        if self.model_type == "deepseek_v3":
            need(self.scoring_func == "sigmoid",
                 f"deepseek_v3 routes with sigmoid scores (transformers' DeepseekV3 ignores scoring_func), "
                 f"got scoring_func={self.scoring_func!r}")
            need(self.topk_method == "noaux_tc",
                 f"deepseek_v3 routes with noaux_tc (group top-2 sum + correction bias), "
                 f"got topk_method={self.topk_method!r}")
        else:
            need(self.scoring_func == "softmax",
                 f"deepseek_v2 routes with softmax scores (transformers' DeepseekV2 ignores scoring_func), "
                 f"got scoring_func={self.scoring_func!r}; sigmoid routing needs model_type deepseek_v3")
            need(self.topk_method in ("greedy", "group_limited_greedy"),
                 f"deepseek_v2 routes with greedy or group_limited_greedy, got topk_method={self.topk_method!r}")
            need(not self.norm_topk_prob,
                 "deepseek_v2 never renormalises the top-k weights (transformers' DeepseekV2 ignores "
                 "norm_topk_prob): set norm_topk_prob=False")

    # ---- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """A config.json as transformers reads it: a field the file omits takes the default of transformers'
        class for its model_type (DeepSeek-V3's sizes for deepseek_v3, V2's for deepseek_v2), never the tiny
        preset's, and the routing follows that class (see `_validate_routing`)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = _model_type_of(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # transformers v5 spells the rope settings `rope_parameters` (theta inside); older files
        # use `rope_theta` + `rope_scaling`. Accept both.
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                d.setdefault("rope_scaling", rp)
        # num_key_value_heads means nothing to MLA (kv_b_proj expands the latent for every query head), and
        # transformers' DeepseekV3Config writes its default 128 whatever num_attention_heads is: ignored, as
        # transformers' own attention ignores it
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"only hidden_act='silu' is supported, got {d['hidden_act']!r}")
        if d.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported: DeepSeek's MLPs and experts have no bias")
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        missing = [k for k in _HF_DEFAULTS[model_type] if k not in d and k not in _QUIETLY_DEFAULTED]
        if missing:
            log.warning("config omits %s; using transformers' %s defaults (%s), as transformers would",
                        ", ".join(missing), model_type,
                        ", ".join(f"{k}={_HF_DEFAULTS[model_type][k]!r}" for k in missing))
        if model_type == "deepseek_v2" and d.get("norm_topk_prob"):
            log.warning("norm_topk_prob=true is ignored for deepseek_v2: transformers' DeepseekV2 router never "
                        "renormalises the top-k weights, and deepmoe computes what transformers computes")
            d["norm_topk_prob"] = False
        d = {**_HF_DEFAULTS[model_type], **_IMPLIED[model_type], **d, "model_type": model_type}
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(d.get(key), list):  # some configs list several eos ids; keep the first
                d[key] = d[key][0] if d[key] else None
        kwargs = {k: v for k, v in d.items() if k in known}
        for key in ("n_group", "topk_group"):  # V2 configs leave these null for plain greedy routing
            if kwargs.get(key) is None:
                kwargs[key] = 1
        skip = _DERIVED_HF_KEYS | {"rope_parameters", "num_mtp_layers"}
        extra = {k: v for k, v in d.items() if k not in known and k not in skip}
        unknown = sorted(k for k in extra if k not in _PASSTHROUGH_HF_KEYS)
        if unknown:
            log.warning("config has keys deepmoe does not use (typos?): %s; kept and written back unchanged",
                        ", ".join(unknown))
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        d.update(
            architectures=[arch],
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
        )
        return {**self.extra, **d}

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
        return cls.from_json(path)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# keys transformers writes that we derive ourselves
_DERIVED_HF_KEYS = {"architectures", "num_key_value_heads", "hidden_act",
                    "transformers_version", "qk_head_dim", "head_dim", "auto_map", "use_cache"}
# keys real checkpoints carry that deepmoe has no use for (transformers' generic and DeepSeek release fields)
_PASSTHROUGH_HF_KEYS = {"torch_dtype", "dtype", "quantization_config", "attention_dropout", "mlp_bias",
                        "output_router_logits", "pretraining_tp", "ep_size", "_name_or_path", "tokenizer_class",
                        "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict",
                        "router_aux_loss_coef", "num_experts", "num_local_experts"}

# What transformers' DeepseekV2Config / DeepseekV3Config (5.x) fill in for a field config.json omits
# (tests/test_config.py checks this table against the installed transformers).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
        num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
        attention_bias=False, rope_theta=10000.0, first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=None, n_group=None, topk_group=None, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0),
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, max_position_embeddings=4096, rms_norm_eps=1e-6,
        initializer_range=0.02, bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
        attention_bias=False, rope_theta=10000.0, first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_interleave=True, num_nextn_predict_layers=1),
}
# fields older transformers releases do not write: their absence is normal, not worth a warning
_QUIETLY_DEFAULTED = {"num_nextn_predict_layers", "rope_interleave", "pad_token_id"}
# what each class hard-codes, so a file that omits it (transformers writes none of these) means exactly this
_IMPLIED: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(scoring_func="softmax", rope_interleave=True, num_nextn_predict_layers=0),
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc"),
}
_ARCH_MODEL_TYPES = {"DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}


def _model_type_of(d: dict[str, Any]) -> str:
    mt = d.get("model_type")
    if mt is None:
        archs = [_ARCH_MODEL_TYPES[a] for a in d.get("architectures") or [] if a in _ARCH_MODEL_TYPES]
        if not archs:
            raise ConfigError(f'config has no model_type: add "model_type": one of {MODEL_TYPES} '
                              "(it decides the routing and every default)")
        mt = archs[0]
    if mt not in MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {mt!r}; deepmoe reads {MODEL_TYPES}")
    return mt


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _normalise_rope_scaling(rs: dict) -> dict | None:
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("rope_theta", None)
    if kind == "default":
        return None
    return {"type": kind, **rs}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·m·ln(s) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
