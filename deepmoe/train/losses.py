"""Training objectives as pure functions: next-token cross-entropy, the MTP objective and DeepSeek's
complementary sequence-wise balance loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.router import Routing


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats; logits (B, T, V) in any dtype, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor | None:
    """Mean over depths of the MTP cross-entropy. Depth k's logits (B, T-k, V) at position i predict
    token i+k+1, which is targets[:, i+k] (targets are the inputs shifted by one)."""
    if not mtp_logits:
        return None
    losses = [cross_entropy(logits, targets[:, k:]) for k, logits in enumerate(mtp_logits, start=1)]
    return torch.stack(losses).mean()


def sequence_balance_loss(routing: Routing, batch_size: int, n_experts: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss for one MoE layer, before its weight α:
        f_i = E / (K·T) · #{t : expert i in top-k(t)},   P_i = mean_t s'_{i,t},   L = Σ_i f_i · P_i
    per sequence, averaged over the batch. s' are the affinities normalised to sum to one per token (a
    no-op for softmax scores). Perfect balance gives L = 1; f is a count and carries no gradient."""
    scores = routing.scores.view(batch_size, -1, n_experts)  # (B, T, E)
    T = scores.shape[1]
    s_norm = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    picks = routing.indices.view(batch_size, T * top_k)
    counts = torch.zeros(batch_size, n_experts, device=scores.device).scatter_add_(
        1, picks, torch.ones_like(picks, dtype=torch.float32))
    f = counts * (n_experts / (top_k * T))
    return (f * s_norm.mean(dim=1)).sum(dim=-1).mean()
