"""Pipeline parallelism, part one: which layers each stage holds (`pipeline_split`), the stage module built
from the single-device model (`Stage`) and what a pipelined run refuses. Nothing here communicates or imports
torch.distributed; pipeline_run.py drives the stages with torch.distributed.pipelining's 1F1B schedule.

A stage holds a contiguous range of decoder layers; the first also holds the embedding, the last the final
norm, the head and the MTP modules. Parameter names are the single-device model's (`model.layers.5...`), so a
stage's state dict is a slice of the model's and the slices of all stages together are the model's.

What goes from one stage to the next, per micro-batch (B, T): the residual stream h (B, T, d) and, when MTP
trains, the embedding output e (B, T, d). MTP depth k reads embed(ids)[:, k:], which is e[:, k:]: the last
stage gets the embedded tokens instead of the ids, so the embedding table stays on the first stage alone (no
copy on the last stage whose gradient would have to be kept in sync), and e's gradient flows back through the
stages into the table like h's. The price is a second (B, T, d) activation per stage boundary, both ways.

The objective is step_loss's, CE + λ·MTP + α·Σ_layers sequence-balance loss, split by where the terms live:
CE and MTP on the last stage (`Stage.loss`, the schedule's loss_fn), and each stage's own MoE layers' balance
loss in that stage's forward, its gradient started by the stage output's backward (`_AddAuxGrad`), so no
routing ever leaves its stage. The step's figures and expert counts are recorded per micro-batch in
`Stage.tally` and reduced across stages once the step is done (pipeline_run.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model import DeepSeekModel
from ..model.router import RoutingLog
from ..model.rope import rope_cos_sin
from ..train.balance import expert_counts
from ..train.fused_ce import linear_cross_entropy
from ..train.losses import sequence_balance_loss


def split_layers(costs: Sequence[float], pp: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[range]:
    """Cut layers 0 .. len(costs)-1 into pp contiguous ranges of at least one layer each, minimising the
    largest stage total: the costs of its layers, plus first_extra on stage 0 and last_extra on stage pp-1
    (what sits beside the layers there). Exact, by dynamic programming over the cut points (O(pp · L²), L ≤ a
    few hundred); among equally good cuts the earliest ones win. A pure function of its arguments."""
    L = len(costs)
    if pp < 1:
        raise ValueError(f"--pp must be >= 1, got {pp}")
    if pp > L:
        raise ValueError(f"--pp {pp} stages for a model of {L} decoder layers: every stage needs at least one "
                         f"layer; use --pp <= {L}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(s: int, j: int, i: int) -> float:  # stage s holding layers j .. i-1
        return prefix[i] - prefix[j] + (first_extra if s == 0 else 0.0) + (last_extra if s == pp - 1 else 0.0)

    # best[s][i]: the smallest largest-stage total placing layers 0 .. i-1 on stages 0 .. s; cut[s][i] where
    # stage s then starts
    best = [[stage_cost(0, 0, i) if i >= 1 else float("inf") for i in range(L + 1)]]
    cut = [[0] * (L + 1)]
    for s in range(1, pp):
        row, starts = [float("inf")] * (L + 1), [0] * (L + 1)
        for i in range(s + 1, L + 1):
            for j in range(s, i):
                v = max(best[s - 1][j], stage_cost(s, j, i))
                if v < row[i]:
                    row[i], starts[i] = v, j
        best.append(row)
        cut.append(starts)
    bounds, i = [L], L
    for s in range(pp - 1, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pipeline_split(model: DeepSeekModel, pp: int) -> list[range]:
    """The decoder layers of each of pp stages, balanced by parameter count: the embedding counts on the first
    stage, the final norm, head and MTP modules on the last. Parameters, not FLOPs: what pipelining is for
    is fitting a model whose weights, gradients and AdamW moments (16 bytes a parameter in fp32) do not fit
    one device, and an MoE layer's routed experts, which dominate its parameters, are mostly idle per token
    (balancing FLOPs would pile experts onto few stages). A tied head is refused: it would be one tensor on
    two stages."""
    if model.config.tie_word_embeddings:
        raise ValueError("pipeline parallelism with tie_word_embeddings: the head would be the embedding table on "
                         "another stage; use a model with a separate head, or --pp 1")
    costs = [_numel(layer) for layer in model.model.layers]
    last = _numel(model.model.norm) + _numel(model.lm_head) + _numel(model.mtp)
    return split_layers(costs, pp, first_extra=_numel(model.model.embed_tokens), last_extra=last)


def pipeline_refusals(cfg, world_size: int) -> list[str]:
    """What a training config asks for that pipeline parallelism does not do (yet), each with what to do."""
    out = []
    if world_size != cfg.pp:
        out.append(f"--pp {cfg.pp} on {world_size} processes (pipeline stages combined with FSDP data parallelism "
                   f"are not implemented: launch exactly --pp processes)")
    if cfg.ep > 1:
        out.append("--ep > 1 with --pp > 1 (expert parallelism inside pipeline stages is not implemented)")
    if cfg.grad_accum < cfg.pp:
        out.append(f"--grad-accum {cfg.grad_accum} < --pp {cfg.pp} (the micro-batches are the pipeline's: 1F1B "
                   f"needs at least one per stage; raise --grad-accum)")
    return out


@dataclass(frozen=True)
class Objective:
    """The parts of the training config a stage's forward and loss need (TrainConfig's names)."""
    mtp_weight: float
    aux_loss_alpha: float
    capacity_factor: float | None


class _AddAuxGrad(torch.autograd.Function):
    """h unchanged; its backward also starts aux's backward with d(loss)/d(aux) = 1: a stage's balance loss
    joins the objective without travelling to the last stage, and its gradient is taken exactly when the
    stage's output gradient arrives (once per micro-batch)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.dtype, aux.device)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad, torch.ones((), dtype=dtype, device=device)


class Stage(nn.Module):
    """Stage `index` of `n_stages` holding decoder layers `layers` of `model` (the same modules, not copies:
    build every stage from one freshly built or loaded model, then drop the model)."""

    def __init__(self, model: DeepSeekModel, layers: range, index: int, n_stages: int, objective: Objective):
        super().__init__()
        cfg = model.config
        self.config, self.objective = cfg, objective
        self.index, self.n_stages = index, n_stages
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.layer_ids = layers
        # the run's parameter count, which the log reports, is the whole model's
        self.model_parameters = model.num_parameters()
        self.model = nn.Module()  # `model.` prefix: the single-device names
        if self.is_first:
            self.model.embed_tokens = model.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        self.trains_mtp = bool(len(model.mtp)) and objective.mtp_weight > 0
        if self.is_last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head
            self.mtp = model.mtp
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self.rope_attention_factor = model.rope_attention_factor
        # one record per micro-batch of the step in flight, in forward order: {"aux", "counts", "ce", "mtp"}
        self.tally: list[dict[str, torch.Tensor | None]] = []

    def num_parameters(self) -> int:
        return self.model_parameters

    def rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq.float(), torch.arange(T, device=device), self.rope_attention_factor)

    def _layers(self, h: torch.Tensor, router_out: RoutingLog | None) -> torch.Tensor:
        cos, sin = self.rope(h.shape[1], h.device)
        for layer in self.model.layers.values():
            h = layer(h, cos, sin, router_out=router_out, capacity_factor=self.objective.capacity_factor)
        return h

    def _mtp_inputs(self, hidden: torch.Tensor, e: torch.Tensor, router_out: RoutingLog) -> list[torch.Tensor]:
        """DeepSeekModel.mtp_head_inputs with depth k's token embeddings read from e[:, k:] (the first stage's
        embedding output) instead of a lookup: (B, T-k, d) per depth."""
        out, h = [], hidden
        T = hidden.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            cos, sin = self.rope(T - k, hidden.device)
            h = module(h[:, :T - k], e[:, k:], cos, sin, router_out=router_out,
                       capacity_factor=self.objective.capacity_factor)
            out.append(module.shared_head.norm(h))
        return out

    def forward(self, *inputs: torch.Tensor):
        """The training forward of one micro-batch. In: ids (B, T) on the first stage, else h (B, T, d) and,
        when MTP trains, e (B, T, d). Out: (h, e) or h for the next stage; on the last stage (normed h, MTP
        depth states (B, T-k, d)...) for `loss`."""
        if self.is_first:
            h = e = self.model.embed_tokens(inputs[0])
        else:
            h, e = inputs if self.trains_mtp else (inputs[0], None)
        log = RoutingLog()
        h = self._layers(h, log)
        if self.is_last:
            h = self.model.norm(h)
            states = self._mtp_inputs(h, e, log) if self.trains_mtp else []
        # this pass's routings: under activation checkpointing the backward recompute appends more later
        routings = log.items[:len(log)]
        cfg, obj = self.config, self.objective
        aux = counts = None
        if routings:
            counts = expert_counts(routings, cfg.n_routed_experts)
            if obj.aux_loss_alpha > 0:
                B = h.shape[0]
                aux = obj.aux_loss_alpha * sum(sequence_balance_loss(r, B, cfg.n_routed_experts,
                                                                     cfg.num_experts_per_tok) for r in routings)
                h = _AddAuxGrad.apply(h, aux)
        self.tally.append({"aux": None if aux is None else aux.detach(), "counts": counts, "ce": None, "mtp": None})
        if self.is_last:
            return (h, *states)
        return (h, e.view_as(e)) if self.trains_mtp else h  # a view: an output that is not the input tensor itself

    def loss(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's part of step_loss for one micro-batch: CE + λ · mean MTP CE (the balance losses
        arrive through _AddAuxGrad). targets (B, T): the inputs shifted by one."""
        hidden, *states = outputs if isinstance(outputs, tuple) else (outputs,)
        head = self.lm_head.weight  # chunked loss: the logits never exist whole
        ce = linear_cross_entropy(hidden, head, targets)
        loss, mtp = ce, None
        if states:
            # depth k's state at position i predicts token i+k+1, which is targets[:, i+k]
            mtp = torch.stack([linear_cross_entropy(s, head, targets[:, k:])
                               for k, s in enumerate(states, start=1)]).mean()
            loss = ce + self.objective.mtp_weight * mtp
        self.tally[-1].update(ce=ce.detach(), mtp=None if mtp is None else mtp.detach())
        return loss

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward only, no routing records: ids (B, T) on the first stage, else h (B, T, d) → h for the next
        stage, or the final normed hidden states on the last (validation and the end-of-run sample)."""
        h = self.model.embed_tokens(x) if self.is_first else x
        h = self._layers(h, None)
        return self.model.norm(h) if self.is_last else h
