"""GRPO's arithmetic as pure tensor functions: group-relative advantages, the clipped policy objective with
its KL term, the three loss normalisations, and per-token log-probabilities computed a chunk of positions
at a time.

Notation: a step has P prompts with G completions each; per completion token t, logp = log π_θ(o_t | …),
old = the same under the policy that sampled the rollouts (equal in value to logp when each rollout batch
gets one optimizer step), ref = the frozen reference policy.

    ratio_t = exp(logp_t − old_t)
    loss_t  = −min(ratio_t · A, clip(ratio_t, 1 − ε_low, 1 + ε_high) · A) + β · k3_t
    k3_t    = exp(ref_t − logp_t) − (ref_t − logp_t) − 1      (an unbiased, always ≥ 0 estimate of KL(π_θ‖π_ref))

The three normalisations of Σ loss_t people compare (`loss_type`):
    grpo     mean over each completion's tokens, then mean over completions (DeepSeekMath's form; a long
             completion's tokens weigh less than a short one's: the length bias Dr. GRPO points out)
    dapo     sum over every token of the batch / number of tokens of the batch (DAPO; TRL's default)
    dr_grpo  sum over every token / (completions × max completion length), a constant (Dr. GRPO)
Each is a sum of per-token terms with weights fixed for the whole rollout batch (`token_weights`), so a
batch split into micro-batches accumulates exactly the gradient of the whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the std before dividing: a group whose rewards barely differ is not blown up


def group_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """rewards (P, G) → advantages (P, G): each reward minus its group's mean, divided by the group's std
    (scale="group", GRPO), by the std of the whole batch ("batch"), or not divided ("none", Dr. GRPO).
    The std is the sample std (n − 1), as TRL computes it. A group whose rewards are all equal has all
    advantages 0 whatever the scaling: it carries no learning signal."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, generations) with at least 2 generations, got {tuple(rewards.shape)}")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    if scale == "batch":
        return centred / (rewards.std() + STD_EPS)
    return centred


def zero_std_fraction(rewards: torch.Tensor) -> float:
    """Share of groups (rows of (P, G) rewards) whose completions all got the same reward."""
    return float((rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean())


def token_weights(mask: torch.Tensor, loss_type: str, max_completion_len: int) -> torch.Tensor:
    """mask (N, T) of the tokens that carry loss, for the whole rollout batch → weights (N, T) such that the
    batch's loss is Σ weights · loss_t (see the module docstring for the three kinds). A completion with no
    token in the mask (masked as truncated) weighs nothing, and counts in no denominator but dr_grpo's."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    m = mask.float()
    if loss_type == "dapo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return m / (mask.shape[0] * max_completion_len)
    lengths = m.sum(dim=1, keepdim=True)
    active = (lengths > 0).sum().clamp(min=1)
    return m / lengths.clamp(min=1.0) / active


def policy_loss_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      ref_logp: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                      beta: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO loss (same shape as logp) and per-token diagnostics (detached): the k3 KL (when
    ref_logp is given), and where the clip was active on each side (it removes that token's gradient).
    advantages broadcast against logp (one per completion: shape (N, 1) for (N, T) tokens)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    stats = {"clip_low": ((ratio < 1.0 - epsilon) & (advantages < 0)).float(),
             "clip_high": ((ratio > 1.0 + eps_high) & (advantages > 0)).float()}
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
        stats["kl"] = kl.detach()
        if beta:
            loss = loss + beta * kl
    return loss, stats


def _logp_entropy(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, inv_temp: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h, head).float() * inv_temp
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def token_logprobs(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, d), head weight (V, d), targets (N,) → log-probabilities of the targets (N,) under
    softmax(logits / temperature), differentiable, and the distributions' entropies (N,), detached. The
    fp32 logits exist for `chunk` positions at a time: each chunk is recomputed in backward (activation
    checkpointing) rather than kept, so a rollout batch's (N, V) logits never sit in memory whole."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states for {targets.shape[0]} targets")
    inv_temp = 1.0 / temperature
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad)
    logps, entropies = [], []
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        if grad:
            lp, ent = checkpoint(_logp_entropy, h, head, t, inv_temp, use_reentrant=False)
        else:
            lp, ent = _logp_entropy(h, head, t, inv_temp)
        logps.append(lp)
        entropies.append(ent)
    if not logps:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(logps), torch.cat(entropies)
