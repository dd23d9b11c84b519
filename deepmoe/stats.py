"""Model size arithmetic: total / activated / MTP parameters and KV-cache bytes per token.

Counts come from the real module tree built on the meta device (nothing allocated), so they can
never drift from the model definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .model import DeepSeekModel


@dataclass(frozen=True)
class ModelStats:
    total: int  # main model (embedding, blocks, norm, head), as transformers counts it
    activated: int  # per token: everything except the routed experts a token does not visit
    mtp: int  # MTP modules' own parameters (embedding and head are shared)
    mtp_on_disk: int  # plus the copies of embedding and head the release checkpoint format stores
    kv_naive_bytes: int  # per token, all layers: per-head K (nope+rope) and V
    kv_latent_bytes: int  # per token, all layers: c_kv + k_pe

    @property
    def total_with_mtp_on_disk(self) -> int:
        return self.total + self.mtp_on_disk


def model_stats(cfg: ModelConfig, kv_dtype: torch.dtype = torch.bfloat16) -> ModelStats:
    with torch.device("meta"):
        model = DeepSeekModel(cfg)
    total = mtp = routed = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if ".mlp.experts." in name:
            routed += p.numel()
    k, E = cfg.num_experts_per_tok or 0, cfg.n_routed_experts or 1
    activated = total - routed + routed * k // E
    shared_copies = cfg.num_nextn_predict_layers * (model.model.embed_tokens.weight.numel()
                                                    + model.lm_head.weight.numel())
    L, H, b = cfg.num_hidden_layers, cfg.num_attention_heads, kv_dtype.itemsize
    return ModelStats(
        total=total, activated=activated, mtp=mtp, mtp_on_disk=mtp + shared_copies,
        kv_naive_bytes=L * H * (cfg.qk_head_dim + cfg.v_head_dim) * b,
        kv_latent_bytes=L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b,
    )


def human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_stats(name: str, cfg: ModelConfig, s: ModelStats) -> str:
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    rows = [
        ("parameters", s.total, "main model"),
        ("activated", s.activated, "per token"),
        ("MTP", s.mtp, "own parameters"),
        ("with MTP", s.total + s.mtp, "main + MTP's own: the count `deepmoe train` prints"),
        ("MTP on disk", s.mtp_on_disk, "+ copies of embedding and head"),
        ("checkpoint", s.total_with_mtp_on_disk, "main + MTP on disk"),
    ]
    lines = [
        f"model            {name} ({cfg.model_type}, {cfg.num_hidden_layers} layers: "
        f"{cfg.num_hidden_layers - moe_layers} dense + {moe_layers} MoE, +{cfg.num_nextn_predict_layers} MTP)",
        f"routing          {cfg.n_routed_experts or 0} routed + {cfg.n_shared_experts or 0} shared experts, "
        f"top-{cfg.num_experts_per_tok or 0}, {cfg.scoring_func}/{cfg.topk_method}, "
        f"groups {cfg.n_group}/{cfg.topk_group}",
        *(f"{label:<16} {human(n):>9}  {n:>17,}  {note}" for label, n, note in rows),
        f"KV cache/token   {human(s.kv_naive_bytes, 'B'):>9}  naive: per-head K and V (bf16)",
        f"                 {human(s.kv_latent_bytes, 'B'):>9}  MLA latent: c_kv + k_pe (bf16), "
        f"{s.kv_naive_bytes / s.kv_latent_bytes:.1f}x smaller",
    ]
    return "\n".join(lines)
