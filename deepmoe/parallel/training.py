"""What a data-parallel training step needs besides the parallelized model: each rank's slice of the global
batch, step figures reduced over the ranks and the global gradient norm (checkpoints: checkpoint.py).

Every rank reads its own batch_size / world sequences of the same global batch, so 1 rank and N ranks train
on the same tokens. Each rank's loss is the mean over its slice and FSDP averages the gradients over the
ranks (slices are equal), so the gradient is that of the global mean loss, as on one device.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .mesh import Process, build_mesh
from .parallelize import ParallelConfig, parallelize


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clip_global_grad_norm(params: list[torch.Tensor], max_norm: float, device: torch.device) -> float:
    """Global L2 norm of the gradients, clipped to max_norm as torch.nn.utils.clip_grad_norm_ does, where every
    gradient element lives on exactly one rank (FSDP shards, expert-parallel slices, pipeline stages): the squares
    of the local parts summed over the world are the global sum of squares, one all-reduce."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0 and math.isfinite(norm):
        torch._foreach_mul_(grads, coef)
    return norm


class DataParallelRun:
    """One rank's view of a distributed training run: the mesh, its share of the data, the reductions."""

    def __init__(self, proc: Process, device: torch.device, model, cfg: ParallelConfig, batch_size: int):
        if batch_size % proc.world_size:
            raise ValueError(f"rank {proc.rank}: --batch-size {batch_size} (the global batch) must be a multiple of "
                             f"the world size {proc.world_size}, so that every rank reads as many sequences")
        self.proc, self.device = proc, device
        self.rank, self.world = proc.rank, proc.world_size
        self.is_main = proc.rank == 0
        n_experts = model.config.n_routed_experts if any(model.config.is_moe_layer(i) for i in
                                                         range(model.config.num_hidden_layers)) else None
        self.mesh = build_mesh(device.type, proc.world_size, cfg.ep, n_experts, proc.rank)
        self.model = parallelize(model, self.mesh, cfg)
        self.sharded = proc.world_size > 1  # one rank: plain parameters (parallelize applies nothing)
        self.per_rank = batch_size // proc.world_size

    def local_indices(self, indices: list[int]) -> list[int]:
        """This rank's consecutive slice of a global batch's sequence indices."""
        return indices[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def reduce_step(self, figures: list[float | None], counts: torch.Tensor | None
                    ) -> tuple[list[float | None], torch.Tensor | None]:
        """Step figures (each rank's mean over its slice) → their mean over the ranks; expert counts (L, E) →
        their sum, exactly (int64). One all-reduce of a float64 vector: counts below 2^53 are exact."""
        present = [f for f in figures if f is not None]
        flat = torch.tensor(present, dtype=torch.float64, device=self.device)
        if counts is not None:
            flat = torch.cat([flat, counts.reshape(-1).to(torch.float64)])
        dist.all_reduce(flat)
        means = iter((flat[:len(present)] / self.world).tolist())
        out = [None if f is None else next(means) for f in figures]
        return out, None if counts is None else flat[len(present):].round().to(torch.int64).view(counts.shape)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Every parameter is sharded over all ranks (FSDP over dp, or over dp_shard × ep for the routed experts)
        with no element on two ranks: see clip_global_grad_norm."""
        return clip_global_grad_norm(params, max_norm, self.device)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def unsupported(cfg) -> list[str]:
    """What a training config asks for that the distributed loop does not do yet, each with what to do."""
    out = []
    if cfg.precision == "fp8":
        out.append("--precision fp8 (use bf16)")
    if cfg.qat:
        out.append("--qat (train on one process)")
    if cfg.compile:
        out.append("--compile (drop it: the expert-parallel all-to-all reads split sizes on the host)")
    if cfg.capacity_factor is not None and cfg.ep > 1:
        out.append("--capacity-factor with --ep > 1 (train dropless)")
    return out
