"""Pipeline parallelism, part two: one rank's stage of a pipeline-parallel training run, driven by
torch.distributed.pipelining (PipelineStage + Schedule1F1B), and what the training loop needs around it.

One optimizer step = one schedule step over the step's --grad-accum micro-batches of (--batch-size, T): the
pipeline's micro-batches are exactly the micro-batches a single process accumulates, in the same order, and
the schedule averages their gradients (scale_grads) as the single process does (loss / grad_accum). 1F1B
keeps at most pp micro-batches' activations in flight on the first stage, so it needs grad_accum >= pp.

Every rank reads the whole step batch (the first stage needs the ids, the last the targets; the sampler is
seeded alike everywhere). After the schedule, one all-reduce of a float64 vector carries the step figures
(CE and MTP from the last stage, each stage's balance loss) and the expert counts, each stage filling its own
MoE layers' rows: every rank then logs the same figures, and each stage moves the balancing bias of its own
layers by complete counts. The gradient norm is one more all-reduce (the stages' parameters are disjoint).
Validation and the end-of-run sample go through the stages with plain send/recv, forward only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from ..model import DeepSeekModel
from ..train.balance import moe_layers
from ..train.losses import cross_entropy
from .mesh import Process
from .pipeline import Objective, Stage, pipeline_refusals, pipeline_split
from .training import clip_global_grad_norm


class PipelineRun:
    """One rank's stage of the pipeline and the reductions of a step. Built from the whole single-device
    model; `model` is then this rank's `Stage` (the other stages' layers are dropped with the model)."""

    def __init__(self, proc: Process, device: torch.device, model: DeepSeekModel, cfg):
        refused = pipeline_refusals(cfg, proc.world_size)
        if refused:
            raise ValueError(f"rank {proc.rank}: not available with pipeline parallelism: {'; '.join(refused)}")
        self.proc, self.device = proc, device
        self.rank, self.world = proc.rank, proc.world_size
        self.is_main = proc.rank == 0
        self.last_rank = proc.world_size - 1
        self.ranges = pipeline_split(model, cfg.pp)
        objective = Objective(cfg.mtp_weight, cfg.aux_loss_alpha or 0.0, cfg.capacity_factor)
        stage = Stage(model, self.ranges[self.rank], self.rank, cfg.pp, objective)
        self.model = stage
        mc = model.config
        self.n_experts = mc.n_routed_experts
        # the global routing order (main stack, then MTP blocks when MTP trains): what the counts' rows are
        everywhere = moe_layers(model)
        mine = {id(m) for m in moe_layers(stage)}
        n_main = sum(mc.is_moe_layer(i) for i in range(mc.num_hidden_layers))
        self.n_rows = len(everywhere) if stage.trains_mtp else n_main
        # this stage's MoE layers where the bias update looks for them, None where another stage holds the layer
        self.moe_layers = [m if id(m) in mine else None for m in everywhere]
        self.rows = [i for i, m in enumerate(self.moe_layers[:self.n_rows]) if m is not None]
        self.has_aux = bool(objective.aux_loss_alpha > 0 and self.n_rows)
        self.stage = PipelineStage(stage, self.rank, cfg.pp, device, input_args=self._inputs(cfg),
                                   output_args=self._outputs(cfg, mc))
        # every rank passes the loss: its presence is what tells the schedule to run backward
        self.schedule = Schedule1F1B(self.stage, cfg.grad_accum, loss_fn=stage.loss, scale_grads=True)

    # ---- static shapes: no metadata inference run (it would run a real forward and backward first) ----------
    def _activations(self, B: int, T: int, d: int) -> tuple[torch.Tensor, ...]:
        h = torch.empty(B, T, d, device="meta", requires_grad=True)
        return (h, h.clone()) if self.model.trains_mtp else (h,)

    def _inputs(self, cfg) -> tuple[torch.Tensor, ...]:
        B, T, d = cfg.batch_size, cfg.seq_len, self.model.config.hidden_size
        if self.model.is_first:
            return (torch.empty(B, T, dtype=torch.long, device="meta"),)
        return self._activations(B, T, d)

    def _outputs(self, cfg, mc) -> tuple[torch.Tensor, ...]:
        B, T, d = cfg.batch_size, cfg.seq_len, mc.hidden_size
        if not self.model.is_last:
            return self._activations(B, T, d)
        depths = [k for k in range(1, len(self.model.mtp) + 1) if T - k > 0] if self.model.trains_mtp else []
        return tuple(torch.empty(B, T - k, d, device="meta", requires_grad=True) for k in [0, *depths])

    # ---- one optimizer step ---------------------------------------------------------------------------------
    def step(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], autocast=None
             ) -> tuple[list[float | None], torch.Tensor | None]:
        """Forward and backward of the step's micro-batches [(x, y) of (B, T)] through the 1F1B schedule;
        gradients accumulated into this stage's parameters, averaged over the micro-batches. → the step's
        figures [loss, ce, mtp, aux] (means over micro-batches, the same on every rank) and the expert counts
        (rows of every stage's MoE layers, summed over the step), or None without MoE layers."""
        x = torch.cat([b[0] for b in batches]).to(self.device)
        y = torch.cat([b[1] for b in batches]).to(self.device)
        args = (x,) if self.model.is_first else ()
        target = y if self.model.is_last else None
        with autocast or contextlib.nullcontext():
            self.schedule.step(*args, target=target, return_outputs=False)
        tally, self.model.tally = self.model.tally, []
        return self._reduce(tally)

    def _reduce(self, tally: list[dict]) -> tuple[list[float | None], torch.Tensor | None]:
        """The figures and counts of every stage, on every rank: one all-reduce of a float64 vector
        [ce, mtp, aux, counts (rows × E)], each stage contributing its own terms and rows (counts below 2^53
        are exact)."""
        n = len(tally)
        flat = torch.zeros(3 + self.n_rows * (self.n_experts or 0), dtype=torch.float64, device=self.device)
        for i, key in enumerate(("ce", "mtp", "aux")):
            values = [t[key] for t in tally if t[key] is not None]
            if values:
                flat[i] = torch.stack(values).double().sum() / n
        counts = [t["counts"] for t in tally if t["counts"] is not None]
        if counts and self.rows:
            # (own rows, E): this stage's routings in forward order, which is their order in the model
            flat[3:].view(self.n_rows, -1)[self.rows] = torch.stack(counts).sum(0).double()
        dist.all_reduce(flat)
        ce, mtp, aux = flat[:3].tolist()
        mtp = mtp if self.model.trains_mtp else None
        aux = aux if self.has_aux else None
        loss = ce + (self.model.objective.mtp_weight * mtp if mtp is not None else 0.0) + (aux or 0.0)
        out_counts = flat[3:].round().to(torch.int64).view(self.n_rows, -1) if self.n_rows else None
        return [loss, ce, mtp, aux], out_counts

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """The stages' parameters are disjoint: see clip_global_grad_norm."""
        return clip_global_grad_norm(params, max_norm, self.device)

    # ---- forward only: validation and sampling ---------------------------------------------------------------
    def _hidden(self, x: torch.Tensor) -> torch.Tensor | None:
        """ids (B, T), the same on every rank → the final normed hidden states (B, T, d) on the last stage,
        None elsewhere. Stage by stage with send/recv: no backward, so no schedule to overlap with."""
        B, T = x.shape
        if self.model.is_first:
            h = self.model.infer(x)
        else:
            h = torch.empty(B, T, self.model.config.hidden_size, dtype=torch.float32, device=self.device)
            dist.recv(h, src=self.rank - 1)
            h = self.model.infer(h)
        if self.model.is_last:
            return h
        dist.send(h.float().contiguous(), dst=self.rank + 1)
        return None

    @torch.no_grad()
    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean next-token loss of a batch, as evaluate computes it on one device, on every rank."""
        h = self._hidden(x.to(self.device))
        out = torch.zeros(1, dtype=torch.float64, device=self.device)
        if h is not None:
            out[0] = float(cross_entropy(self.model.lm_head(h), y.to(self.device)))
        dist.broadcast(out, src=self.last_rank)
        return float(out[0])

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of ids (B, T), the same on every rank. Without a cache every token runs the
        whole prefix through the stages again: fine for the end-of-run sample, not for serving."""
        limit = self.model.config.max_position_embeddings
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            if ids.shape[1] >= limit:
                break
            h = self._hidden(ids)
            nxt = torch.zeros(ids.shape[0], dtype=torch.long, device=self.device)
            if h is not None:
                nxt = self.model.lm_head(h[:, -1]).argmax(-1)
            dist.broadcast(nxt, src=self.last_rank)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)  # finished rows pad with eos
                done |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        return ids

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def full_state(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Every stage's tensors (disjoint names) gathered into one dict of CPU tensors on rank 0 (None
        elsewhere): the single-device model's state dict, which the usual writer saves."""
        local = {k: v.detach().to("cpu", copy=True) for k, v in named.items()}
        parts = [None] * self.world if self.is_main else None
        dist.gather_object(local, parts, dst=0)
        if not self.is_main:
            return None
        return {k: v for part in parts for k, v in part.items()}

    def model_state(self, model: Stage) -> dict[str, torch.Tensor] | None:
        return self.full_state(model.state_dict())

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
