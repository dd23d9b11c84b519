"""The LoRA modules: a frozen layer plus a trainable low-rank update, y = W·x + (α/r)·B·A·x.

`LoraLinear` wraps an nn.Linear (attention projections, dense MLPs, shared experts, the output head);
`LoraEmbedding` the token embedding (a learned r-vector per token, mapped to d by B); `LoraRouter` a
router's (E, d) weight, its logits still in fp32 (opt-in: routers stay frozen by default). `LoraExperts`
wraps the stacked routed experts with one (A, B) pair per expert and hands them to the experts' grouped
computation as `LowRank` updates, so every expert formulation (grouped GEMM, padded, active groups,
sync-free) adds x·Aᵀ·Bᵀ over the same sorted token copies and W + B·A is never formed per step.
Following transformers' stacked experts (and peft's `target_parameters` on them), gate and up share one
pair on their concatenation [gate; up] (E, 2·inter, d); down has its own.

The adapter factors are fp32 whatever the base dtype (they are what the optimizer updates); the base
stays as loaded (bf16 is fine) and frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import Experts, LowRank, Updates
from ..model.router import Gate, Routing, route


def _factors(shape_a: tuple[int, ...], shape_b: tuple[int, ...], fan_in: int, device, gen: torch.Generator | None
             ) -> tuple[nn.Parameter, nn.Parameter]:
    """A uniform in ±1/√fan_in (Kaiming-uniform with a = √5, the usual LoRA init), B zero: the update starts
    at exactly zero, so a fresh adapter leaves the model's outputs unchanged bit for bit."""
    if torch.device(device).type == "meta":  # counting parameters of a model that is never allocated
        return (nn.Parameter(torch.empty(shape_a, device="meta")), nn.Parameter(torch.empty(shape_b, device="meta")))
    bound = 1 / math.sqrt(fan_in)
    a = (torch.rand(shape_a, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return nn.Parameter(a.to(device)), nn.Parameter(torch.zeros(shape_b, dtype=torch.float32, device=device))


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 gen: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        out_features, in_features = base.weight.shape
        self.lora_A, self.lora_B = _factors((rank, in_features), (out_features, rank), in_features,
                                            base.weight.device, gen)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        t = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r)
        return y + (self.scale * F.linear(t, self.lora_B)).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """W + (α/r)·B·A (out, in), for code that reads the matrix itself rather than calling the layer:
        absorbed attention folds kv_b_proj's weight into the query and output. Differentiable."""
        w = self.base_layer.weight
        return (w + (self.scale * (self.lora_B @ self.lora_A)).to(w.dtype)).contiguous()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta(self) -> torch.Tensor:
        """(α/r)·B·A in fp32 (out, in): what merging adds to the base weight."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())


class LoraEmbedding(nn.Module):
    """The token embedding plus a low-rank update: row t of the table becomes E[t] + (α/r)·B·A[:, t].

    peft's layout and initialisation for embeddings: lora_embedding_A (r, vocab) starts at zero and
    lora_embedding_B (d, r) random, the transpose of a linear layer's roles, because A is indexed by the
    token (a lookup, not a matmul) and the zero factor must be the one that makes the start exact."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, gen: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        vocab, dim = base.weight.shape
        device = base.weight.device
        if torch.device(device).type == "meta":
            self.lora_embedding_A = nn.Parameter(torch.empty(rank, vocab, device="meta"))
            self.lora_embedding_B = nn.Parameter(torch.empty(dim, rank, device="meta"))
            return
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, vocab, dtype=torch.float32, device=device))
        # peft draws B from N(0, 1); at scale α/r that makes the first steps' updates large for a
        # small-norm embedding, so B is drawn at the embedding's own scale instead (B is what A multiplies,
        # so this only sets the size of an update per unit of A, never the starting output)
        std = float(base.weight.detach().float().std()) or 1.0
        self.lora_embedding_B = nn.Parameter((torch.randn(dim, rank, generator=gen) * std).to(device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        t = F.embedding(ids, self.lora_embedding_A.t())  # (..., r)
        return y + (self.scale * F.linear(t, self.lora_embedding_B)).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """E + (α/r)·(B·A)ᵀ (vocab, d), for code that reads the table itself. Differentiable."""
        w = self.base_layer.weight
        return (w + (self.scale * (self.lora_embedding_B @ self.lora_embedding_A).t()).to(w.dtype)).contiguous()

    def delta(self) -> torch.Tensor:
        """(α/r)·(B·A)ᵀ in fp32 (vocab, d): what merging adds to the table."""
        return self.scale * (self.lora_embedding_B.detach().float() @ self.lora_embedding_A.detach().float()).t()


class LoraRouter(LoraLinear):
    """A router whose logits get the low-rank update: fp32 like the base router's, then the same `route`."""

    def __init__(self, base: Gate, rank: int, alpha: float, gen: torch.Generator | None = None):
        super().__init__(base, rank, alpha, 0.0, gen)

    @property
    def e_score_correction_bias(self) -> torch.Tensor | None:
        return self.base_layer.e_score_correction_bias  # the balancing step updates it through the MoE layer

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            logits = F.linear(x, self.base_layer.weight.float())
            logits = logits + self.scale * F.linear(F.linear(x, self.lora_A.float()), self.lora_B.float())
        return route(logits, bias=self.base_layer.e_score_correction_bias, **self.base_layer.kwargs)


class StackedLora(nn.Module):
    """One rank-r pair per expert for a stacked weight (E, out, in): lora_A (E, r, in), lora_B (E, out, r)."""

    def __init__(self, n_experts: int, out_features: int, in_features: int, rank: int, alpha: float, device,
                 gen: torch.Generator | None = None):
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A, self.lora_B = _factors((n_experts, rank, in_features), (n_experts, out_features, rank),
                                            in_features, device, gen)

    def update(self, rows: slice = slice(None)) -> LowRank:
        """The update of output rows `rows` of the stacked weight (gate and up are two halves of one pair)."""
        return LowRank(self.lora_A, self.lora_B[:, rows], self.scale)

    def delta(self, rows: slice = slice(None)) -> torch.Tensor:
        """(α/r)·B·A per expert in fp32 (E, out, in), restricted to output rows `rows`."""
        return self.scale * (self.lora_B[:, rows].detach().float() @ self.lora_A.detach().float())


class LoraExperts(nn.Module):
    """The routed experts with low-rank updates on gate_up_proj ([gate; up]) and/or down_proj."""

    def __init__(self, base: Experts, gate_up: tuple[int, float] | None, down: tuple[int, float] | None,
                 gen: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base
        E, inter, d = base.gate_proj.shape
        device = base.gate_proj.device
        self.inter = inter
        self.gate_up = StackedLora(E, 2 * inter, d, *gate_up, device, gen) if gate_up else None
        self.down = StackedLora(E, d, inter, *down, device, gen) if down else None

    @property
    def n_experts(self) -> int:
        return self.base_layer.n_experts

    def updates(self) -> Updates:
        gu, I = self.gate_up, self.inter
        return (gu.update(slice(0, I)) if gu else None, gu.update(slice(I, 2 * I)) if gu else None,
                self.down.update() if self.down else None)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                capacity: int | None = None, sync_free: bool = False) -> torch.Tensor:
        return self.base_layer(x, indices, weights, capacity, sync_free, self.updates())
