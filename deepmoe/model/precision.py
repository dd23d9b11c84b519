"""Buffers that stay fp32 whatever dtype the model is cast to.

`model.to(torch.bfloat16)` converts every floating buffer. Two must not be rounded: the routers' balancing
bias (its γ = 1e-3 updates are below bf16 resolution) and the RoPE inverse frequencies (bf16 gives them a
relative error of ~1e-3: ~0.4 rad of phase at position 4k, ~3 rad at 32k; transformers keeps them fp32).
"""

from __future__ import annotations

import torch
from torch import nn


class FP32Buffers(nn.Module):
    """Mixin: the buffers named in `fp32_buffers` follow device moves but keep (or regain) fp32."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {name: getattr(self, name) for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if old is not None and new.dtype != torch.float32:
                src = new if old.device.type == "meta" else old  # meta holds no values to preserve
                setattr(self, name, src.to(device=new.device, dtype=torch.float32))
        return self
