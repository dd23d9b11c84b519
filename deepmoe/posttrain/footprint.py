"""What a fine-tuning run trains and what training it holds beyond the weights.

Counted from the parameters that require grad, before the first step, exactly as build_optimizer's AdamW
will hold them (train.optim.optimizer_memory): a gradient each, two moments and a step count. Activations
are left out: they depend on the batch, not on what trains. Under LoRA the same figures for full
fine-tuning of the same model (every parameter but the adapter factors) are given beside them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..train.optim import optimizer_memory


def footprint(model: nn.Module) -> dict[str, Any]:
    """trainable_parameters, parameters, trainable_fraction, grad_bytes, optimizer_state_bytes; under LoRA
    also full_finetune_grad_bytes and full_finetune_optimizer_state_bytes."""
    named = dict(model.named_parameters())  # a tied weight once
    trained = optimizer_memory(p for p in named.values() if p.requires_grad)
    total = sum(p.numel() for p in named.values())
    out = {"trainable_parameters": trained["parameters"], "parameters": total,
           "trainable_fraction": trained["parameters"] / total, "grad_bytes": trained["grad_bytes"],
           "optimizer_state_bytes": trained["optimizer_bytes"]}
    if any(".lora_" in n for n in named):  # deepmoe.lora's factors: lora_A, lora_B
        full = optimizer_memory(p for n, p in named.items() if ".lora_" not in n)
        out |= {"full_finetune_grad_bytes": full["grad_bytes"],
                "full_finetune_optimizer_state_bytes": full["optimizer_bytes"]}
    return out


def format_footprint(f: dict[str, Any]) -> str:
    """One log line (a footprint, or a summary.json that holds one)."""
    mib = 2.0 ** 20
    text = (f"trained   {f['trainable_parameters']:,} of {f['parameters']:,} parameters "
            f"({100 * f['trainable_fraction']:.3g}%); gradients {f['grad_bytes'] / mib:,.2f} MiB + AdamW state "
            f"{f['optimizer_state_bytes'] / mib:,.2f} MiB")
    if "full_finetune_grad_bytes" in f:
        full = f["full_finetune_grad_bytes"] + f["full_finetune_optimizer_state_bytes"]
        ratio = full / max(f["grad_bytes"] + f["optimizer_state_bytes"], 1)
        text += (f" (full fine-tuning: {f['full_finetune_grad_bytes'] / mib:,.2f} + "
                 f"{f['full_finetune_optimizer_state_bytes'] / mib:,.2f} MiB, {ratio:,.0f}x)")
    return text
