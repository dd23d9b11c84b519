"""Multi-token prediction (MTP) modules, DeepSeek-V3 style.

Depth k combines the previous depth's hidden state at position i with the embedding of token i+k:
    h'_i = eh_proj([enorm(emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      (embedding first)
    h^k  = Block_k(h')   over positions 0 .. T-k-1, causal
    logits^k_i = lm_head(shared_head.norm(h^k_i))                   predicts t_{i+k+1}
Embedding and output head are the main model's. h^0 is the main model's final (normed) hidden state,
the same tensor its lm_head reads, which is what serving runtimes feed DeepSeek's released MTP weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import LatentCache
from .block import Block
from .norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        # the block's layer index continues the main stack, as in the checkpoint (model.layers.{L+k-1})
        self.block = Block(cfg, cfg.num_hidden_layers + depth - 1)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, start_pos: int = 0, router_out=None,
                capacity_factor: float | None = None, sync_free: bool = False) -> torch.Tensor:
        """h_prev, emb_next (B, T, d) → this depth's hidden state (B, T, d), before shared_head.norm."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, cache, start_pos, router_out=router_out, capacity_factor=capacity_factor,
                          sync_free=sync_free)
