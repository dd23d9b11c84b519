"""Execution transforms applied to a built model, outside the model package: activation checkpointing
and torch.compile. Both act per decoder block and leave parameter names (and so checkpoints) unchanged."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..model import DeepSeekModel
from ..model.block import Block


def blocks(model: DeepSeekModel) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def apply_activation_checkpointing(model: DeepSeekModel) -> None:
    """Keep only each block's input during the forward pass and recompute the block in backward: memory
    per block drops from all its activations to one (B, T, d) tensor for one extra block forward.
    Non-reentrant checkpointing, so the router's outputs (appended to router_out) keep their autograd
    graph for the balance loss; the recompute appends a second, unused copy to that call's list."""
    for block in blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: DeepSeekModel) -> None:
    """Compile each decoder block separately: blocks share code, so one compiled graph serves all layers
    of a kind, and compile time stays that of one block rather than the whole network."""
    for block in blocks(model):
        block.compile(dynamic=False)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA (fp32 master weights and optimizer), nothing on CPU or for fp32. With fp8 the
    linear layers' GEMMs run in FP8 and what remains (attention's core, experts, head) in bf16 on CUDA."""
    if precision == "bf16" or (precision in ("auto", "fp8") and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None
