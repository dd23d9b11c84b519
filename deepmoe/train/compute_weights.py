"""bf16 compute weights over fp32 master weights: mixed precision the way large runs do it.

The model's Parameters stay fp32: they are the master weights, what AdamW updates (its moments fp32 too),
what checkpoints hold (so a resume is exact) and what every other tool reads. For the forward and backward
passes the matmul weights are swapped for bf16 copies (`ComputeWeights.active`), so autocast finds them in
bf16 already and casts nothing per use; the copies' bf16 gradients are added into the masters' fp32
`.grad` as each one is accumulated (a post-accumulate hook), so micro-batches accumulate in fp32; and after
each optimizer step the masters are copied into the same bf16 tensors once (`refresh`), in place, so
compiled graphs that captured them stay valid.

What gets a copy: the weight matrices of linear layers, the output head and the stacked routed experts.
What stays fp32 and is never copied: the routers' weights (routing logits must not see bf16 rounding,
REFERENCE.md), the embedding (a lookup casts nothing, and a bf16 table would make the residual stream
bf16), norm scales and every buffer (the balancing bias, RoPE frequencies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..model.experts import Experts
from ..model.router import Gate


def compute_weight_names(model: nn.Module) -> list[str]:
    """The parameters that get a bf16 copy: linear weights (head included) and stacked expert weights,
    not routers or embeddings; a head tied to the embedding stays with the embedding."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, (Gate, nn.Embedding))}
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            params = ["weight"]
        elif isinstance(module, Experts):
            params = ["gate_proj", "up_proj", "down_proj"]
        else:
            continue
        for p in params:
            t = getattr(module, p)
            if isinstance(t, nn.Parameter) and t.requires_grad and id(t) not in skip and t.is_floating_point():
                names.append(f"{mod_name}.{p}" if mod_name else p)
    return names


class ComputeWeights:
    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.model, self.dtype = model, dtype
        self.names = compute_weight_names(model)
        self.masters = [model.get_parameter(n) for n in self.names]
        self.copies = [nn.Parameter(m.detach().to(dtype), requires_grad=True) for m in self.masters]
        for master, copy in zip(self.masters, self.copies):
            copy.register_post_accumulate_grad_hook(_into_master(master))
        self._slots = [_slot(model, n) for n in self.names]

    @torch.no_grad()
    def refresh(self) -> None:
        """Round the masters into the bf16 copies (after every optimizer step, and after loading)."""
        torch._foreach_copy_(self.copies, [m.detach() for m in self.masters])

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The model computes with the bf16 copies inside this context (forward and backward both: activation
        checkpointing recomputes blocks during backward, and must see the same weights)."""
        for (module, attr), copy in zip(self._slots, self.copies):
            module._parameters[attr] = copy
        try:
            yield
        finally:
            for (module, attr), master in zip(self._slots, self.masters):
                module._parameters[attr] = master

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.copies)


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner), attr


def _into_master(master: nn.Parameter):
    """A hook for a copy: move its freshly accumulated bf16 gradient into the master's fp32 .grad."""
    def hook(copy: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = copy.grad.to(master.dtype)
        else:
            master.grad.add_(copy.grad)
        copy.grad = None
    return hook
