"""Quantisation-aware training: train with the weights `deepmoe quantize` will write, so the model learns
around their rounding.

`apply_qat(model, scheme)` makes every projection that `deepmoe quantize` would quantise (quantize.py's
`target_modules`: linears and routed experts, not the embedding, head, routers or norms) compute with its
weight fake-quantised, w → dequantize(quantize(w)), by the same functions and grouping as scheme.py, on each
forward. The backward pass is the straight-through estimator: the gradient with respect to the fake-quantised
weight is passed to the fp32 weight unchanged, as if rounding were the identity.

The Parameters stay the same objects and keep full precision (they are what the optimizer updates and what
checkpoints hold); only the forward of their modules changes, reading the weight at call time, so the bf16
compute copies that train/compute_weights.py swaps in during a step are the ones fake-quantised. A run
trained this way is then quantised by `deepmoe quantize --scheme <same> --group-size <same>`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import Experts, LowRank
from .quantize import target_modules
from .scheme import QuantScheme, dequantize_groups, quantize_groups


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        q, scales = quantize_groups(w, bits, group_size)  # in fp32, whatever w's dtype
        return dequantize_groups(q, scales, w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None  # straight through


def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """w (..., out, in) → what `deepmoe quantize` would store for it, dequantised; gradient straight through."""
    return _FakeQuantize.apply(w, scheme.bits, scheme.group_for(w.shape[-1]))


class QatLinear(nn.Linear):
    """An nn.Linear that computes with its weight fake-quantised; same parameters and state dict."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.scheme = scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.scheme), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.scheme.name} g{self.scheme.group_size}"


class QatExperts(Experts):
    """Routed experts whose grouped projections use fake-quantised stacked weights (E, out, in); made by
    swapping an Experts' class (`apply_qat`), which keeps its parameters; `scheme` is set there."""

    scheme: QuantScheme

    def project(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, update: LowRank | None = None
                ) -> torch.Tensor:
        return super().project(x, fake_quantize(w, self.scheme), counts, update)


def apply_qat(model: nn.Module, scheme: QuantScheme) -> list[str]:
    """Fake-quantise, in place, the weights of the modules `deepmoe quantize` would quantise; → their names.
    Raises QuantError (naming the tensor) if a weight's input dimension does not fit the group size."""
    if scheme.fp8:
        raise ValueError("quantisation-aware training is for int8/int4; fp8 training is --precision fp8")
    names = target_modules(model, scheme)
    for name in names:
        module = model.get_submodule(name)
        if type(module) is Experts:
            module.__class__ = QatExperts  # a subclass with no parameters of its own: only `project` differs
            module.scheme = scheme
        elif type(module) is nn.Linear:
            qat = QatLinear(module.in_features, module.out_features, scheme, bias=module.bias is not None)
            qat.weight, qat.bias = module.weight, module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, qat)
        else:
            raise ValueError(f"{name} is a {type(module).__name__}: apply QAT to a plain model, before other "
                             f"transforms that replace its layers")
    return names
