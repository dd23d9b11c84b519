"""DeepSeekMoE routing: which experts each token goes to, and with what weight.

`route` is a pure function so every pitfall in REFERENCE.md is testable in isolation:
fp32 logits and scores; the correction bias only *selects* (weights come from unbiased scores);
masked groups get −inf, so no bias can pull in an expert from a dropped group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .precision import FP32Buffers


class Routing(NamedTuple):
    weights: torch.Tensor  # (N, k) fp32, already normalised and scaled
    indices: torch.Tensor  # (N, k) int64 expert ids
    scores: torch.Tensor  # (N, E) fp32 unbiased affinities (for the sequence-wise aux loss)


class RoutingLog:
    """Where the MoE layers of one forward pass append their Routing (`router_out`), in order. Deliberately
    not a list: wrappers that walk a module's arguments (FSDP's forward hooks rebuild any list or tuple in
    them that holds tensors needing gradients) pass an object they do not know through untouched, where a
    list would be copied and the later layers' routings lost."""

    def __init__(self):
        self.items: list[Routing] = []

    def append(self, routing: Routing) -> None:
        self.items.append(routing)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __iter__(self):
        return iter(self.items)


def route(logits: torch.Tensor, *, top_k: int, scoring_func: str = "softmax", topk_method: str = "greedy",
          n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = False,
          routed_scaling_factor: float = 1.0, bias: torch.Tensor | None = None) -> Routing:
    logits = logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    N, E = choice.shape
    if topk_method != "greedy" and n_group > 1:
        grouped = choice.view(N, n_group, E // n_group)
        if topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        else:  # group_limited_greedy
            group_score = grouped.amax(dim=-1)
        keep = group_score.topk(topk_group, dim=-1).indices
        group_mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)  # True = drop
        choice = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).view(N, E)
    indices = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(weights * routed_scaling_factor, indices, scores)


class Gate(FP32Buffers):
    """The router's parameters: `weight` (E, d) and, for noaux_tc, the fp32 `e_score_correction_bias`."""

    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kwargs = dict(top_k=cfg.num_experts_per_tok, scoring_func=cfg.scoring_func,
                           topk_method=cfg.topk_method, n_group=cfg.n_group or 1, topk_group=cfg.topk_group or 1,
                           norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        # (N, E) in fp32: routing decisions must not see bf16 rounding, also under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        return route(logits, bias=self.e_score_correction_bias, **self.kwargs)
