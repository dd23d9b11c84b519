"""Post-training objectives as pure functions: cross-entropy and MTP over chosen target tokens, the
balance loss and expert loads over real (non-pad) tokens, and knowledge distillation between teacher and
student next-token distributions.

Losses return *sums* over their tokens: a step spread over several micro-batches divides by the number
of target tokens of the whole step, so every target token weighs the same however the step is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model.router import Routing

KL_KINDS = ("forward", "reverse", "mix")


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over positions where mask is True of −log p(target); logits (B, T, V) in any dtype, summed in
    fp32. Masked positions are dropped before the softmax, so they get exactly zero gradient."""
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")


def masked_mtp_losses(mtp_logits: list[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per MTP depth k, Σ of its cross-entropy over targets that are trained on: depth k's logits
    (B, T-k, V) at position i predict targets[:, i+k], so its mask is mask[:, k:]."""
    return [masked_cross_entropy(lg, targets[:, k:], mask[:, k:]) for k, lg in enumerate(mtp_logits, start=1)]


def masked_balance_loss(routing: Routing, valid: torch.Tensor, n_experts: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss Σ_i f_i · P_i (see train.losses.sequence_balance_loss)
    counting only each sequence's real tokens; valid (B, T) bool. Equal to the unmasked loss when every
    token is valid."""
    B, T = valid.shape
    scores = routing.scores.view(B, T, n_experts)
    s_norm = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    v = valid.to(scores.dtype)  # (B, T)
    n_tok = v.sum(dim=1).clamp(min=1)  # (B,)
    picks = routing.indices.view(B, T * top_k)
    counts = torch.zeros(B, n_experts, device=scores.device, dtype=scores.dtype).scatter_add_(
        1, picks, v.repeat_interleave(top_k, dim=1))
    f = counts * (n_experts / top_k) / n_tok[:, None]
    p = (s_norm * v[..., None]).sum(dim=1) / n_tok[:, None]
    return (f * p).sum(dim=-1).mean()


def masked_expert_counts(routings: list[Routing], valid: list[torch.Tensor], n_experts: int) -> torch.Tensor:
    """(L, E) token copies each layer sent to each expert, real tokens only; valid[l] is layer l's
    (B, T_l) mask (MTP depth k sees T - k positions)."""
    def count(r: Routing, v: torch.Tensor) -> torch.Tensor:  # no boolean mask: no host sync
        ones = v.flatten().long().repeat_interleave(r.indices.shape[1])  # 1 for each copy of a real token
        return torch.zeros(n_experts, dtype=torch.int64, device=ones.device).scatter_add_(0, r.indices.flatten(), ones)

    return torch.stack([count(r, v) for r, v in zip(routings, valid)])


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  kind: str = "forward", mix: float = 0.5) -> torch.Tensor:
    """Σ over rows of T² · D between the temperature-softened distributions, (N, V) each, in fp32:
    forward KL(teacher ‖ student) (mean-seeking: the student covers every mode the teacher has),
    reverse KL(student ‖ teacher) (mode-seeking), or mix · forward + (1 − mix) · reverse. T² keeps the
    gradient's size independent of T (Hinton et al.)."""
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind must be one of {', '.join(KL_KINDS)}, got {kind!r}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    total = student_logits.new_zeros((), dtype=torch.float32)
    if kind in ("forward", "mix"):
        fwd = (log_t.exp() * (log_t - log_s)).sum()
        total = total + (fwd if kind == "forward" else mix * fwd)
    if kind in ("reverse", "mix"):
        rev = (log_s.exp() * (log_s - log_t)).sum()
        total = total + (rev if kind == "reverse" else (1 - mix) * rev)
    return total * temperature**2


def chunked_kl(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
               teacher_head: torch.Tensor, temperature: float = 1.0, kind: str = "forward", mix: float = 0.5,
               chunk: int = 256) -> torch.Tensor:
    """kl_divergence between lm heads applied to hidden states, `chunk` positions at a time.
    student_hidden (N, d_s) with its head (V, d_s); teacher_hidden (N, d_t) with its head (V, d_t).
    Each chunk runs under activation checkpointing: forward keeps only its scalar, backward recomputes
    the chunk's logits, so at most one chunk's (chunk, V) teacher and student logits exist at a time,
    never a batch's. Equal to kl_divergence of the full logits up to summation order."""
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"teacher and student vocabularies differ ({teacher_head.shape[0]} vs "
                         f"{student_head.shape[0]} logits)")
    teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()

    def piece(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        return kl_divergence(F.linear(hs, student_head), F.linear(ht, teacher_head), temperature, kind, mix)

    total = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, student_hidden.shape[0], chunk):
        hs, ht = student_hidden[i:i + chunk], teacher_hidden[i:i + chunk]
        total = total + (checkpoint(piece, hs, ht, use_reentrant=False) if torch.is_grad_enabled() else piece(hs, ht))
    return total
