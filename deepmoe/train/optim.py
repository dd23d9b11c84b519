"""The optimizer and the learning-rate schedule.

AdamW over fp32 master weights; matrices decay, vectors (norm scales) do not. The schedule is a pure
function of the optimizer step, so "scheduler state" is just that step number: resuming cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).device.type == "cuda"
    # fused AdamW is one kernel per step on CUDA; on CPU the foreach path is the fast one
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=on_cuda or None, foreach=None if on_cuda else True)


def optimizer_memory(params: Iterable[torch.Tensor]) -> dict[str, int]:
    """What training `params` costs on top of holding them, in bytes, exactly as build_optimizer's AdamW
    holds it: a gradient per parameter in its dtype, and once stepped two moments in its dtype (exp_avg,
    exp_avg_sq) plus a 4-byte fp32 step count per tensor. Activations are not counted: they depend on the batch."""
    params = list({id(p): p for p in params}.values())  # a tied weight is one tensor
    numel = sum(p.numel() for p in params)
    grad = sum(p.numel() * p.element_size() for p in params)
    return {"parameters": numel, "grad_bytes": grad, "optimizer_bytes": 2 * grad + 4 * len(params)}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over warmup_steps, then
    multistep (× decay_factor at each fraction in decay_at of the run), cosine down to min_lr_ratio·lr,
    or constant."""
    peak, total, warmup = cfg.lr, cfg.steps, cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "multistep":
        return peak * cfg.decay_factor ** sum(step >= round(m * total) for m in cfg.decay_at)
    if cfg.schedule == "cosine":
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        floor = peak * cfg.min_lr_ratio
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    return peak


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
