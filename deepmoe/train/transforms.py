"""Execution transforms applied to a built model, outside the model package: quantisation-aware training,
activation checkpointing and torch.compile. All leave parameter names (and so checkpoints) unchanged."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..model import DeepSeekModel
from ..model.block import Block


def blocks(model: DeepSeekModel) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def qat_summary(model: DeepSeekModel, cfg) -> str:
    """Apply quantisation-aware training (quant/qat.py) as cfg.qat / cfg.qat_group_size ask; → a log line."""
    from ..quant.qat import apply_qat
    from ..quant.scheme import QuantScheme

    names = apply_qat(model, QuantScheme(cfg.qat, cfg.qat_group_size))
    return (f"qat       {cfg.qat} g{cfg.qat_group_size}: {len(names)} modules fake-quantised (the weights "
            f"`deepmoe quantize` replaces)")


def apply_activation_checkpointing(model: DeepSeekModel) -> None:
    """Keep only each block's input during the forward pass and recompute the block in backward: memory
    per block drops from all its activations to one (B, T, d) tensor for one extra block forward.
    Non-reentrant checkpointing, so the router's outputs (appended to router_out) keep their autograd
    graph for the balance loss; the recompute appends a second, unused copy to that call's list."""
    for block in blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _inference_forward(forward, *args, **kwargs):
    """Evaluation's entry into a block: its own code object, so its compiled graphs are cached apart from
    training's (see apply_compile)."""
    return forward(*args, **kwargs)


def apply_compile(model: DeepSeekModel, backend: str = "inductor") -> None:
    """Compile each decoder block. Blocks share code, so one compiled graph serves every layer of a kind
    (dense, MoE, MTP), and compile time stays that of one block rather than the whole network.

    Training and evaluation get separate compiled functions. Dynamo caches graphs per code object and
    guards each on the grad mode, so with one function every switch between a training step and a
    `torch.no_grad` validation pass recompiled the same block, until the recompile limit (8) sent it back
    to eager for good. With grad enabled a block runs the graph compiled from its own forward; without,
    the graph compiled through `_inference_forward`, a different code object with a cache of its own.
    Shapes are static (training and validation batches are (B, T) throughout); generation, whose lengths
    vary, belongs under `eager()`."""
    inference = torch.compile(_inference_forward, dynamic=False, backend=backend)
    for block in blocks(model):
        forward = block.forward  # the bound method, or activation checkpointing's wrapper of it
        training = torch.compile(forward, dynamic=False, backend=backend)

        def dispatch(*args, _training=training, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return _training(*args, **kwargs)
            return inference(_forward, *args, **kwargs)

        block.forward = dispatch


def eager():
    """Run compiled blocks eagerly inside this context (for generation, whose shapes change every step)."""
    return torch.compiler.set_stance("force_eager")


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA (fp32 master weights and optimizer), nothing on CPU or for fp32. With fp8 the
    linear layers' GEMMs run in FP8 and what remains (attention's core, experts, head) in bf16 on CUDA."""
    if precision == "bf16" or (precision in ("auto", "fp8") and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None
