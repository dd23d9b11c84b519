"""The feed-forward blocks: a dense SwiGLU MLP and DeepSeekMoE (router + routed + shared experts)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .experts import Experts
from .router import Gate, Routing


class MLP(nn.Module):
    def __init__(self, d: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        # n_shared experts of width moe_inter are mathematically one SwiGLU of width n_shared·moe_inter
        self.shared_experts = MLP(cfg.hidden_size, n_shared * cfg.moe_intermediate_size) if n_shared else None

    def forward(self, x: torch.Tensor, router_out: list[Routing] | None = None,
                capacity_factor: float | None = None, sync_free: bool = False) -> torch.Tensor:
        """x (B, T, d). router_out collects this layer's Routing (for balancing). capacity_factor c caps
        every expert at ceil(c · N·k / E) token copies of this call's N tokens (None: dropless).
        sync_free: static shapes and no host reads (a compiled or CUDA-graphed decode step)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.gate(flat)
        if router_out is not None:
            router_out.append(routing)
        capacity = None
        if capacity_factor is not None:
            N, k = routing.indices.shape
            capacity = math.ceil(capacity_factor * N * k / self.experts.n_experts)
        y = self.experts(flat, routing.indices, routing.weights, capacity, sync_free).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
