"""One pre-norm decoder block: MLA then a dense MLP or DeepSeekMoE, each with a residual."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA, LatentCache
from .moe import MLP, MoE
from .norm import RMSNorm
from .router import Routing


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                start_pos: int = 0, absorb: bool = False, router_out: list[Routing] | None = None,
                capacity_factor: float | None = None, sync_free: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, absorb)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(h, router_out, capacity_factor, sync_free)
        return x + self.mlp(h)
