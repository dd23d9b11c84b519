"""Expert load: counting it, reporting it, and DeepSeek-V3's aux-loss-free balancing.

Balancing nudges each MoE layer's `e_score_correction_bias` after every optimizer step:
    bias_i += γ · sign(mean_load − load_i)
so overloaded experts become less likely to be *selected* (the bias never changes routing weights).
Loads are counted over the whole step (every micro-batch) before any capacity dropping.
"""

from __future__ import annotations

import torch

from ..model.experts import count_experts
from ..model.moe import MoE
from ..model.router import Routing


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    """Every MoE layer in routing order: main stack first, then the MTP blocks (the order the forward
    passes append to router_out)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_counts(routings: list[Routing], n_experts: int) -> torch.Tensor:
    """(L, E) int64: how many token copies each layer's router sent to each expert."""
    return torch.stack([count_experts(r.indices.flatten(), n_experts) for r in routings])


@torch.no_grad()
def update_bias(layers: list[MoE | None], counts: torch.Tensor, rate: float) -> None:
    """One aux-loss-free balancing step from the step's loads counts (L, E); a None layer is skipped."""
    for layer, load in zip(layers, counts):
        if layer is None:  # held by another pipeline stage, which moves its bias by the same counts
            continue
        bias = layer.gate.e_score_correction_bias
        if bias is None:  # greedy / group-limited routers have no bias to steer
            continue
        load = load.float()
        bias += rate * torch.sign(load.mean() - load)


def load_metrics(counts: torch.Tensor) -> dict[str, list]:
    """Per-layer balance figures from counts (L, E): MaxVio = max load / mean load − 1, the smallest and
    largest expert share, the number of experts that got no token, and every expert's share."""
    counts = counts.double().cpu()
    total = counts.sum(dim=1, keepdim=True).clamp(min=1)
    share = counts / total
    mean = counts.mean(dim=1).clamp(min=1e-12)
    return {"max_vio": (counts.amax(dim=1) / mean - 1).tolist(),
            "min_share": share.amin(dim=1).tolist(), "max_share": share.amax(dim=1).tolist(),
            "dead_experts": (counts == 0).sum(dim=1).tolist(),
            "expert_share": [[round(v, 6) for v in row] for row in share.tolist()]}
